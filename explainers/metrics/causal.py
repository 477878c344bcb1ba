"""RISE deletion and insertion curves (Petsiuk, Das, Saenko, BMVC 2018), batched.

Deletion starts from the image and replaces its pixels, most salient first, with a
substrate; a faithful map makes the target's probability fall fast (low AUC). Insertion
starts from the substrate and pastes the original pixels back in the same order; a
faithful map makes the probability rise fast (high AUC). Only the map's ranking matters.
"""
from __future__ import annotations

from typing import Sequence

import torch

from saliency_audit.explainers.core.base import chunk_within_budget
from saliency_audit.explainers.core.options import Option
from saliency_audit.explainers.metrics._utils import (
    STREAM_RANDOM_MAP,
    STREAM_TIE_BREAK,
    as_seed_list,
    check_inputs,
    check_max_forward_batch,
    forward_in_chunks,
    gaussian_kernel1d,
    generator,
    separable_filter,
    target_probability,
)
from saliency_audit.explainers.metrics.complexity import gini
from saliency_audit.explainers.metrics.registry import Metric, MetricBatch, register_metric

DEFAULT_MAX_FORWARD_BATCH = 256
SUBSTRATES = ("zero", "blur", "mean")

# RISE's blur for 224 px inputs: an 11x11 Gaussian kernel with sigma 5, i.e. a radius of
# one sigma. Smaller images get a proportionally smaller blur (see blur_substrate).
_RISE_SIZE, _RISE_SIGMA = 224, 5.0
# Cap of the default step count: one image row per step (RISE's setting) up to this many
# rows, so large images do not cost hundreds of forwards per curve.
_MAX_DEFAULT_STEPS = 64
# The job's steps (--metric-steps), at every image size: the fewest (a power of two) whose deletion and
# insertion AUCs at 224 px stay within 0.005 of the 224-step curve's on average and order the methods
# as it does, for 2 x 17 forward passes per map (docs/performance.md, benchmarks/metric_steps.py).
JOB_STEPS = 16


def default_steps(height: int) -> int:
    """The default number of deletion/insertion steps for images of ``height`` rows.

    One image row per step, as RISE's official setting (224 steps at 224x224) and as
    methods.md 15.3 recommends for 28 and 32 px images (28 and 32 steps), capped at 64 so
    large images cost at most 65 forwards per curve. Pass ``steps=224`` for RISE's exact
    ImageNet setting. (The job's metric takes --metric-steps, JOB_STEPS at every size.)
    """
    return max(1, min(int(height), _MAX_DEFAULT_STEPS))


def blur_substrate(images: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
    """A Gaussian-blurred copy of ``images`` [B,C,H,W], each channel on its own.

    sigma: None (default) scales RISE's sigma 5 at 224 px to the image,
        ``5 * min(H, W) / 224``, and never below 1 px (at 28 px the scaled value, 0.6 px,
        would leave the image almost unchanged). Note that at 28-32 px even 1 px keeps
        digits legible, so "zero" or "mean" are the stronger substrates there.
    The kernel radius is round(sigma) (at least 1, at most what the image allows), which
    reproduces RISE's 11x11 / sigma 5 kernel at 224 px. Borders are replicated, not
    zero-padded, so the blur does not darken the image's edges.
    """
    height, width = images.shape[2:]
    if sigma is None:
        sigma = max(1.0, _RISE_SIGMA * min(height, width) / _RISE_SIZE)
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    radius = max(1, min(round(sigma), min(height, width) - 1))
    if min(height, width) < 2:
        return images.clone()
    kernel = gaussian_kernel1d(sigma, radius, device=images.device, dtype=images.dtype)
    return separable_filter(images, kernel, padding_mode="replicate")


def make_substrate(spec: str | float, images: torch.Tensor, blur_sigma: float | None = None) -> torch.Tensor:
    """The substrate image [B,C,H,W] that deleted pixels take (and insertion starts from).

    spec: "zero" (0 in model-input space; black for [0,1] inputs without normalisation),
        "blur" (see blur_substrate), "mean" (each image's per-channel mean) or a number
        (a constant in model-input space).
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full_like(images, float(spec))
    if spec == "zero":
        return torch.zeros_like(images)
    if spec == "blur":
        return blur_substrate(images, blur_sigma)
    if spec == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    raise ValueError(f"unknown substrate {spec!r}; use one of {', '.join(SUBSTRATES)} or a number")


def pixel_ranks(maps: torch.Tensor, seeds: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Rank of every pixel in deletion/insertion order, [B,H,W] int64 (0 = first to go).

    Pixels are ordered by the signed map value, descending (evidence *for* the target goes
    first). Ties are broken by a fixed random permutation of the pixels drawn from seeds[i]
    alone, so an image's order never depends on the rest of its batch. Ties matter for
    piecewise-constant maps (superpixel methods, binary masks); without a random tie-break
    they would be resolved in raster order, which biases the curves.
    """
    batch, height, width = maps.shape
    n_pixels = height * width
    if not maps.is_floating_point():
        maps = maps.float()                     # integer or boolean masks rank the same way
    seed_list = as_seed_list(seeds, batch)
    perms = torch.stack([torch.randperm(n_pixels, generator=generator(s, STREAM_TIE_BREAK))
                         for s in seed_list]).to(maps.device)
    shuffled = maps.reshape(batch, n_pixels).gather(1, perms)
    # A stable sort keeps the random permutation's order among equal values.
    _, order_in_shuffled = torch.sort(shuffled, dim=1, descending=True, stable=True)
    order = perms.gather(1, order_in_shuffled)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n_pixels, device=maps.device).expand(batch, n_pixels))
    return ranks.view(batch, height, width)


Part = tuple  # (images [B,C,H,W], maps [B,H,W], targets [B], seeds [B] or None)
MODES = ("deletion", "insertion")


def causal_curves(model: torch.nn.Module, parts: Sequence[Part], *, modes: Sequence[str] = MODES,
                  steps: int | None = None, substrate: str | float = "zero",
                  max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH,
                  blur_sigma: float | None = None) -> list[dict[str, torch.Tensor]]:
    """The deletion and/or insertion curves of several sets of maps in shared forward chunks.

    parts: (images, maps, targets, seeds) per set, as deletion_curve takes them, e.g. every
        method's maps of one batch; all images of one size. Parts that hold the same images
        tensor share its substrate.
    Every perturbed input of every part and mode goes through the model in one stream of
    chunks of at most ``max_forward_batch`` (within CHUNK_BUDGET_BYTES): k sets of curves cost
    about k times fewer calls than one call stream each, the same forward passes in all.
    Returns per part {mode: [B, steps+1]}, equal to the part's own deletion_curve /
    insertion_curve up to the rounding of other batch compositions (bit-equal for one part
    and one mode).
    """
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be some of {', '.join(MODES)}, got {list(modes)}")
    check_max_forward_batch(max_forward_batch)
    if not parts:
        return []
    for images, maps, targets, _ in parts:
        check_inputs(images, maps, targets)
    shape = parts[0][0].shape[1:]
    if any(part[0].shape[1:] != shape for part in parts):
        raise ValueError(f"every part's images must be {tuple(shape)} (C,H,W), got "
                         f"{sorted({tuple(part[0].shape[1:]) for part in parts})}")
    height, width = shape[1:]
    n_pixels = height * width
    steps = default_steps(height) if steps is None else int(steps)
    if not 1 <= steps <= n_pixels:
        raise ValueError(f"steps must be between 1 and H*W={n_pixels}, got {steps}")
    device = parts[0][0].device
    # Step k has changed the first floor(k*HW/steps) pixels: `steps` chunks whose sizes
    # differ by at most one pixel, and step k sits at x = k/steps on the AUC's axis.
    n_changed = torch.arange(steps + 1, device=device) * n_pixels // steps
    substrates: dict[int, torch.Tensor] = {}
    blocks = []  # per (part, mode): (inside, outside, ranks [B,1,H,W], targets [B]), B*(steps+1) inputs
    for images, maps, targets, seeds in parts:
        if id(images) not in substrates:
            substrates[id(images)] = make_substrate(substrate, images.detach(), blur_sigma)
        base, images = substrates[id(images)], images.detach()
        ranks = pixel_ranks(maps.detach().to(device), seeds).unsqueeze(1)
        for mode in modes:  # deletion puts the substrate where the mask is set; insertion the image
            inside, outside = (base, images) if mode == "deletion" else (images, base)
            blocks.append((inside, outside, ranks, targets.to(device)))
    offsets = [0]
    for block in blocks:
        offsets.append(offsets[-1] + len(block[3]) * (steps + 1))
    owners = torch.cat([block[3].repeat_interleave(steps + 1) for block in blocks])  # each input's target

    def build(idx):  # idx: a contiguous range of inputs (forward_in_chunks' chunks)
        lo, hi, pieces = int(idx[0]), int(idx[-1]) + 1, []
        for (inside, outside, ranks, _), first, last in zip(blocks, offsets, offsets[1:]):
            if lo < last and first < hi:
                local = torch.arange(max(lo, first) - first, min(hi, last) - first, device=device)
                b, k = local // (steps + 1), local % (steps + 1)
                mask = ranks[b] < n_changed[k].view(-1, 1, 1, 1)       # all channels at once
                pieces.append(torch.where(mask, inside[b], outside[b]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def reduce(logits, idx):
        return target_probability(logits, owners[idx])

    chunk = chunk_within_budget(max_forward_batch, shape, device)  # memory follows one chunk
    probs = forward_in_chunks(model, offsets[-1], build, reduce, chunk, device)
    curves = iter(probs[first:last].view(-1, steps + 1) for first, last in zip(offsets, offsets[1:]))
    return [{mode: next(curves) for mode in modes} for _ in parts]


def _causal_curve(mode: str, model, images, maps, targets, *, seeds, **kwargs) -> torch.Tensor:
    return causal_curves(model, [(images, maps, targets, seeds)], modes=(mode,), **kwargs)[0][mode]


def deletion_curve(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                   targets: torch.Tensor, *, steps: int | None = None,
                   substrate: str | float = "zero",
                   seeds: torch.Tensor | Sequence[int] | None = None,
                   max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH,
                   blur_sigma: float | None = None) -> torch.Tensor:
    """RISE deletion curve: the target's probability as the most salient pixels are removed.

    Args:
        model: maps [N,C,H,W] to logits [N,K]; used as is (put it in eval mode first).
        images: [B,C,H,W] float, model-input space. The curves are computed on its device.
        maps: [B,H,W] saliency maps, raw and signed; pixels go in order of descending value.
        targets: [B] class indices whose softmax probability is recorded.
        steps: number of equal chunks of pixels (default None: ``default_steps(H)``, one
            image row per step up to 64).
        substrate: what removed pixels become, all channels at once: "zero" (default),
            "blur", "mean" or a number (see make_substrate).
        seeds: [B] int seeds for the tie-break permutation (None: 0 for every image).
        max_forward_batch: at most this many perturbed images per forward pass (default 256;
            fewer for large images, see saliency_audit.explainers.core.base.CHUNK_BUDGET_BYTES).
        blur_sigma: sigma of the "blur" substrate (default None: see blur_substrate).

    Returns:
        [B, steps+1] float32 probabilities: point 0 is the intact image, point ``steps`` is
        the substrate alone. B*(steps+1) forward passes.
    """
    return _causal_curve("deletion", model, images, maps, targets, steps=steps, substrate=substrate,
                         seeds=seeds, max_forward_batch=max_forward_batch, blur_sigma=blur_sigma)


def insertion_curve(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                    targets: torch.Tensor, *, steps: int | None = None,
                    substrate: str | float = "zero",
                    seeds: torch.Tensor | Sequence[int] | None = None,
                    max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH,
                    blur_sigma: float | None = None) -> torch.Tensor:
    """RISE insertion curve: the target's probability as the most salient pixels come back.

    Starts from the substrate and pastes the original pixels back, most salient first.
    Arguments as in deletion_curve. The default substrate is "zero", like deletion's; RISE
    inserted into a blurred image (``substrate="blur"``), which at 28-32 px stays legible
    and so makes a weak starting point.

    Returns:
        [B, steps+1] float32 probabilities: point 0 is the substrate alone, point ``steps``
        the intact image.
    """
    return _causal_curve("insertion", model, images, maps, targets, steps=steps, substrate=substrate,
                         seeds=seeds, max_forward_batch=max_forward_batch, blur_sigma=blur_sigma)


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under curves [B, n] with the x axis scaled to [0,1] (trapezoid rule) -> [B].

    Equals (sum - first/2 - last/2) / (n - 1), RISE's formula.
    """
    if not isinstance(curve, torch.Tensor) or curve.dim() != 2 or curve.shape[1] < 2:
        shape = tuple(curve.shape) if isinstance(curve, torch.Tensor) else type(curve).__name__
        raise ValueError(f"curve must be a tensor [B, n] with n >= 2 points, got {shape}")
    curve = curve.float()
    return (curve.sum(dim=1) - (curve[:, 0] + curve[:, -1]) / 2) / (curve.shape[1] - 1)


def deletion_auc(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                 targets: torch.Tensor, *, steps: int | None = None,
                 substrate: str | float = "zero",
                 seeds: torch.Tensor | Sequence[int] | None = None,
                 max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH,
                 blur_sigma: float | None = None) -> torch.Tensor:
    """auc(deletion_curve(...)) -> [B]; lower is better. Arguments as in deletion_curve."""
    return auc(deletion_curve(model, images, maps, targets, steps=steps, substrate=substrate,
                              seeds=seeds, max_forward_batch=max_forward_batch, blur_sigma=blur_sigma))


def insertion_auc(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor,
                  targets: torch.Tensor, *, steps: int | None = None,
                  substrate: str | float = "zero",
                  seeds: torch.Tensor | Sequence[int] | None = None,
                  max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH,
                  blur_sigma: float | None = None) -> torch.Tensor:
    """auc(insertion_curve(...)) -> [B]; higher is better. Arguments as in insertion_curve."""
    return auc(insertion_curve(model, images, maps, targets, steps=steps, substrate=substrate,
                               seeds=seeds, max_forward_batch=max_forward_batch, blur_sigma=blur_sigma))


def random_maps(shape: Sequence[int], seeds: torch.Tensor | Sequence[int] | None = None,
                *, device: torch.device | str | None = None) -> torch.Tensor:
    """Seeded random maps [B,H,W] (uniform in [0,1)): the random-order reference.

    Feed them to deletion_auc / insertion_auc in place of an explainer's maps to get the
    AUCs of a random pixel order, the baseline a map must beat. Image i's map depends only
    on seeds[i] (None: 0), from a stream separate from the tie-break permutation, so the
    random order is not the order the tie-break would give a constant map.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (B, H, W), got {shape}")
    batch, height, width = shape
    seed_list = as_seed_list(seeds, batch)
    maps = [torch.rand(height, width, generator=generator(s, STREAM_RANDOM_MAP)) for s in seed_list]
    out = torch.stack(maps) if maps else torch.empty(shape)
    return out.to(device) if device is not None else out


@register_metric
class DeletionInsertion(Metric):
    """RISE deletion and insertion AUCs of every map, their random-order reference, and the map's
    Gini sparsity: on by default (--no-metrics turns them off)."""

    name = "deletion"
    title = "Deletion and insertion"
    columns = {"deletion_auc": "float32", "insertion_auc": "float32", "deletion_auc_random": "float32",
               "insertion_auc_random": "float32", "gini": "float32"}
    options = (
        Option("metrics", "switch", default=True, spec="metrics.enabled", fingerprint=True,
               help="compute explanation-quality metrics: deletion and insertion AUC, their random-order "
                    "reference, Gini sparsity (default on)"),
        Option("metric_steps", "integer", default=JOB_STEPS, low=1, spec="metrics.steps", fingerprint=True,
               help="deletion/insertion steps (default 16 at every image size: 2 x 17 forward passes per map, and "
                    "as many per image for the random order; docs/performance.md)"),
        Option("metric_substrate", "choice", default="zero", choices=SUBSTRATES, spec="metrics.substrate",
               fingerprint=True, help="what deleted pixels become in deletion/insertion (default zero)"),
    )
    switch = "metrics"

    def _aucs(self, items: Sequence[tuple[MetricBatch, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(deletion AUC, insertion AUC) [N] of each (batch, maps), all curves in shared forward chunks."""
        curves = causal_curves(items[0][0].model, [(batch.images, maps, batch.targets, batch.seeds)
                                                   for batch, maps in items],
                               steps=self.settings["metric_steps"], substrate=self.settings["metric_substrate"])
        return [(auc(curve["deletion"]), auc(curve["insertion"])) for curve in curves]

    def reference(self, batch: MetricBatch) -> dict[str, torch.Tensor]:
        """The AUCs of a random pixel order: the level a map must beat."""
        shape = batch.images.shape[:1] + batch.images.shape[2:]
        [(deletion, insertion)] = self._aucs([(batch, random_maps(shape, batch.seeds, device=batch.images.device))])
        return {"deletion_auc_random": deletion, "insertion_auc_random": insertion}

    def score(self, batch: MetricBatch, maps: torch.Tensor, reference: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        return self.score_all([(batch, maps, reference)])[0]

    def score_all(self, items: Sequence[tuple[MetricBatch, torch.Tensor, dict[str, torch.Tensor]]]
                  ) -> list[dict[str, torch.Tensor]]:
        """Every method's deletion and insertion curves of a batch in one stream of forward chunks."""
        if not items:
            return []
        aucs = self._aucs([(batch, maps) for batch, maps, _ in items])
        return [{"deletion_auc": deletion, "insertion_auc": insertion, "gini": gini(maps), **reference}
                for (_, maps, reference), (deletion, insertion) in zip(items, aucs)]

    def check(self, height: int, width: int) -> str | None:
        steps, pixels = self.settings["metric_steps"], height * width
        if steps > pixels:  # each step changes at least one pixel: it would fail on every image
            return (f"--metric-steps {steps} is more than the {pixels} pixels of the model input ({height}x{width}); "
                    f"deletion and insertion change at least one pixel per step: use at most {pixels}")
        return None

    def passes(self, height: int, width: int) -> dict[str, int]:
        curve = self.settings["metric_steps"] + 1
        return {"per_map": 2 * curve, "per_image": 2 * curve, "explanations": 0}

    def convention(self) -> str:
        return ("RISE deletion/insertion AUC of the target's softmax probability, pixels ranked by signed map "
                f"value (ties broken by the image's seed), substrate {self.settings['metric_substrate']!r}, "
                f"{self.settings['metric_steps']} equal steps; *_random: the same for a random order; gini: Gini "
                "index of |map|")
