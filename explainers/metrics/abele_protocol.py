"""ABELE's evaluation protocol, a metric of the explain step (opt-in, ``--abele-metrics``).

Per image and method, next to the RISE metrics, so our numbers compare with the paper's
(methods.md 15.1):

- relevance: the label-flip rate as the least relevant pixels are set to the pixel values
  0, 127 and 255, at ABELE's percentiles (min, 5, ..., 95, max). ``relevance_<v>`` is the
  mean over the percentiles (lower: the map tolerates losing more of its least relevant
  pixels); ``relevance_curve`` keeps the 3 x 21 flips, fill-major, to redraw the paper's
  curves.
- stability: Lipschitz ratios against ``neighbours`` salt-and-pepper copies (pixels set to
  0 or 255 with probability 1/11 each), explained by the same method; copies whose label
  changes are dropped, as in ABELE.
- coherence: the same ratios against real neighbours. ABELE drew them from a pool of 9,800
  test images; a batch job has no such pool at hand, so the neighbours are the other images
  of the same batch with the same target and predicted class, nearest first, at most
  ``neighbours`` (no 5th-percentile radius: a batch is too small for one). Batches are cut
  per shard in shard order, so the value still reproduces; an image without such a
  neighbour gets null.

Cost per image and method: 3 x 22 + 21 forward passes plus explaining up to ``neighbours`` copies,
i.e. about ``neighbours`` times the method's own cost: hence opt-in.
"""
from __future__ import annotations

import dataclasses

import torch

from saliency_audit.explainers.core.options import Option
from saliency_audit.explainers.metrics.abele import (ABELE_PERCENTILES, lipschitz_ratios, prediction_unchanged,
                                                     relevance_flip_rate, salt_and_pepper)
from saliency_audit.explainers.metrics.registry import Metric, MetricBatch, register_metric

FILL_VALUES = (0, 127, 255)  # ABELE's colours, as 8-bit pixel values
SCALAR_COLUMNS = tuple(f"relevance_{v}" for v in FILL_VALUES) + (
    "coherence_mean", "coherence_max", "stability_mean", "stability_max")


@dataclasses.dataclass(frozen=True)
class AbeleProtocol:
    neighbours: int = 20
    mean: tuple[float, ...] | None = None  # the run's normalisation, to turn pixel values into model input
    std: tuple[float, ...] | None = None
    max_forward_batch: int = 256

    def model_value(self, pixel: int, channels: int) -> torch.Tensor:
        """8-bit pixel value -> [C] in model-input space (after /255 and mean/std)."""
        value = torch.full((channels,), pixel / 255.0, dtype=torch.float64)
        if self.mean is not None:
            value = value - torch.tensor(self.mean, dtype=torch.float64).expand(channels)
        if self.std is not None:
            value = value / torch.tensor(self.std, dtype=torch.float64).expand(channels)
        return value.float()


def relevance(model, images, maps, targets, protocol: AbeleProtocol) -> dict[str, torch.Tensor]:
    channels = images.shape[1]
    curves = [relevance_flip_rate(model, images, maps, targets,
                                          fill=protocol.model_value(v, channels),
                                          max_forward_batch=protocol.max_forward_batch)
              for v in FILL_VALUES]
    out = {f"relevance_{v}": curve.mean(dim=1) for v, curve in zip(FILL_VALUES, curves)}
    out["relevance_curve"] = torch.cat(curves, dim=1)
    return out


def stability(model, explain, images, maps, targets, seeds, protocol: AbeleProtocol,
              chunk: int) -> dict[str, torch.Tensor]:
    """``explain(images, targets, seeds) -> maps`` is the method under test."""
    batch, channels = images.shape[:2]
    copies = salt_and_pepper(images, seeds, n_copies=protocol.neighbours,
                                     low=protocol.model_value(0, channels),
                                     high=protocol.model_value(255, channels))
    valid = prediction_unchanged(model, images, copies, max_forward_batch=protocol.max_forward_batch)
    n = protocol.neighbours
    flat_valid = valid.reshape(-1).nonzero().squeeze(1)        # only copies that count get explained
    copy_maps = torch.zeros(batch * n, *maps.shape[1:], device=maps.device)
    flat = copies.reshape(batch * n, *images.shape[1:])
    owner = torch.arange(batch, device=images.device).repeat_interleave(n)
    for start in range(0, len(flat_valid), chunk):
        idx = flat_valid[start:start + chunk]
        who = owner[idx]
        copy_maps[idx] = explain(flat[idx], targets[who], seeds[who.cpu()]).to(maps.device).float()
    mean, worst = lipschitz_ratios(maps, copy_maps.view(batch, n, *maps.shape[1:]), images, copies,
                                           valid=valid)
    return {"stability_mean": mean, "stability_max": worst}


def coherence(images, maps, targets, predicted, protocol: AbeleProtocol) -> dict[str, torch.Tensor]:
    """Neighbours from the batch itself: same target and predicted class, nearest first."""
    batch = images.shape[0]
    distance = torch.cdist(images.flatten(1).double(), images.flatten(1).double())
    same = (targets.view(-1, 1) == targets.view(1, -1)) & (predicted.view(-1, 1) == predicted.view(1, -1))
    same &= ~torch.eye(batch, dtype=torch.bool, device=images.device)
    distance = torch.where(same, distance, torch.inf)
    n = min(protocol.neighbours, batch - 1)
    if n < 1:
        nan = torch.full((batch,), float("nan"), device=images.device)
        return {"coherence_mean": nan, "coherence_max": nan.clone()}
    nearest = distance.topk(n, dim=1, largest=False)
    valid = torch.isfinite(nearest.values)
    index = nearest.indices
    mean, worst = lipschitz_ratios(maps, maps[index], images, images[index], valid=valid)
    return {"coherence_mean": mean, "coherence_max": worst}


def abele_metrics(model, explain, images, maps, targets, predicted, seeds, protocol: AbeleProtocol,
                  chunk: int) -> dict[str, torch.Tensor]:
    """All of ABELE's per-image metrics for one method's maps [B,H,W] -> column -> [B] (or [B,63])."""
    return {**relevance(model, images, maps, targets, protocol),
            **stability(model, explain, images, maps, targets, seeds, protocol, chunk),
            **coherence(images, maps, targets, predicted, protocol)}


@register_metric
class AbeleMetrics(Metric):
    """ABELE's relevance, coherence and stability of every map (--abele-metrics)."""

    name = "abele"
    title = "ABELE's evaluation protocol"
    columns = {"relevance_0": "float32", "relevance_127": "float32", "relevance_255": "float32",
               "relevance_curve": "float32[]", "coherence_mean": "float32", "coherence_max": "float32",
               "stability_mean": "float32", "stability_max": "float32"}
    options = (
        Option("abele_metrics", "switch", spec="metrics.abele", fingerprint=True,
               help="also ABELE's relevance, coherence and stability per image (costly: about --abele-neighbours "
                    "times each method's own cost)"),
        Option("abele_neighbours", "integer", default=20, low=1, spec="metrics.abele_neighbours", fingerprint=True,
               help="salt-and-pepper copies for stability, and at most this many same-class batch images for "
                    "coherence (default 20, as ABELE)"),
    )
    switch = "abele_metrics"

    @property
    def protocol(self) -> AbeleProtocol:  # pixel values turn into model input by the run's normalisation
        return AbeleProtocol(self.settings["abele_neighbours"], self.settings.get("mean"), self.settings.get("std"))

    def score(self, batch: MetricBatch, maps: torch.Tensor, reference: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        return abele_metrics(batch.model, lambda x, t, s: batch.explain(x, t, s), batch.images, maps, batch.targets,
                             batch.predicted, batch.seeds, self.protocol, chunk=batch.chunk)

    def passes(self, height: int, width: int) -> dict[str, int]:
        neighbours = self.settings["abele_neighbours"]  # each fill and the copies: the image too, for its label
        return {"per_map": len(FILL_VALUES) * (len(ABELE_PERCENTILES) + 1) + neighbours + 1, "per_image": 0,
                "explanations": neighbours}

    def convention(self) -> str:
        return ("ABELE's protocol (methods.md 15.1): relevance_V = label-flip rate averaged over the percentiles "
                "min,5,...,95,max as pixels below each percentile of the map become pixel value V (0, 127, 255); "
                "relevance_curve = the 3 x 21 flips, fill-major; stability_* = mean/max Lipschitz ratio against "
                f"{self.settings['abele_neighbours']} salt-and-pepper copies (1/11 + 1/11) that keep the label; "
                f"coherence_* = the same against up to {self.settings['abele_neighbours']} nearest images of the same "
                "batch with the same target and predicted class (null if none)")
