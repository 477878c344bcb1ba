"""Anchors on superpixels (Ribeiro, Singh, Guestrin, AAAI 2018), batched across images."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import xlogy

from saliency_audit.explainers.blackbox.search import SuperpixelExplainer, run_searches
from saliency_audit.explainers.blackbox.superpixels import describe, paint
from saliency_audit.explainers.core.base import Explanation
from saliency_audit.explainers.core.registry import register


def kl_bernoulli(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    q = np.clip(q, 1e-12, 1 - 1e-12)
    return xlogy(p, p) - xlogy(p, q) + xlogy(1 - p, 1 - p) - xlogy(1 - p, 1 - q)


def kl_upper(p: np.ndarray, level: np.ndarray, iters: int = 20) -> np.ndarray:
    """Largest q >= p with KL(p||q) <= level (bisection, elementwise): an upper confidence bound."""
    p, level = np.broadcast_arrays(np.asarray(p, float), np.asarray(level, float))
    lo, hi = p.copy(), np.minimum(1.0, p + np.sqrt(level / 2))  # Pinsker: the root is below this
    for _ in range(iters):
        mid = (lo + hi) / 2
        inside = kl_bernoulli(p, mid) <= level
        lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
    return hi


def kl_lower(p: np.ndarray, level: np.ndarray, iters: int = 20) -> np.ndarray:
    """Smallest q <= p with KL(p||q) <= level (bisection, elementwise): a lower confidence bound."""
    p, level = np.broadcast_arrays(np.asarray(p, float), np.asarray(level, float))
    lo, hi = np.maximum(0.0, p - np.sqrt(level / 2)), p.copy()
    for _ in range(iters):
        mid = (lo + hi) / 2
        inside = kl_bernoulli(p, mid) <= level
        lo, hi = np.where(inside, lo, mid), np.where(inside, mid, hi)
    return lo


def lucb_beta(n_arms: int, t: int, delta: float) -> float:
    """KL-LUCB exploration rate (Kaufmann & Kalyanakrishnan 2013): alpha=1.1, k=405.5."""
    temp = math.log(405.5 * n_arms * t ** 1.1 / delta)
    return temp + math.log(temp)


class _Samples:
    """One image's labelled perturbations, reused for every anchor they are valid for.

    A sample drawn for anchor A is a sample of D(.|T) for any T that contains A and whose
    superpixels all happen to be on in it, since the remaining bits stay independent
    Bernoulli(p); samples drawn for other anchors are biased for T and are not reused.
    """

    def __init__(self, n_features: int):
        self.n_features = n_features
        self.chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, on: np.ndarray, forced: np.ndarray, positive: np.ndarray) -> None:
        self.chunks.append((on, forced, positive))

    def counts(self, anchor: tuple[int, ...]) -> list[int]:
        """[samples, positives] valid for ``anchor``."""
        if not self.chunks:
            return [0, 0]
        on, forced, positive = (np.concatenate(a) for a in zip(*self.chunks))
        self.chunks = [(on, forced, positive)]
        outside = np.ones(self.n_features, dtype=bool)
        outside[list(anchor)] = False
        valid = on[:, list(anchor)].all(1) & ~forced[:, outside].any(1)
        return [int(valid.sum()), int(positive[valid].sum())]


def anchor_search(n_features: int, target: int, rng: np.random.Generator, *, threshold: float,
                  delta: float, tau: float, batch_size: int, beam_size: int, coverage_samples: int,
                  min_samples_start: int, max_anchor_size: int | None, stop_on_first: bool,
                  epsilon_stop: float, p_sample: float):
    """One image's anchor beam search, as a generator for :func:`run_searches`.

    Yields masks [n, S]; receives (probs, labels); a sample is positive when the label is
    ``target``. Returns (anchor ids sorted, precision estimate, coverage).
    """
    samples = _Samples(n_features)
    stats: dict[tuple[int, ...], list[int]] = {}
    cover = rng.random((coverage_samples, n_features)) < p_sample  # drawn once, no model calls

    def coverage(anchor):
        return float(cover[:, list(anchor)].all(1).mean()) if anchor else 1.0

    def precision(anchor):
        n, pos = stats[anchor]
        return pos / max(n, 1), n

    def draw(anchors, n):
        on = rng.random((len(anchors) * n, n_features)) < p_sample
        forced = np.zeros_like(on)
        for k, anchor in enumerate(anchors):
            forced[k * n:(k + 1) * n, list(anchor)] = True
        on |= forced
        _, labels = yield on
        positive = labels == target
        samples.add(on, forced, positive)
        for k, anchor in enumerate(anchors):
            stats[anchor][0] += n
            stats[anchor][1] += int(positive[k * n:(k + 1) * n].sum())

    def track(anchors):
        for anchor in anchors:
            if anchor not in stats:
                stats[anchor] = samples.counts(anchor)

    def lucb(anchors, top_n):
        """KL-LUCB: the top_n most precise anchors, within tau, with confidence 1 - delta."""
        track(anchors)
        unseen = [a for a in anchors if stats[a][0] == 0]
        if unseen:
            yield from draw(unseen, 1)
        if len(anchors) <= top_n:
            return list(anchors)
        t = 1
        while True:
            n = np.array([stats[a][0] for a in anchors], dtype=float)
            means = np.array([stats[a][1] for a in anchors], dtype=float) / n
            order = np.argsort(means, kind="stable")
            best, rest = order[-top_n:], order[:-top_n]
            level = lucb_beta(len(anchors), t, delta) / n
            ub = kl_upper(means[rest], level[rest])
            lb = kl_lower(means[best], level[best])
            ut, lt = rest[np.argmax(ub)], best[np.argmin(lb)]
            if ub.max() - lb.min() <= tau:
                return [anchors[i] for i in best[::-1]]
            yield from draw([anchors[ut], anchors[lt]], batch_size)
            t += 1

    def settle(anchors, beta):
        """Sample until each anchor's bounds sit clearly above or below the threshold."""
        while True:
            open_ = []
            for anchor in anchors:
                mean, n = precision(anchor)
                if ((mean >= threshold and kl_lower(mean, beta / n) < threshold - epsilon_stop)
                        or (mean < threshold and kl_upper(mean, beta / n) >= threshold + epsilon_stop)):
                    open_.append(anchor)
            if not open_:
                return
            yield from draw(open_, batch_size)

    def eligible(anchor, beta):
        mean, n = precision(anchor)
        return mean >= threshold and kl_lower(mean, beta / n) > threshold - epsilon_stop

    # The empty anchor: is the label kept whatever the image shows?
    track([()])
    yield from draw([()], max(1, min_samples_start))
    beta = math.log(1 / delta)
    yield from settle([()], beta)
    if eligible((), beta):
        return (), precision(())[0], 1.0

    beta = math.log(1 / (delta / (1 + (beam_size - 1) * n_features)))
    best_of_size: dict[int, list[tuple[int, ...]]] = {0: [()]}
    best, best_coverage = None, -1.0
    for size in range(1, (max_anchor_size or n_features) + 1):
        candidates = sorted({tuple(sorted(a + (f,))) for a in best_of_size[size - 1]
                             for f in range(n_features) if f not in a})
        candidates = [c for c in candidates if coverage(c) > best_coverage]
        if not candidates:
            break
        best_of_size[size] = yield from lucb(candidates, min(beam_size, len(candidates)))
        yield from settle(best_of_size[size], beta)
        done = False
        for anchor in best_of_size[size]:
            if eligible(anchor, beta) and coverage(anchor) > best_coverage:
                best, best_coverage = anchor, coverage(anchor)
                done = best_coverage == 1.0 or stop_on_first
        if done:
            break
    if best is None:  # nothing reached the threshold: the most precise of the best of each size
        pool = [a for size in sorted(best_of_size) if size > 0 for a in best_of_size[size]]
        best = (yield from lucb(pool, 1))[0]
    return best, precision(best)[0], coverage(best)


@register
class Anchor(SuperpixelExplainer):
    """The smallest superpixel set that, kept while the others are perturbed, keeps the class.

    Beam search over superpixel sets with the KL-LUCB bandit; a perturbation keeps each
    other superpixel with probability p_sample and fills the rest (``fill``), and is
    positive when the model's argmax is still the target.
    threshold: precision to reach (0.95); delta: bandit confidence (0.1); tau: the bandit's
    tolerance epsilon (0.15); batch_size: samples per arm pull (100); beam_size (1);
    coverage_samples: masks on which coverage is measured (10000, no model calls);
    min_samples_start: samples of the empty anchor before testing it (100);
    max_anchor_size: None = all superpixels; stop_on_first: return the first eligible
    anchor; epsilon_stop: margin around the threshold (0.05) -- alibi's defaults.
    Superpixel defaults: segmentation="slic" (25 superpixels whatever the image size, so a
    superpixel is ~4% of the image; alibi's AnchorImage also uses slic) and fill="image-mean"
    (a hidden superpixel shows the image's average colour). With quickshift (~8 superpixels
    on a 28x28 digit) and each superpixel hidden under its own mean, hiding kept the class,
    so 27.5% of anchors on 200 MNIST test digits (t10k 1000-1199, demo CNN) were empty, and
    16% of anchors pointed at a planted 4x4 patch; now 4.5% empty (precision >= 0.95 on
    every digit, mean 0.996) and 94% on the patch. A constant 0 fill gave 1% empty but is
    out of distribution on non-black backgrounds (it added background superpixels to 8 of
    16 patch anchors). The price: hidden background is no longer identical to the black
    background, so ~900 distinct masks per digit instead of ~65 (about 0.6 s per digit on
    one core instead of 0.05 s).
    Map: 1 on the anchor's superpixels, 0 elsewhere (unsigned). An empty anchor is an answer: the
    class holds with nothing kept. On the ResNet of tests/pipelines/test_resnet_trained.py (class:
    the colour of a planted square; class 0: no square) every image of class 0 got one, and no
    image with a square (8 of each); the report says so next to its empty-maps warning.
    Cost: adaptive, typically 10^3-10^4 forward passes per image; all images' arm pulls of a
    round go through the model together.

    Extras: ``anchor`` (int32[] superpixel ids), ``precision``, ``coverage`` (of the anchor
    on coverage_samples masks), ``segments`` (int32[] H*W), ``rule`` (readable),
    ``model_calls``.
    """

    name = "anchor"
    signed = False
    caveats = {"constant": (
        "An empty anchor is an answer, not a failure: the model kept the class with no superpixel held "
        "fixed (its precision reached the threshold however the superpixels were hidden), so nothing in "
        "particular of the image is needed for that class, as for a class that means the absence of "
        "something.")}
    extras = {"anchor": "int32[]", "precision": "float32", "coverage": "float32",
              "segments": "int32[]", "rule": "string", "model_calls": "int64"}

    def __init__(self, model, threshold: float = 0.95, delta: float = 0.1, tau: float = 0.15,
                 batch_size: int = 100, beam_size: int = 1, coverage_samples: int = 10000,
                 min_samples_start: int = 100, max_anchor_size: int | None = None,
                 stop_on_first: bool = False, epsilon_stop: float = 0.05, p_sample: float = 0.5,
                 segmentation: str = "slic", segmentation_options: dict | None = None,
                 min_segments: int = 4, fill: float | str = "image-mean", max_forward_batch: int | None = None):
        super().__init__(model, segmentation, segmentation_options, min_segments, fill, max_forward_batch)
        if not 0 < threshold <= 1 or not 0 < delta < 1 or tau <= 0 or not 0 < p_sample < 1:
            raise ValueError("need 0 < threshold <= 1, 0 < delta < 1, tau > 0 and 0 < p_sample < 1; got "
                             f"{threshold}, {delta}, {tau}, {p_sample}")
        if batch_size < 1 or beam_size < 1 or coverage_samples < 1:
            raise ValueError("batch_size, beam_size and coverage_samples must be >= 1")
        self.threshold, self.delta, self.tau = threshold, delta, tau
        self.batch_size, self.beam_size, self.coverage_samples = batch_size, beam_size, coverage_samples
        self.min_samples_start, self.max_anchor_size = min_samples_start, max_anchor_size
        self.stop_on_first, self.epsilon_stop, self.p_sample = stop_on_first, epsilon_stop, p_sample

    def passes(self):
        return {"forward": 3000, "backward": 0}  # adaptive; a typical count on 28x28 digits

    def explain(self, images, targets, seeds=None):
        segments, blackbox, seeds = self._prepare(images, targets, seeds)
        targets = [int(t) for t in targets]
        options = dict(threshold=self.threshold, delta=self.delta, tau=self.tau,
                       batch_size=self.batch_size, beam_size=self.beam_size,
                       coverage_samples=self.coverage_samples, min_samples_start=self.min_samples_start,
                       max_anchor_size=self.max_anchor_size, stop_on_first=self.stop_on_first,
                       epsilon_stop=self.epsilon_stop, p_sample=self.p_sample)
        searches = [anchor_search(int(s.max()) + 1, targets[i], np.random.default_rng(seeds[i]), **options)
                    for i, s in enumerate(segments)]
        found = run_searches(blackbox, searches)
        maps, rules = [], []
        for i, (anchor, prec, cov) in enumerate(found):
            on = np.zeros(int(segments[i].max()) + 1, dtype=np.float32)
            on[list(anchor)] = 1.0
            maps.append(paint(on, segments[i]))
            kept = f"superpixels {describe(anchor)} kept" if anchor else "any image (empty anchor)"
            rules.append(f"{kept} -> class {targets[i]} (precision {prec:.2f}, coverage {cov:.2f})")
        extras = {
            "anchor": [torch.tensor(a, dtype=torch.int32) for a, _, _ in found],
            "precision": torch.tensor([p for _, p, _ in found], dtype=torch.float32),
            "coverage": torch.tensor([c for _, _, c in found], dtype=torch.float32),
            "segments": [torch.from_numpy(s.reshape(-1)) for s in segments],
            "rule": rules,
            "model_calls": torch.from_numpy(blackbox.calls.copy()),
        }
        return Explanation(torch.from_numpy(np.stack(maps)).to(images.device), extras)
