"""XRAI: region attributions from integrated gradients (Kapishnikov et al., ICCV 2019).

Follows PAIR's reference implementation (the ``saliency`` package, saliency.core.xrai, "full"
algorithm): integrated gradients from a black and a white baseline (PAIR: the image's own
minimum and maximum), averaged; Felzenszwalb over-segmentations at six scales of the image
resized to 224x224, each segment's mask dilated; then a greedy pass that keeps adding the
segment whose not-yet-covered part has the highest mean attribution.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS
from scipy import ndimage
from skimage.morphology import disk
from skimage.segmentation import felzenszwalb
from skimage.transform import resize

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.gradient.integrated_gradients import IntegratedGradients

# PAIR's settings (saliency.core.xrai); the pixel counts hold at its 224 x 224 working size.
PAIR_SCALES = (50, 100, 150, 250, 500, 1200)
PAIR_SIZE = 224
PAIR_DILATION_RADIUS = 5  # pixels of the image as given (PAIR applies it after resizing back)
PAIR_MIN_PIXEL_DIFF = 50  # likewise
IMAGE_BASELINES = ("min", "max")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _segmentation_input(image: np.ndarray, size: int | None) -> np.ndarray:
    """[C,H,W] -> [h,w,C] float64 rescaled to [-1, 1] and resized to size x size (PAIR's
    _normalize_image); a constant image becomes all zeros rather than NaN."""
    image = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) * 2 - 1 if hi > lo else np.zeros_like(image)
    if size is None:
        return image
    return resize(image, (size, size), order=3, mode="constant", preserve_range=True, anti_aliasing=True)


def xrai_segments(image: np.ndarray, scales: Sequence[float] = PAIR_SCALES, sigma: float = 0.8,
                  min_size: int = 150, size: int | None = PAIR_SIZE,
                  dilation_radius: int = PAIR_DILATION_RADIUS) -> np.ndarray:
    """XRAI's candidate regions for one image [C,H,W]: bool [S,H,W], every segment of every
    scale's Felzenszwalb segmentation (on the image resized to size x size, labels resized back
    by nearest neighbour), dilated by a disk of ``dilation_radius`` pixels. The same masks, in
    the same order, as PAIR's _get_segments_felzenszwalb (empty ones included: harmless)."""
    height, width = image.shape[1:]
    work = _segmentation_input(image, size)
    masks = []
    for scale in scales:
        labels = felzenszwalb(work, scale=scale, sigma=sigma, min_size=min_size)
        if size is not None:
            labels = resize(labels, (height, width), order=0, preserve_range=True, mode="constant",
                            anti_aliasing=False).astype(int)
        masks.append(labels[None] == np.arange(labels.min(), labels.max() + 1)[:, None, None])
    masks = np.concatenate(masks)
    if dilation_radius:
        footprint = disk(dilation_radius).astype(bool)
        masks = np.stack([_dilate(m, footprint, dilation_radius) for m in masks])
    return masks


def _dilate(mask: np.ndarray, footprint: np.ndarray, radius: int) -> np.ndarray:
    """binary_dilation(mask, footprint) computed on the mask's bounding box grown by the radius
    only: the same result, at the cost of the segment's size rather than the image's (a whole-image
    dilation per segment took 27 s of a 512 px image's 28)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    out = np.zeros_like(mask)
    if not len(rows):
        return out
    top, left = max(rows[0] - radius, 0), max(cols[0] - radius, 0)
    bottom, right = min(rows[-1] + radius + 1, mask.shape[0]), min(cols[-1] + radius + 1, mask.shape[1])
    out[top:bottom, left:right] = ndimage.binary_dilation(mask[top:bottom, left:right], footprint)
    return out


def xrai_greedy(attribution: np.ndarray, masks: np.ndarray, min_pixel_diff: int = PAIR_MIN_PIXEL_DIFF,
                area_threshold: float = 1.0) -> tuple[np.ndarray, int]:
    """PAIR's XRAI._xrai: returns (map [H,W] float64, regions added).

    Repeatedly add the mask whose part not yet covered (at least ``min_pixel_diff`` pixels) has
    the highest mean attribution (ties: the earlier mask); its new pixels get that mean. Stops
    when the covered share exceeds ``area_threshold`` or no mask adds enough; pixels never
    covered get their own mean. So the map sums to the attribution's sum. Non-finite attributions
    give an all-NaN map (the pipeline then records that image's error), not a half-NaN ranking.
    PAIR recomputes every mask's gain from full-image masks at each step (O(S^2 HW)); here each
    mask's uncovered pixel count and attribution sum are kept and only the newly covered pixels
    are subtracted, so a pixel is visited once per mask holding it (O(S HW) in all).
    """
    flat = masks.reshape(len(masks), -1)
    values = np.asarray(attribution, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        return np.full(attribution.shape, np.nan), 0
    counts = np.count_nonzero(flat, axis=1)
    # bool @ float64 skips BLAS (~10x slower); converting 64 masks at a time bounds the copy
    sums = np.concatenate([flat[i:i + 64].astype(np.float64) @ values for i in range(0, len(flat), 64)])
    by_pixel = np.ascontiguousarray(flat.T)  # [HW, S]: a pixel's masks in one row, so gathering new pixels is cheap
    alive = np.ones(len(flat), dtype=bool)
    covered = np.zeros(values.shape, dtype=bool)
    out = np.full(values.shape, np.nan)
    regions = n_covered = 0
    while n_covered / values.size <= area_threshold:
        alive &= counts >= min_pixel_diff
        candidates = np.flatnonzero(alive)
        if not len(candidates):
            break
        gains = sums[candidates] / counts[candidates]
        best = candidates[np.argmax(np.where(np.isnan(gains), -np.inf, gains))]
        new = np.flatnonzero(flat[best] & ~covered)
        out[new] = values[new].mean()  # as PAIR computes it: the kept sums carry ~1e-12 rounding
        covered[new] = True
        n_covered += len(new)
        alive[best] = False
        holders = by_pixel[new]  # [new pixels, S]
        counts -= np.count_nonzero(holders, axis=0)
        sums -= values[new] @ holders.astype(np.float64)
        regions += 1
    if not covered.all():
        out[~covered] = values[~covered].mean()
    return out.reshape(attribution.shape), regions


@register
class XRAI(Explainer):
    """XRAI: the map's value at a pixel is the mean integrated-gradients attribution over the
    region it was added with, regions chosen greedily from multi-scale Felzenszwalb segments
    (best first). Signed: late regions can have a negative mean. The map sums to the averaged
    IG attribution's sum.

    n_steps, method, max_expanded_batch: integrated gradients' options (see ``intg``), used for
        each of the two baselines. n_steps defaults to PAIR's 100.
    baselines: the IG baselines whose attributions are averaged: each a number (a constant in
        model-input space) or "min" / "max", the image's own minimum / maximum over all its
        values (PAIR's default, black and white whatever the normalisation). Images that share
        a baseline value share IG passes.
    scales, sigma, min_size, segment_size: Felzenszwalb's settings at PAIR's working size
        (segment_size x segment_size, 224; None: segment at the image's own size).
    dilation_radius: each segment grows by a disk of this radius, in pixels of the input image.
        None (default): PAIR's 5 px scaled to the image, round(5 * min(H,W) / 224) (5 at 224 px,
        1 on 28 x 28 digits, where 5 px would swell every segment by a third of the image).
    min_pixel_diff: a segment is dropped once it would add fewer new pixels. None (default):
        PAIR's 50 scaled to the image's area, at least 1.
    area_threshold: stop once this share of the image is covered (PAIR's default 1.0: all); the
        rest becomes one region with its own mean.

    Channels: IG's attribution is summed over channels (as everywhere here); PAIR takes the
    maximum over channels, which is the same for one-channel images.
    Extras: convergence_delta, the mean of the two IG runs' (see ``intg``); n_regions, the
    regions the greedy pass added. Cost: 2 n_steps forward + backward passes per image, plus
    one Felzenszwalb segmentation per scale at segment_size on the CPU (~0.4 s per image on one
    core: 2 images/s on the demo CNN against 14 for ``intg`` at 100 steps; segment_size=None with a
    smaller min_size and scales segments 28 x 28 digits ~8x faster), and per segment a mask and
    its dilation at the input's size: a few hundred H x W masks, so --resize large photographs.
    Region values are not monotone in the order added: covering pixels can raise another
    segment's mean over what is left (PAIR ranks its regions by value for that reason).
    """

    name = "xrai"
    signed = True
    extras = {"convergence_delta": "float32", "n_regions": "int64"}

    def __init__(self, model, n_steps: int = 100, method: str = "gausslegendre",
                 baselines: Sequence[float | str] = IMAGE_BASELINES,
                 scales: Sequence[float] = PAIR_SCALES, sigma: float = 0.8, min_size: int = 150,
                 segment_size: int | None = PAIR_SIZE, dilation_radius: int | None = None,
                 min_pixel_diff: int | None = None, area_threshold: float = 1.0,
                 max_expanded_batch: int | None = None):
        super().__init__(model)
        if not _is_int(n_steps) or n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"method must be one of {', '.join(SUPPORTED_METHODS)}, got {method!r}")
        if (isinstance(baselines, str) or not isinstance(baselines, Sequence) or not baselines
                or not all(b in IMAGE_BASELINES or _is_number(b) for b in baselines)):
            raise ValueError(f"baselines must be a non-empty list of numbers or 'min'/'max', got {baselines!r}")
        if (isinstance(scales, str) or not isinstance(scales, Sequence) or not scales
                or not all(_is_number(s) and s > 0 for s in scales)):
            raise ValueError(f"scales must be a non-empty list of numbers > 0, got {scales!r}")
        if not _is_number(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")
        if not _is_int(min_size) or min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
        for option, value, low in (("segment_size", segment_size, 2), ("dilation_radius", dilation_radius, 0),
                                   ("min_pixel_diff", min_pixel_diff, 1), ("max_expanded_batch", max_expanded_batch, 1)):
            if value is not None and (not _is_int(value) or value < low):
                raise ValueError(f"{option} must be an integer >= {low} or None, got {value!r}")
        if not _is_number(area_threshold) or not 0 < area_threshold <= 1:
            raise ValueError(f"area_threshold must be a number in (0, 1], got {area_threshold!r}")
        self.n_steps, self.method, self.max_expanded_batch = n_steps, method, max_expanded_batch
        self.baselines, self.scales = tuple(baselines), tuple(scales)
        self.sigma, self.min_size, self.segment_size = float(sigma), min_size, segment_size
        self.dilation_radius, self.min_pixel_diff = dilation_radius, min_pixel_diff
        self.area_threshold = float(area_threshold)

    def passes(self):
        return {"forward": len(self.baselines) * self.n_steps, "backward": len(self.baselines) * self.n_steps}

    def _ig(self, baseline: float) -> IntegratedGradients:
        return IntegratedGradients(self.model, n_steps=self.n_steps, method=self.method, baseline=baseline,
                                   max_expanded_batch=self.max_expanded_batch)

    def attributions(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IG maps [B,H,W] and convergence deltas [B], averaged over the baselines. A per-image
        baseline ("min"/"max") runs one batched IG per distinct value (one for most datasets:
        decoded images share their black and white)."""
        maps = torch.zeros(images.shape[0], *images.shape[2:], dtype=images.dtype, device=images.device)
        deltas = torch.zeros(images.shape[0], device=images.device)
        flat = images.detach().flatten(1)
        for spec in self.baselines:
            if spec == "min":
                values = flat.amin(dim=1)
            elif spec == "max":
                values = flat.amax(dim=1)
            else:
                values = torch.full((len(images),), float(spec), dtype=images.dtype, device=images.device)
            maps[~torch.isfinite(values)] = float("nan")  # a NaN image gets a NaN map, not a silent zero
            for value in torch.unique(values[torch.isfinite(values)]):
                rows = torch.nonzero(values == value).reshape(-1)
                result = self._ig(float(value)).explain(images[rows], targets[rows])
                maps[rows] += result.maps
                deltas[rows] += result.extras["convergence_delta"].to(deltas.device)
        return maps / len(self.baselines), deltas / len(self.baselines)

    def resolved(self, height: int, width: int) -> tuple[int, int]:
        """(dilation_radius, min_pixel_diff) for an image of this size."""
        radius = self.dilation_radius
        if radius is None:
            radius = round(PAIR_DILATION_RADIUS * min(height, width) / PAIR_SIZE)
        diff = self.min_pixel_diff
        if diff is None:
            diff = max(1, round(PAIR_MIN_PIXEL_DIFF * height * width / PAIR_SIZE ** 2))
        return radius, diff

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        targets = targets.to(images.device).long()
        attributions, deltas = self.attributions(images.detach(), targets)
        radius, diff = self.resolved(*images.shape[2:])
        pixels = images.detach().float().cpu().numpy()
        maps, regions = [], []
        for image, attribution in zip(pixels, attributions.detach().cpu().double().numpy()):
            masks = xrai_segments(image, self.scales, self.sigma, self.min_size, self.segment_size, radius)
            xrai_map, n = xrai_greedy(attribution, masks, diff, self.area_threshold)
            maps.append(xrai_map)
            regions.append(n)
        maps = torch.as_tensor(np.stack(maps), dtype=attributions.dtype, device=images.device) \
            if maps else attributions.clone()
        return Explanation(maps, {"convergence_delta": deltas.float(),
                                  "n_regions": torch.tensor(regions, dtype=torch.int64)})
