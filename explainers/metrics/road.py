"""ROAD: RemOve And Debias (Rong, Leemann et al., ICML 2022), batched.

ROAD removes a fraction of the pixels, most relevant first (MoRF) or least relevant first
(LeRF), and fills each removed pixel by *noisy linear imputation*: the value that makes it
the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12 for the 4 diagonal
ones; neighbours outside the image are dropped and the weights renormalised by their sum),
with the kept pixels fixed, plus Gaussian noise. Unlike a constant substrate the imputed
image carries no trace of the removal mask's shape, so the curves measure the removed
information rather than the mask (the paper's "debiasing"). A faithful map makes the MoRF
curve fall fast and the LeRF curve stay high.

The imputation is the linear system of Quantus's ``noisy_linear_imputation`` (adapted from
the authors' road_evaluation code), solved exactly: one sparse LU factorisation per removal
fraction for the whole batch (the system is block-diagonal across images, one block per
image, all channels as right-hand sides), assembled with array operations instead of a
Python loop per pixel. The solve runs on CPU in float64; the model runs on images.device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
from threadpoolctl import ThreadpoolController

from saliency_audit.explainers.core.base import alone, chunk_within_budget, decision_tolerance, stable_argmax
from saliency_audit.explainers.core.options import Option
from saliency_audit.explainers.metrics._utils import (
    as_seed_list,
    check_images,
    check_maps,
    check_max_forward_batch,
    forward_in_chunks,
    generator,
    target_probability,
)
from saliency_audit.explainers.metrics.causal import pixel_ranks
from saliency_audit.explainers.metrics.registry import Metric, MetricBatch, register_metric

DEFAULT_MAX_FORWARD_BATCH = 256
# Quantus's (and road_evaluation's) defaults: remove 1%, 3%, ..., 99% of the pixels and add
# noise of standard deviation 0.01 (in model-input space) to the imputed pixels.
DEFAULT_PERCENTAGES: tuple[float, ...] = tuple(float(p) for p in range(1, 100, 2))
DEFAULT_NOISE = 0.01
ORDERS = ("morf", "lerf")
# Random stream of the imputation noise (see saliency_audit.explainers.metrics._utils: streams 1-4 are taken);
# index 0 is MoRF's noise, 1 LeRF's, so the two curves never share a draw.
STREAM_ROAD_NOISE = 0x524F4144          # "ROAD"

# (row offset, column offset, weight) of the 8 neighbours, as in the paper.
# Widest band (W+1 for W-pixel-wide images) solved as a banded system, see _solve_spd.
_MAX_BAND = 65
_NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
               (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6))


def removal_counts(percentages: Sequence[float], n_pixels: int) -> list[int]:
    """Pixels removed at each percentage: ``int(n_pixels * p / 100)``, Quantus's rounding."""
    return [int(n_pixels * p / 100) for p in percentages]


def check_percentages(percentages: Sequence[float]) -> tuple[float, ...]:
    """A non-empty sequence of finite numbers in [0, 100); 100% would leave nothing to impute from."""
    try:
        values = tuple(float(p) for p in percentages)
    except (TypeError, ValueError):
        raise ValueError(f"percentages must be a sequence of numbers, got {percentages!r}") from None
    if not values or not all(0 <= p < 100 for p in values):
        raise ValueError(f"percentages must be a non-empty sequence of numbers in [0, 100), got {percentages!r}")
    return values


# Unknowns per sparse solve at most (the images of a batch are solved in groups this size): the
# solver's memory follows the group, never the batch (~0.14 GB per 224 x 224 image).
SOLVE_PIXELS = 2 ** 18


def linear_imputation(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """See _linear_imputation; the batch is solved in groups of at most SOLVE_PIXELS pixels (each
    image's system is its own, so the grouping changes a value by float rounding at most)."""
    group = max(1, SOLVE_PIXELS // max(1, images.shape[2] * images.shape[3]))
    if len(images) <= group:
        return _linear_imputation(images, removed)
    return torch.cat([_linear_imputation(images[i:i + group], removed[i:i + group])
                      for i in range(0, len(images), group)])


def _linear_imputation(images: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Each removed pixel (all channels) replaced by the weighted mean of its 8 neighbours.

    images: [B,C,H,W] float; removed: [B,H,W] bool. Solves, for every removed pixel i,
    ``sum_j w_ij * x_i - sum_{j removed} w_ij * x_j = sum_{j kept} w_ij * x_j`` over its
    in-image neighbours j, the kept pixels fixed (a discrete Laplace equation with the kept
    pixels as boundary values). Every removed region touches a kept pixel unless all pixels
    of an image are removed, so the system has a unique solution; an image with every pixel
    removed is a ValueError. Returns [B,C,H,W] in images.dtype on images.device, kept pixels
    bit-identical. No noise: see noisy_linear_imputation.
    """
    check_images(images)
    batch, channels, height, width = images.shape
    if removed.shape != (batch, height, width):
        raise ValueError(f"removed must be a mask [B,H,W]={(batch, height, width)}, got {tuple(removed.shape)}")
    mask = removed.detach().cpu().numpy().astype(bool)
    if mask.reshape(batch, -1).all(axis=1).any():
        raise ValueError("removed covers every pixel of an image: nothing left to impute from")
    x = images.detach().cpu().to(torch.float64).numpy()
    b_idx, h_idx, w_idx = np.nonzero(mask)          # image-major, so the system is block-diagonal
    n = len(b_idx)
    if n == 0:
        return images.clone()
    variable = np.full(mask.shape, -1, dtype=np.int64)
    variable[b_idx, h_idx, w_idx] = np.arange(n)
    # Kept neighbours go to the right-hand side and in-image weights to the diagonal: both are
    # the stencil convolved (zero padding = no neighbour) over the whole grid, read at the unknowns.
    stencil = torch.zeros(3, 3, dtype=torch.float64)
    for dh, dw, weight in _NEIGHBOURS:
        stencil[1 + dh, 1 + dw] = weight          # symmetric, so correlation = convolution
    kept = torch.from_numpy(~mask).unsqueeze(1)
    grid = torch.cat([torch.from_numpy(x) * kept, torch.ones_like(kept, dtype=torch.float64)], 1)
    summed = torch.nn.functional.conv2d(grid.reshape(-1, 1, height, width), stencil.view(1, 1, 3, 3), padding=1)
    summed = summed.view(batch, channels + 1, height, width).numpy()[b_idx, :, h_idx, w_idx]
    rhs, diagonal = summed[:, :channels], summed[:, channels]
    rows, cols, vals = [], [], []
    for dh, dw, weight in _NEIGHBOURS:
        nh, nw = h_idx + dh, w_idx + dw
        inside = (nh >= 0) & (nh < height) & (nw >= 0) & (nw < width)
        ids, nb, nh, nw = np.nonzero(inside)[0], b_idx[inside], nh[inside], nw[inside]
        unknown = mask[nb, nh, nw]
        rows.append(ids[unknown])
        cols.append(variable[nb[unknown], nh[unknown], nw[unknown]])
        vals.append(np.full(int(unknown.sum()), -weight))
    solution = _solve_spd(np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), diagonal, rhs)
    out = x.copy()
    out[b_idx, :, h_idx, w_idx] = solution
    return torch.from_numpy(out).to(device=images.device, dtype=images.dtype)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """Found once: scanning the loaded libraries costs milliseconds per call."""
    return ThreadpoolController()


def _solve_spd(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, diagonal: np.ndarray,
               rhs: np.ndarray) -> np.ndarray:
    """Solve A x = rhs for the symmetric positive definite A with ``diagonal`` and off-diagonal
    entries (rows, cols, vals) (both triangles). With the unknowns in raster order an entry
    lies at most W+1 places off the diagonal, even across the images of the batch, so
    a banded Cholesky (LAPACK pbsv, O(n * band^2)) solves the whole batch in one call; it
    beats a sparse LU up to about 64-pixel-wide images, above which SuperLU's fill-reducing
    ordering wins and is used instead."""
    n = len(diagonal)
    upper = cols > rows
    band = int((cols[upper] - rows[upper]).max()) if upper.any() else 0
    if band <= _MAX_BAND:
        banded = np.zeros((band + 1, n))
        banded[band] = diagonal
        banded[band + rows[upper] - cols[upper], cols[upper]] = vals[upper]
        # One BLAS thread: the band is too narrow to split, and OpenBLAS's threads only contend
        # (100x slower measured on 2 shared cores).
        with _blas_controller().limit(limits=1, user_api="blas"):
            return scipy.linalg.solveh_banded(banded, rhs, check_finite=False)
    ids = np.arange(n)
    matrix = scipy.sparse.csc_matrix((np.concatenate([vals, diagonal]),
                                      (np.concatenate([rows, ids]), np.concatenate([cols, ids]))), shape=(n, n))
    return scipy.sparse.linalg.splu(matrix).solve(rhs)


def noisy_linear_imputation(images: torch.Tensor, removed: torch.Tensor, noise: float,
                            generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """linear_imputation plus N(0, noise^2) on every removed pixel and channel.

    generators: one CPU generator per image (each draws a full [C,H,W] standard normal, so
    an image's noise depends only on its generator's state, never on the batch); None only
    with noise 0.
    """
    imputed = linear_imputation(images, removed)
    if noise == 0:
        return imputed
    draws = torch.stack([torch.randn(images.shape[1:], generator=g, dtype=torch.float64) for g in generators])
    draws = (noise * draws).to(device=images.device, dtype=images.dtype)
    return torch.where(removed.to(images.device).unsqueeze(1), imputed + draws, imputed)


@dataclass(frozen=True)
class RoadCurves:
    """ROAD curves of a batch, one point per removal percentage.

    morf / lerf: [B,P] float32 softmax probability of the target after removing the most /
        least relevant p% of the pixels.
    morf_correct / lerf_correct: [B,P] bool, whether the prediction is still the target
        (Quantus's per-image ROAD value; the paper's curves are its mean over images).
    morf_auc / lerf_auc: [B] areas under the probability curves (see curve_auc).
    reasons: per image, None or why its values are NaN (then its *_correct are False).
    """
    percentages: tuple[float, ...]
    morf: torch.Tensor
    lerf: torch.Tensor
    morf_correct: torch.Tensor
    lerf_correct: torch.Tensor
    morf_auc: torch.Tensor
    lerf_auc: torch.Tensor
    reasons: tuple[str | None, ...]

    @property
    def gap(self) -> torch.Tensor:
        """lerf_auc - morf_auc [B]: higher is better (removing the important pixels hurts more)."""
        return self.lerf_auc - self.morf_auc


def curve_auc(curve: torch.Tensor, percentages: Sequence[float]) -> torch.Tensor:
    """Trapezoid area of ``curve`` [B,P] over x = percentages/100, divided by the x span, so it
    is the curve's mean height in [0,1] whatever the percentages; one point: that point."""
    if curve.shape[1] == 1:
        return curve[:, 0].clone()
    x = torch.tensor(percentages, dtype=torch.float64, device=curve.device) / 100
    area = torch.trapezoid(curve.double(), x, dim=1)
    return (area / (x[-1] - x[0])).float()


def _curve(model, images, ranks, targets, counts, noise, seed_list, order_index, max_forward_batch):
    """Probability and still-correct flag [B,P] after removing the first counts[k] ranked pixels."""
    gens = [generator(s, STREAM_ROAD_NOISE, order_index) for s in seed_list]
    batch = images.shape[0]
    chunk = chunk_within_budget(max_forward_batch, images.shape[1:], images.device)
    tolerance = None
    probs, correct = [], []
    for count in counts:
        perturbed = noisy_linear_imputation(images, ranks < count, noise, gens)
        logits = forward_in_chunks(model, batch, lambda idx: perturbed[idx], lambda out, idx: out,
                                   chunk, images.device)
        if tolerance is None:
            tolerance = decision_tolerance(logits.dtype)
        # The still-correct flag is a decision: recompute near-tied rows alone (batch independence).
        with torch.inference_mode():
            classes, _ = stable_argmax(logits, lambda rows: alone(model, perturbed[rows.to(images.device)]),
                                       tolerance)
        probs.append(target_probability(logits, targets))
        correct.append(classes == targets)
    return torch.stack(probs, 1), torch.stack(correct, 1)


def road(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, *,
         percentages: Sequence[float] = DEFAULT_PERCENTAGES, noise: float = DEFAULT_NOISE,
         orders: Sequence[str] = ORDERS, seeds: torch.Tensor | Sequence[int] | None = None,
         max_forward_batch: int = DEFAULT_MAX_FORWARD_BATCH) -> RoadCurves:
    """ROAD MoRF and LeRF curves with noisy linear imputation.

    Args:
        model: maps [N,C,H,W] to logits [N,K]; used as is (put it in eval mode first).
        images: [B,C,H,W] float, model-input space (the noise is added there).
        maps: [B,H,W] raw signed maps. MoRF removes pixels in order of descending value,
            LeRF ascending; ties are broken by a random permutation drawn from seeds[i]
            (pixel_ranks), so a constant map removes pixels in a random order. An image whose
            map has NaN/inf gets NaN curves and a reason instead of failing the batch.
        targets: [B] class indices.
        percentages: removal percentages in [0, 100) (default 1, 3, ..., 99, Quantus's);
            int(H*W*p/100) pixels are removed at p, all channels of a pixel together.
        noise: standard deviation of the Gaussian noise on imputed pixels (default 0.01, the
            paper's and Quantus's); 0 gives the plain linear imputation.
        orders: which curves to compute, any of "morf", "lerf" (the other's fields are empty
            [B,0] and its AUC NaN).
        seeds: [B] int seeds for the tie-break order and the noise (None: 0 for every image).
        max_forward_batch: at most this many images per forward pass.

    Cost: one sparse LU per percentage and order for the whole batch; B*P forwards per order.
    """
    check_images(images)
    check_maps(maps.detach().float().nan_to_num(0.0, 0.0, 0.0), batch=images.shape[0],
               size=tuple(images.shape[2:]))
    if not isinstance(targets, torch.Tensor) or targets.shape != (images.shape[0],) or targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor [B] with B={images.shape[0]}, got "
                         f"{getattr(targets, 'dtype', type(targets).__name__)} {tuple(getattr(targets, 'shape', ()))}")
    check_max_forward_batch(max_forward_batch)
    percentages = check_percentages(percentages)
    if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    orders = tuple(orders)
    if not orders or any(o not in ORDERS for o in orders) or len(set(orders)) != len(orders):
        raise ValueError(f"orders must be a non-empty subset of {ORDERS}, got {orders!r}")
    batch, _, height, width = images.shape
    seed_list = as_seed_list(seeds, batch)
    device = images.device
    images, targets = images.detach(), targets.to(device)
    maps = maps.detach().float().to(device)
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    maps = torch.where(finite.view(-1, 1, 1), maps, 0)       # a bad map costs its own image only
    counts = removal_counts(percentages, height * width)
    empty = torch.empty(batch, 0, device=device)
    results = {}
    for order_index, order in enumerate(ORDERS):
        if order not in orders:
            results[order] = (empty, empty.bool())
            continue
        ranks = pixel_ranks(maps if order == "morf" else -maps, seed_list).to(device)
        results[order] = _curve(model, images, ranks, targets, counts, float(noise), seed_list,
                                order_index, max_forward_batch)
    nan = torch.tensor(float("nan"), device=device)
    out = {}
    for order, (prob, correct) in results.items():
        prob = torch.where(finite.view(-1, 1), prob, nan)
        out[order] = prob
        out[order + "_correct"] = correct & finite.view(-1, 1)
        out[order + "_auc"] = curve_auc(prob, percentages) if prob.shape[1] else torch.full((batch,), nan.item())
    reasons = tuple(None if ok else "map has NaN or infinite values" for ok in finite.tolist())
    return RoadCurves(percentages=percentages, reasons=reasons, **out)


@register_metric
class Road(Metric):
    """ROAD's MoRF and LeRF AUCs and their gap, per map (--road: costly, so opt-in)."""

    name = "road"
    title = "ROAD"
    columns = {"road_morf_auc": "float32", "road_lerf_auc": "float32", "road_gap": "float32"}
    options = (Option("road", "switch", spec="metrics.road", fingerprint=True,
                      help="also ROAD per image (Rong et al. 2022): the target's probability as 1-99%% of the pixels "
                           "are removed most and least relevant first and filled by noisy linear imputation (costly: "
                           "100 forward passes and 100 sparse solves per image and method)"),)
    switch = "road"

    def score(self, batch: MetricBatch, maps: torch.Tensor, reference: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        curves = road(batch.model, batch.images, maps, batch.targets, seeds=batch.seeds)
        return {"road_morf_auc": curves.morf_auc, "road_lerf_auc": curves.lerf_auc, "road_gap": curves.gap}

    def passes(self, height: int, width: int) -> dict[str, int]:
        return {"per_map": len(ORDERS) * len(DEFAULT_PERCENTAGES), "per_image": 0, "explanations": 0}

    def convention(self) -> str:
        return ("ROAD (Rong et al. 2022): target softmax probability after removing 1, 3, ..., 99% of the pixels, "
                "most relevant first (road_morf_auc) and least relevant first (road_lerf_auc), ties broken by the "
                "image's seed; removed pixels filled by noisy linear imputation (8-neighbour weights 1/6 and 1/12, "
                "noise std 0.01 in model-input space); AUC = the curve's mean height; road_gap = LeRF - MoRF")
