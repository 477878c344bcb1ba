"""Batched black-box queries on superpixel masks, shared by lime, anchor and lore.

Each method writes its per-image search as a generator that yields a boolean mask array
[n, S_i] (superpixels on/off) and receives ``(probs, labels)`` for it: the score of that
image's target (BlackBox's ``score``: the softmax probability, or log odds for lime) and the
class each masked image gets alone (near ties decided one at a time).
:func:`run_searches` advances the searches of all images of a batch in lockstep, so every
round sends all images' requests through the model together, in forward passes of at most
``max_forward_batch`` images. An image's search only ever sees its own masks and results,
so its output does not depend on the rest of the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Generator

import numpy as np
import torch

from saliency_audit.explainers.blackbox.superpixels import check_fill, default_options, fill_images, segment_batch
from saliency_audit.explainers.core.base import (
    Explainer,
    alone,
    check_batch,
    check_chunk,
    chunk_within_budget,
    decision_tolerance,
    forward_chunk,
    stable_argmax,
)
from saliency_audit.explainers.core.scores import check_score, target_scores

Search = Generator[np.ndarray, "tuple[np.ndarray, np.ndarray]", Any]


def image_seeds(seeds: torch.Tensor | None, batch: int) -> np.ndarray:
    """seeds [B] int64 -> uint64 numpy (numpy Generators refuse negative seeds, so a
    negative id hash is taken modulo 2**64); None means seed 0 for every image."""
    if seeds is None:
        return np.zeros(batch, dtype=np.uint64)
    seeds = np.asarray(seeds.detach().cpu() if isinstance(seeds, torch.Tensor) else seeds, dtype=np.int64)
    if seeds.shape != (batch,):
        raise ValueError(f"seeds must be [B] with B={batch}, got shape {seeds.shape}")
    return seeds.view(np.uint64)


class EvaluationMemo:
    """Each distinct (image index, key) is evaluated once per batch; ``calls[i]`` counts image
    i's distinct evaluations. Search populations repeat members a lot, and an eval-mode model
    gives the same answer for the same input."""

    def __init__(self, batch: int):
        self.calls = np.zeros(batch, dtype=np.int64)
        self._cache: dict[tuple[int, bytes], object] = {}

    def lookup(self, image_ids: np.ndarray, keys: list[bytes], evaluate: Callable[[np.ndarray], list]) -> list:
        """The values for rows (image_ids[r], keys[r]); ``evaluate(rows)`` computes the new ones."""
        keyed = [(int(i), key) for i, key in zip(image_ids, keys)]
        new: dict[tuple[int, bytes], int] = {}
        for row, key in enumerate(keyed):
            if key not in self._cache and key not in new:
                new[key] = row
        if new:
            rows = np.fromiter(new.values(), dtype=np.int64, count=len(new))
            self._cache.update(zip(new, evaluate(rows)))
            np.add.at(self.calls, image_ids[rows], 1)
        return [self._cache[key] for key in keyed]


class BlackBox:
    """p(target | masked image) for masks over one batch's superpixels.

    images [B,C,H,W] (model-input space), targets [B], segments: B int [H,W] label arrays,
    fill: see :func:`saliency_audit.explainers.blackbox.superpixels.fill_images`. ``calls[i]`` counts the masked
    images of image i that went through the model (distinct images only).
    score: what query returns per mask, in float64: "probability" (softmax of the target,
    default), "log_odds", "margin" or "logit" (see :func:`saliency_audit.explainers.core.scores.target_scores`;
    they keep their resolution where a confident model's probability rounds to exactly 1).

    A superpixel whose fill equals its pixels (black background under a black or mean
    fill, most of a digit's superpixels) is inert: switching it off changes no pixel.
    Masks that differ only in inert superpixels make the same image, so they are
    evaluated once.
    """

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 segments: list[np.ndarray], fill: float | str, max_forward_batch: int,
                 score: str = "probability"):
        check_score(score)
        self.score = score
        self.model = model
        self.device = images.device
        b, c, h, w = images.shape
        seg = torch.as_tensor(np.stack(segments), dtype=torch.long, device=self.device)
        self.flat_segments = seg.reshape(b, h * w)
        self.off = fill_images(images, seg, fill)
        self.delta = images - self.off  # composed = off + delta * mask: one fused op per chunk
        changed = self.delta.abs().amax(dim=1).reshape(b, h * w)
        n_segments = int(seg.max()) + 1
        live = torch.zeros(b, n_segments, device=self.device).scatter_reduce_(
            1, self.flat_segments, changed, "amax", include_self=False)
        self.inert = (live == 0).cpu().numpy()  # [B, S_max]; True past an image's own segments too
        self.targets = targets.to(self.device).long()
        self.max_forward_batch = max_forward_batch
        self.memo = EvaluationMemo(b)

    @property
    def calls(self) -> np.ndarray:
        return self.memo.calls

    def query(self, image_ids: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``masks`` [N, S_max] bool (padded past each image's S) for images ``image_ids`` [N].

        Returns float64 target probabilities [N] and int64 predicted classes [N].
        Each distinct masked image goes through the model once per BlackBox: random masks
        over few live superpixels repeat a lot (anchors fix most bits too), and an eval-mode
        model gives the same answer for the same image.
        Cost: ceil(new / max_forward_batch) forward passes; images are composed per chunk, so
        memory stays at max_forward_batch images whatever N.
        """
        # one canonical mask per image, at the full width so keys match across requests
        canonical = self.inert[image_ids]
        canonical[:, :masks.shape[1]] |= masks
        masks = canonical
        keys = [row.tobytes() for row in np.packbits(masks, axis=1)]

        def evaluate(rows):
            probs, labels = self._forward(image_ids[rows], masks[rows])
            return list(zip(probs.tolist(), labels.tolist()))

        found = self.memo.lookup(image_ids, keys, evaluate)
        return (np.array([p for p, _ in found], dtype=np.float64).reshape(-1),
                np.array([c for _, c in found], dtype=np.int64).reshape(-1))

    def _forward(self, image_ids: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, labels = [], []
        _, c, h, w = self.off.shape
        with torch.inference_mode():
            for start in range(0, len(image_ids), self.max_forward_batch):
                ids = torch.as_tensor(image_ids[start:start + self.max_forward_batch], device=self.device)
                m = torch.as_tensor(masks[start:start + self.max_forward_batch], device=self.device)
                pixels = torch.gather(m, 1, self.flat_segments[ids]).to(self.off.dtype).reshape(-1, 1, h, w)
                composed = self.delta[ids].mul_(pixels).add_(self.off[ids])  # in place: 2 chunk-sized tensors
                logits = self.model(composed)
                # float64: the ridge regression sees small differences between nearby masks
                probs.append(target_scores(logits, self.targets[ids], self.score, torch.float64))
                # the class each masked image gets alone: near ties are recomputed one at a time
                labels.append(stable_argmax(logits.float(), lambda rows: alone(self.model, composed[rows]).float(),
                                            decision_tolerance(logits.dtype))[0])
        return torch.cat(probs).double().cpu().numpy(), torch.cat(labels).cpu().numpy()


def run_searches(blackbox, searches: list[Search]) -> list[Any]:
    """Drive one search per image to completion; returns each search's return value.

    Every round collects the pending requests of all unfinished searches, pads them to a
    common width, queries the model once for all of them and sends each search its slice.
    ``blackbox.query(image_ids [N], rows [N, D])`` returns a tuple of per-row arrays
    (:class:`BlackBox`: superpixel masks; ``saliency_audit.explainers.blackbox.abele``: latent codes).
    """
    results: list[Any] = [None] * len(searches)
    pending: dict[int, np.ndarray] = {}

    def advance(i: int, reply=None) -> None:
        try:
            pending[i] = searches[i].send(reply)
        except StopIteration as stop:
            results[i] = stop.value

    for i in range(len(searches)):
        advance(i)
    while pending:
        order = sorted(pending)
        requests = [pending.pop(i) for i in order]
        sizes = [len(r) for r in requests]
        rows = np.zeros((sum(sizes), max(r.shape[1] for r in requests)), dtype=requests[0].dtype)
        bounds = np.cumsum([0] + sizes)
        for k, r in enumerate(requests):
            rows[bounds[k]:bounds[k + 1], :r.shape[1]] = r
        reply = blackbox.query(np.repeat(np.asarray(order, dtype=np.int64), sizes), rows)
        for k, i in enumerate(order):
            advance(i, tuple(r[bounds[k]:bounds[k + 1]] for r in reply))
    return results


class SuperpixelExplainer(Explainer):
    """Options and set-up shared by the superpixel methods (not registered itself).

    segmentation: "quickshift" (default), "slic", "felzenszwalb" or "grid";
    segmentation_options: overrides of :func:`saliency_audit.explainers.blackbox.superpixels.default_options`;
    min_segments: fewer superpixels trigger a finer re-segmentation (default 4);
    fill: what switched-off superpixels show: "image-mean", "mean" (default here; each method
    sets its own), a number, "blur", see :func:`saliency_audit.explainers.blackbox.superpixels.fill_images`;
    max_forward_batch: most masked images per forward pass (default None: 32 on CPU, 1024 on
    an accelerator, see :func:`saliency_audit.explainers.core.base.forward_chunk`; fewer for large images, see
    saliency_audit.explainers.core.base.CHUNK_BUDGET_BYTES).
    """

    signed = True
    needs_gradients = False  # the model's answers to perturbed images are all it takes

    def __init__(self, model, segmentation: str = "quickshift",
                 segmentation_options: dict | None = None, min_segments: int = 4,
                 fill: float | str = "mean", max_forward_batch: int | None = None):
        super().__init__(model)
        default_options(segmentation, 64, 64)  # fail fast on an unknown name
        if min_segments < 2:
            raise ValueError(f"min_segments must be >= 2, got {min_segments}")
        check_chunk("max_forward_batch", max_forward_batch)
        check_fill(fill)
        self.segmentation = segmentation
        self.segmentation_options = dict(segmentation_options or {})
        self.min_segments = min_segments
        self.fill = fill
        self.max_forward_batch = max_forward_batch

    def _prepare(self, images: torch.Tensor, targets: torch.Tensor, seeds: torch.Tensor | None,
                 score: str = "probability"):
        """Validate, segment and wrap the model: (segments list, BlackBox, uint64 seeds [B]);
        score: what the BlackBox returns, see :class:`BlackBox`."""
        check_batch(images, targets)
        images = images.detach()
        seeds = image_seeds(seeds, images.shape[0])
        segments = segment_batch(images, self.segmentation, self.segmentation_options,
                                 self.min_segments, seeds)
        chunk = chunk_within_budget(forward_chunk(self.max_forward_batch, images.device), images.shape[1:], images.device)
        blackbox = BlackBox(self.model, images, targets, segments, self.fill, chunk, score)
        return segments, blackbox, seeds
