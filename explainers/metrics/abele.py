"""ABELE's evaluation protocol (Guidotti et al., ECML-PKDD 2019): relevance, coherence, stability.

Reconstructed from the authors' experiment scripts (methods.md 15.1):

- relevance: blank out the *least* relevant pixels of an image, percentile by percentile, and
  record whether the model's label flips; a faithful map tolerates losing many of them.
- coherence / stability: a local Lipschitz ratio ||e(x) - e(x')|| / ||x - x'|| over
  neighbours x' (real same-label images for coherence, salt-and-pepper copies for
  stability), with every array min-max scaled to [0,1] on its own first.
"""
from __future__ import annotations

from typing import Sequence

import torch

from saliency_audit.explainers.core.base import chunk_within_budget
from saliency_audit.explainers.metrics._utils import (
    STREAM_SALT_AND_PEPPER,
    as_seed_list,
    check_images,
    check_inputs,
    check_maps,
    check_max_forward_batch,
    forward_in_chunks,
    generator,
    minmax_scale,
)

DEFAULT_MAX_FORWARD_BATCH = 256
# ABELE's relevance percentiles: min, 5, 10, ..., 95, max.
ABELE_PERCENTILES = tuple(float(p) for p in range(0, 101, 5))


def _predict(model, images: torch.Tensor, max_forward_batch: int) -> torch.Tensor:
    """argmax labels [N] of images [N,C,H,W], in chunks within the memory budget."""
    chunk = chunk_within_budget(max_forward_batch, images.shape[1:], images.device)
    return forward_in_chunks(model, images.shape[0], lambda idx: images[idx],
                             lambda logits, idx: logits.argmax(dim=1), chunk, images.device)


def percentile(maps: torch.Tensor, percentiles: torch.Tensor) -> torch.Tensor:
    """Per-image percentiles of maps [B,H,W] -> [B,P] float64, numpy's default ("linear")."""
    batch = maps.shape[0]
    values, _ = torch.sort(maps.reshape(batch, -1).double(), dim=1)
    position = percentiles.double().to(maps.device) / 100 * (values.shape[1] - 1)
    low = position.floor().long()
    high = position.ceil().long()
    frac = position - low
    v_low, v_high = values[:, low], values[:, high]
    # v_low + frac * (v_high - v_low) is exact when the two neighbours are equal.
    return v_low + frac * (v_high - v_low)


def channel_values(value: float | Sequence[float] | torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A constant, or one value per channel, as a [C,1,1] tensor that broadcasts over images [...,C,H,W]."""
    values = torch.as_tensor(value, dtype=images.dtype).reshape(-1).to(images.device)
    channels = images.shape[-3]
    if values.numel() not in (1, channels):
        raise ValueError(f"expected one value or one per channel ({channels}), got {values.numel()}")
    return values.expand(channels).reshape(channels, 1, 1)


def relevance_flip_rate(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                        targets: torch.Tensor, *,
                        percentiles: Sequence[float] = ABELE_PERCENTILES,
                        fill: float | Sequence[float] | torch.Tensor = 0.0,
                        max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH) -> torch.Tensor:
    """ABELE's relevance test: does the label flip when the least relevant pixels are blanked?

    For each percentile p, every pixel whose map value is below the p-th percentile of its
    own image's map (numpy's linear interpolation) is set to ``fill`` in all channels, and
    the result is 1.0 if the model's predicted label differs from its prediction on the
    intact image, else 0.0. As in ABELE's script, p = 100 blanks every pixel (its "max"
    step uses <=), and p = 0 (the minimum) blanks none.

    Args:
        model: maps [N,C,H,W] to logits [N,K]; used as is (put it in eval mode first).
        images: [B,C,H,W] float, model-input space.
        maps: [B,H,W] relevance maps, raw and signed (low or negative = least relevant).
        targets: [B] class indices, checked for shape only: the flip is measured against
            the model's own prediction on the intact image, as ABELE did (it explains the
            predicted label, so with ``--target predicted`` the two coincide).
        percentiles: in [0, 100]; default ABELE's (0, 5, 10, ..., 95, 100).
        fill: the constant in model-input space (ABELE's colours 0, 127, 255 are 0.0,
            127/255, 1.0 for [0,1] inputs), or one value per channel (what a pixel value
            becomes after per-channel mean/std normalisation). Default 0.0.
        max_forward_batch: at most this many images per forward pass (default 256).

    Returns:
        [B, P] float32 of 0.0 / 1.0. B * (P + 1) forward passes.
    """
    check_inputs(images, maps, targets)
    check_max_forward_batch(max_forward_batch)
    q = torch.as_tensor([float(p) for p in percentiles], dtype=torch.float64)
    if q.dim() != 1 or q.numel() == 0 or bool(((q < 0) | (q > 100)).any()):
        raise ValueError(f"percentiles must be a non-empty sequence of numbers in [0, 100], got {percentiles}")
    batch, n_p = images.shape[0], q.numel()
    device = images.device
    images = images.detach()
    maps = maps.detach().to(device).double()
    thresholds = percentile(maps, q)                                    # [B,P]
    strict = (q < 100).to(device)                                       # p = 100 uses <=
    original = _predict(model, images, max_forward_batch)
    constant = channel_values(fill, images)

    def build(idx):
        b, j = idx // n_p, idx % n_p
        thr = thresholds[b, j].view(-1, 1, 1)
        below = torch.where(strict[j].view(-1, 1, 1), maps[b] < thr, maps[b] <= thr)
        return torch.where(below.unsqueeze(1), constant, images[b])

    def reduce(logits, idx):
        return (logits.argmax(dim=1) != original[idx // n_p]).float()

    chunk = chunk_within_budget(max_forward_batch, images.shape[1:], device)  # memory follows one chunk
    return forward_in_chunks(model, batch * n_p, build, reduce, chunk, device).view(batch, n_p)


def salt_and_pepper(images: torch.Tensor, seeds: torch.Tensor | Sequence[int] | None = None,
                    n_copies: int = 20, p: float = 1 / 11, low: float | Sequence[float] = 0.0,
                    high: float | Sequence[float] = 1.0) -> torch.Tensor:
    """Noisy copies for ABELE's stability test: [B,C,H,W] -> [B,n_copies,C,H,W].

    Each pixel (all channels together) becomes ``low`` with probability p and ``high`` with
    probability p, independently; about 2p of the pixels change (18% at ABELE's p = 1/11,
    its 0 and 255 for uint8 images, i.e. 0.0 and 1.0 for [0,1] inputs). Image i's copies
    depend only on seeds[i] (None: 0). ABELE kept only copies with the model's label
    unchanged: pass ``prediction_unchanged(...)`` as ``valid`` to lipschitz_ratios.
    ``low`` and ``high`` may also be one value per channel (normalised inputs).
    """
    check_images(images)
    if not 0 <= p <= 0.5:
        raise ValueError(f"p must be in [0, 0.5] (2p of the pixels change), got {p}")
    if int(n_copies) < 1:
        raise ValueError(f"n_copies must be >= 1, got {n_copies}")
    batch, channels, height, width = images.shape
    seed_list = as_seed_list(seeds, batch)
    draws = torch.stack([torch.rand(int(n_copies), 1, height, width,
                                    generator=generator(s, STREAM_SALT_AND_PEPPER)) for s in seed_list])
    draws = draws.to(images.device)                                     # [B,N,1,H,W]
    copies = images.detach().unsqueeze(1).expand(batch, int(n_copies), channels, height, width)
    copies = torch.where(draws < p, channel_values(low, images), copies)
    return torch.where((draws >= p) & (draws < 2 * p), channel_values(high, images), copies)


def prediction_unchanged(model: torch.nn.Module, images: torch.Tensor, neighbours: torch.Tensor, *,
                         max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH) -> torch.Tensor:
    """[B,N] bool: whether the model's label on each neighbour [B,N,C,H,W] equals its label on
    the image [B,C,H,W]. ABELE's filter for stability copies (and same-label coherence
    neighbours). B * (N + 1) forward passes.
    """
    check_images(images)
    if (neighbours.dim() != 5 or neighbours.shape[0] != images.shape[0]
            or neighbours.shape[2:] != images.shape[1:]):
        raise ValueError(f"neighbours must be [B,N,C,H,W] matching images {tuple(images.shape)}, "
                         f"got {tuple(neighbours.shape)}")
    batch, n = neighbours.shape[:2]
    images = images.detach()
    neighbours = neighbours.detach().to(images.device)
    original = _predict(model, images, max_forward_batch)
    flat = neighbours.reshape(batch * n, *neighbours.shape[2:])
    labels = _predict(model, flat, max_forward_batch).view(batch, n)
    return labels == original.view(batch, 1)


def lipschitz_ratios(maps_x: torch.Tensor, maps_neighbours: torch.Tensor, images: torch.Tensor,
                     neighbours: torch.Tensor, *,
                     valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ABELE's local Lipschitz ratios ||e(x) - e(x')||_2 / ||x - x'||_2, mean and max per image.

    Every array (each map, each image, each neighbour) is min-max scaled to [0,1] on its own
    before the distances are taken, as ABELE's scripts do (a constant array becomes 0).
    Coherence: neighbours are real images with the model's label, near x. Stability: they
    are salt_and_pepper copies of x. Lower is better.

    Args:
        maps_x: [B,H,W] maps of the images.
        maps_neighbours: [B,N,H,W] maps of the neighbours, same method and target.
        images: [B,C,H,W].
        neighbours: [B,N,C,H,W].
        valid: optional [B,N] bool marking the neighbours to use (padding, or copies whose
            label changed); default all.

    Returns:
        (mean [B], max [B]) float32 over the valid neighbours. A neighbour at distance 0
        from x (after scaling) has no ratio and is skipped, as numpy's nan-aware means
        skip ABELE's 0/0; an image without any usable neighbour gets NaN.
    """
    check_maps(maps_x, "maps_x")
    check_images(images)
    batch, height, width = maps_x.shape
    if (maps_neighbours.dim() != 4 or maps_neighbours.shape[0] != batch
            or maps_neighbours.shape[2:] != maps_x.shape[1:]):
        raise ValueError(f"maps_neighbours must be [B,N,H,W] = [{batch},N,{height},{width}], "
                         f"got {tuple(maps_neighbours.shape)}")
    n = maps_neighbours.shape[1]
    if images.shape[0] != batch:
        raise ValueError(f"images has {images.shape[0]} images for {batch} maps")
    if neighbours.dim() != 5 or tuple(neighbours.shape) != (batch, n, *images.shape[1:]):
        raise ValueError(f"neighbours must be [B,N,C,H,W] = {(batch, n, *images.shape[1:])}, "
                         f"got {tuple(neighbours.shape)}")
    if valid is None:
        valid = torch.ones(batch, n, dtype=torch.bool, device=maps_x.device)
    elif tuple(valid.shape) != (batch, n):
        raise ValueError(f"valid must be a bool tensor [B,N] = [{batch},{n}], got {tuple(valid.shape)}")
    device = maps_x.device
    if n == 0:
        nan = torch.full((batch,), float("nan"), device=device)
        return nan, nan.clone()
    ex = minmax_scale(maps_x.detach().double(), 1).unsqueeze(1)
    en = minmax_scale(maps_neighbours.detach().to(device).double(), 2)
    x = minmax_scale(images.detach().to(device).double(), 1).unsqueeze(1)
    xn = minmax_scale(neighbours.detach().to(device).double(), 2)
    d_map = (ex - en).flatten(2).norm(dim=2)                              # [B,N]
    d_input = (x - xn).flatten(2).norm(dim=2)                             # [B,N]
    use = valid.to(device).bool() & (d_input > 0)
    ratio = d_map / torch.where(use, d_input, 1)
    count = use.sum(dim=1)
    mean = torch.where(use, ratio, 0).sum(dim=1) / count.clamp(min=1)
    worst = torch.where(use, ratio, -torch.inf).max(dim=1).values
    nan = torch.full_like(mean, float("nan"))
    return (torch.where(count > 0, mean, nan).float(), torch.where(count > 0, worst, nan).float())
