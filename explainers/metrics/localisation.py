"""Localisation metrics against a ground-truth mask per image, batched.

- pointing_game (Zhang et al., ECCV 2016): does the map's maximum fall in the mask
  (optionally within ``tolerance`` pixels of it, the paper's 15 px at 224 px)?
- relevance_mass_accuracy (Arras et al., CLEVR-XAI 2022): the share of the positive relevance
  that lies inside the mask.
- relevance_rank_accuracy (same paper): with K = |mask|, the share of the K highest-ranked
  pixels that lie inside the mask.

Conventions (Quantus 0.6.0's where sensible; deviations marked *):
- masks [B,H,W]: bool or numbers, nonzero = inside (Quantus's astype(bool)); a shape that
  does not match the maps, or non-finite values, is a ValueError naming ``masks``.
- An empty mask gives NaN with the reason "empty mask" (* Quantus's pointing game returns
  True there: its NaN is written into a bool array). A map with NaN/inf gives NaN with a
  reason: one bad record costs that record, never the batch.
- Signed maps are used as they are (Quantus's abs=False); ``absolute=True`` ranks |map|.
  Quantus's normalise_by_max does not change any of the three scores, so it is not applied.
- * Ties count as a random choice among the tied pixels, computed exactly as its expectation
  (no seed needed): the pointing game scores the share of the tied maxima inside the mask
  (Quantus: 1 if any is inside, so an all-zero map always "hits"), rank accuracy splits the
  K-th place among the tied pixels (Quantus: whatever np.argsort's unstable order gives).
  A constant map therefore scores chance, |mask|/(H*W), in both. Without ties the scores
  equal Quantus's.
- * Relevance mass counts positive relevance only (the paper's definition); Quantus divides
  signed sums, which can leave [0,1] or divide by ~0. ``positive_only=False`` gives Quantus's
  ratio. No positive relevance (or a zero signed total) gives NaN with a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saliency_audit.explainers.metrics.registry import Metric, MetricBatch, register_metric

EMPTY_MASK = "empty mask"
BAD_MAP = "map has NaN or infinite values"
NO_RELEVANCE = "no positive relevance"
ZERO_TOTAL = "relevance sums to zero"


@dataclass(frozen=True)
class LocalisationScores:
    """values: [B] float32 in [0,1] (NaN where undefined); reasons: per image, None or why NaN."""
    values: torch.Tensor
    reasons: tuple[str | None, ...]


def _prepare(maps: torch.Tensor, masks: torch.Tensor, absolute: bool):
    """(maps [B,N] float64 with bad rows zeroed, masks [B,N] bool, finite [B] bool)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor [B,H,W], got {shape}")
    if not isinstance(masks, torch.Tensor) or masks.shape != maps.shape:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a tensor [B,H,W] shaped like maps {tuple(maps.shape)}, got {shape}")
    if masks.is_floating_point() and not bool(torch.isfinite(masks).all()):
        raise ValueError("masks contain NaN or infinite values")
    flat = maps.detach().flatten(1).to(torch.float64)
    finite = torch.isfinite(flat).all(dim=1)
    flat = torch.where(finite.view(-1, 1), flat, 0)
    if absolute:
        flat = flat.abs()
    return flat, masks.detach().flatten(1).to(flat.device) != 0, finite


def _scores(values: torch.Tensor, undefined: list[tuple[torch.Tensor, str]]) -> LocalisationScores:
    """values [B] with NaN (and the first matching reason) wherever a condition [B] holds."""
    reasons: list[str | None] = [None] * len(values)
    for condition, reason in undefined:
        values = torch.where(condition, torch.nan, values)
        for i in torch.nonzero(condition).flatten().tolist():
            reasons[i] = reasons[i] or reason
    return LocalisationScores(values.float(), tuple(reasons))


def _undefined(masks: torch.Tensor, finite: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    return [(~finite, BAD_MAP), (~masks.any(dim=1), EMPTY_MASK)]


def dilate(masks: torch.Tensor, tolerance: float) -> torch.Tensor:
    """masks [B,H,W] bool grown by every pixel within Euclidean distance ``tolerance``."""
    radius = int(math.floor(tolerance))
    if radius < 1:
        return masks
    offsets = torch.arange(-radius, radius + 1, device=masks.device, dtype=torch.float64)
    disk = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2 <= tolerance ** 2).float()
    grown = F.conv2d(masks.float().unsqueeze(1), disk.view(1, 1, *disk.shape), padding=radius)
    return grown.squeeze(1) > 0


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = 0,
                  absolute: bool = False) -> LocalisationScores:
    """1 if the map's maximum lies in the mask (grown by ``tolerance`` pixels), else 0.

    maps: [B,H,W] raw maps; masks: [B,H,W] ground truth (nonzero = object). Tied maxima
    score the share of them inside the mask. tolerance: pixels (Euclidean; 0 = none, the
    default and Quantus's behaviour; Zhang et al. used 15 at 224x224).
    """
    if not (isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
            and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance!r}")
    flat, inside, finite = _prepare(maps, masks, absolute)
    target = dilate(inside.view(maps.shape), tolerance).flatten(1)
    is_max = flat == flat.max(dim=1, keepdim=True).values
    values = (is_max & target).sum(dim=1) / is_max.sum(dim=1)
    return _scores(values, _undefined(inside, finite))


def relevance_mass_accuracy(maps: torch.Tensor, masks: torch.Tensor, *, positive_only: bool = True,
                            absolute: bool = False) -> LocalisationScores:
    """Relevance inside the mask / relevance in the whole map.

    positive_only (default): negative values count as 0 (the paper's definition), so the
    score is in [0,1]; False: Quantus's signed ratio sum(map*mask)/sum(map).
    """
    flat, inside, finite = _prepare(maps, masks, absolute)
    if positive_only:
        flat = flat.clamp_min(0)
    total = flat.sum(dim=1)
    values = (flat * inside).sum(dim=1) / torch.where(total != 0, total, 1)
    undefined = _undefined(inside, finite) + [(finite & (total == 0), NO_RELEVANCE if positive_only else ZERO_TOTAL)]
    return _scores(values, undefined)


def relevance_rank_accuracy(maps: torch.Tensor, masks: torch.Tensor, *,
                            absolute: bool = False) -> LocalisationScores:
    """Share of the K = |mask| highest-valued pixels that lie in the mask.

    Pixels tied with the K-th value fill the remaining places in proportion: with a above the
    tie, t tied of which t_in inside the mask, the score is (a_in + (K - a) * t_in / t) / K.
    """
    flat, inside, finite = _prepare(maps, masks, absolute)
    k = inside.sum(dim=1)
    ordered = flat.sort(dim=1, descending=True).values
    kth = ordered.gather(1, (k - 1).clamp_min(0).view(-1, 1))           # the K-th largest value
    above, tied = flat > kth, flat == kth
    n_above = above.sum(dim=1)
    hits = (above & inside).sum(dim=1) + (k - n_above) * (tied & inside).sum(dim=1) / tied.sum(dim=1)
    values = hits / k.clamp_min(1)
    return _scores(values, _undefined(inside, finite))


@register_metric
class Localisation(Metric):
    """Pointing game, relevance mass and relevance rank against the ground truth the shards carry
    (docs/ground_truth.md); null for an image without ground truth. No option: on wherever there
    is ground truth."""

    name = "localisation"
    title = "Localisation (images with ground truth)"
    columns = {"pointing_game": "float32", "relevance_mass": "float32", "relevance_rank": "float32"}

    def score(self, batch: MetricBatch, maps: torch.Tensor, reference: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        if batch.masks is None:
            return {}
        nan = torch.tensor(float("nan"), device=maps.device)
        scores = {"pointing_game": pointing_game(maps, batch.masks),
                  "relevance_mass": relevance_mass_accuracy(maps, batch.masks),
                  "relevance_rank": relevance_rank_accuracy(maps, batch.masks)}
        return {key: torch.where(batch.has_mask, score.values.to(maps.device).float(), nan)
                for key, score in scores.items()}

    def passes(self, height: int, width: int) -> dict[str, int]:
        return {"per_map": 0, "per_image": 0, "explanations": 0}  # it compares maps with masks: no model

    def convention(self) -> str:
        return ("against the ground truth the shards carry (a KEY.mask.png or KEY.json member, a mask or boxes "
                "column; see docs/ground_truth.md), at the model input's size: pointing_game, relevance_mass "
                "(positive relevance only), relevance_rank; ties count as a random pick among the tied pixels; null "
                "without ground truth")
