"""ABELE (Guidotti, Monreale, Matwin, Pedreschi, ECML-PKDD 2019): LORE in an AAE's latent space.

For each image x with code z = encode(x): a neighbourhood of latent codes (half prior draws
that the AAE's discriminator takes for prior draws, half from LORE's genetic search), decoded
and labelled by the black box; a decision tree on the codes; the factual rule (x's path) and
the counterfactual rules (other classes' paths, fewest conditions x violates); exemplars
(prior draws inside the rule's box that the black box labels as x's class) and
counter-exemplars (z moved into a counterfactual's box, labelled otherwise); and the saliency
map, the pixel-wise median over exemplars p of ABELE's thresholded difference x - p.

All images of a batch advance together (:func:`saliency_audit.explainers.blackbox.search.run_searches`): every round
decodes and labels every image's pending codes in large forward passes; the trees are fitted
in parallel threads. Each image's draws come from its own seed, and its codes never share a
forward pass with another image's (:func:`saliency_audit.explainers.core.base.owner_chunks`), so its result, maps
included, is bit-identical alone or in any batch.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from saliency_audit.explainers.blackbox import rules as rules
from saliency_audit.explainers.blackbox.aae import AdversarialAutoencoder, load_aae
from saliency_audit.explainers.core.options import Option
from saliency_audit.explainers.blackbox.genetic import evolve, mutate, resample_genes
from saliency_audit.explainers.blackbox.search import EvaluationMemo, image_seeds, run_searches
from saliency_audit.explainers.core.base import (
    Explainer,
    Explanation,
    alone,
    check_batch,
    check_chunk,
    chunk_within_budget,
    forward_chunk,
    owner_chunks,
)
from saliency_audit.explainers.core.registry import register

NEUTRAL = 127.5  # ABELE's map is in [0, 255] with 127.5 for "no difference"


def _normal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def logistic(v: np.ndarray, midpoint: float = 0.5, slope: float = 10.0) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-slope * (v - midpoint)))


def neuclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ABELE's normalised Euclidean distance, row-wise: var(a - b) / (2 (var(a) + var(b)))."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    denominator = a.var(-1) + b.var(-1)
    return np.where(denominator > 0, 0.5 * (a - b).var(-1) / np.where(denominator > 0, denominator, 1), 0.0)


def cosine_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    norms = np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1)
    return 1.0 - (p * q).sum(-1) / np.maximum(norms, 1e-12)


def truncated_normal(rng: np.random.Generator, lower: np.ndarray, upper: np.ndarray, n: int) -> np.ndarray:
    """n draws [n,d] of N(0, I) restricted to the box lower < z <= upper (inverse-CDF sampling):
    the prior conditioned on a rule, so sampling it equals rejection-sampling the prior."""
    lo, hi = ndtr(lower), ndtr(upper)
    z = ndtri(lo + rng.random((n, len(lower))) * (hi - lo))
    finite_lo, finite_hi = np.where(np.isfinite(lower), lower, -1e6), np.where(np.isfinite(upper), upper, 1e6)
    return np.clip(np.nan_to_num(z, posinf=1e6, neginf=-1e6), finite_lo, finite_hi).astype(np.float32)


def in_box(codes: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Rows of float32 codes [n,d] inside lower < z <= upper (the tree's own comparison)."""
    codes = np.asarray(codes, dtype=np.float32)
    return ((codes > lower) & (codes <= upper)).all(1)


def knee_index(values: np.ndarray) -> int:
    """ABELE's knee: the point of the curve farthest from the segment joining its ends."""
    y = np.asarray(values, dtype=np.float64)
    points = np.stack([np.arange(len(y), dtype=np.float64), y], 1)
    a, b = points[0], points[-1]
    span = b - a
    length = float(span @ span)
    t = np.clip((points - a) @ span / length, 0, 1) if length > 0 else np.zeros(len(y))
    return int(np.argmax(np.linalg.norm(points - (a + t[:, None] * span), axis=1)))


def difference_mask(image: np.ndarray, exemplar: np.ndarray) -> np.ndarray:
    """ABELE's mask for one exemplar: [C,H,W] 8-bit levels (0..255) -> [H,W] in [0,255].

    d = image - exemplar, min-max rescaled to [0,255] (for colour: then averaged over channels);
    the values are ranked by how often they occur, the knee of the log-frequency curve gives a
    value th, and everything within |127.5 - th| of 127.5 becomes exactly 127.5 (neutral).
    """
    d = np.asarray(image, np.float64) - np.asarray(exemplar, np.float64)
    low, high = d.min(), d.max()
    if high <= low:
        return np.full(d.shape[1:], NEUTRAL)
    d = ((d - low) / (high - low) * 255).mean(0)
    values, counts = np.unique(np.abs(d), return_counts=True)
    # Most frequent first. ABELE's code leaves equally frequent values in numpy's arbitrary order;
    # nearest to neutral first keeps the curve running from common small differences to rare large
    # ones, so the knee's value separates the two (largest first would put th at an extreme and
    # leave almost every pixel neutral).
    order = np.lexsort((np.abs(values - NEUTRAL), -counts))
    threshold = values[order][knee_index(np.log(counts[order]))]
    gap = abs(NEUTRAL - threshold)
    return np.where((d >= NEUTRAL - gap) & (d <= NEUTRAL + gap), NEUTRAL, d)


def abele_map(image: np.ndarray, exemplars: np.ndarray) -> np.ndarray:
    """The saliency map: pixel-wise median of :func:`difference_mask` over exemplars [S,C,H,W]
    (all in 8-bit levels), minus 127.5, so 0 is neutral; positive where x is brighter than its
    same-class exemplars. Zeros without exemplars."""
    if len(exemplars) == 0:
        return np.zeros(image.shape[1:], dtype=np.float32)
    masks = np.stack([difference_mask(image, p) for p in exemplars])
    return (np.median(masks, axis=0) - NEUTRAL).astype(np.float32)


class LatentBlackBox:
    """Decode latent codes and label them with the model: (probabilities [n,K], classes [n]).

    Each distinct (image, code) is decoded and classified once (GA populations hold many
    copies); ``calls[i]`` counts image i's distinct codes. Forward passes of at most
    ``max_forward_batch`` codes, under inference_mode, on the AAE's device.
    """

    def __init__(self, model: torch.nn.Module, aae: AdversarialAutoencoder, batch: int, max_forward_batch: int):
        self.model, self.aae, self.max_forward_batch = model, aae, max_forward_batch
        self.device = next(aae.parameters()).device
        self.memo = EvaluationMemo(batch)

    @property
    def calls(self) -> np.ndarray:
        return self.memo.calls

    def query(self, image_ids: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.ascontiguousarray(codes, dtype=np.float32)

        def evaluate(rows):
            probs = self.probabilities(codes[rows], image_ids[rows])
            return list(zip(probs, probs.argmax(1).tolist()))

        found = self.memo.lookup(image_ids, [row.tobytes() for row in codes], evaluate)
        return (np.stack([p for p, _ in found]) if found else np.zeros((0, 0), np.float32),
                np.array([c for _, c in found], dtype=np.int64))

    # Chunks of one image's codes only (saliency_audit.explainers.core.base.owner_chunks): the GA's fitness and the tree
    # turn the probabilities into decisions, so they must not pick up another image's rounding.
    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> torch.Tensor:
        """One image's codes [n,k] -> images [n,C,H,W]."""
        if not len(codes):
            return torch.zeros(0, *self.aae.config.image_shape, device=self.device)
        return owner_chunks(self.aae.decode, torch.as_tensor(codes, device=self.device), np.zeros(len(codes)),
                            self.max_forward_batch)

    @torch.inference_mode()
    def probabilities(self, codes: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
        """Softmax [n,K] of the decoded codes [n,k]; row r explores image image_ids[r]."""
        def classify(chunk):
            return torch.softmax(self.model(self.aae.decode(chunk)).float(), dim=1)
        return owner_chunks(classify, torch.as_tensor(codes, device=self.device), image_ids,
                            self.max_forward_batch).cpu().numpy()

    @torch.inference_mode()
    def prior_like(self, codes: np.ndarray, threshold: float) -> np.ndarray:
        """Rows the discriminator scores above threshold (ABELE's valid_thr) as prior draws."""
        if len(codes) == 0:
            return np.zeros(0, dtype=bool)
        logits = self.aae.discriminate(torch.as_tensor(np.asarray(codes, np.float32), device=self.device))
        return (torch.sigmoid(logits) > threshold).cpu().numpy()


def sample_accepted(rng: np.random.Generator, n: int, sample: Callable[[np.random.Generator, int], np.ndarray],
                    valid: Callable[[np.ndarray], np.ndarray], accept: Callable[[np.ndarray], np.ndarray],
                    max_attempts: int):
    """Generator: up to n codes from ``sample`` that the discriminator passes and whose black-box
    classes ``accept`` [n] -> bool takes; at most max_attempts draws. Returns (codes, probs, classes).
    The draw size adapts to the acceptance seen so far, so a rare acceptance costs few rounds."""
    codes, probs, classes = [], [], []
    found = attempts = labelled = accepted = 0
    while found < n and attempts < max_attempts:
        rate = (accepted + 1) / (labelled + 2)
        m = int(min(max_attempts - attempts, 4096, max(32, np.ceil(1.5 * (n - found) / rate))))
        candidates = sample(rng, m)
        attempts += m
        candidates = candidates[valid(candidates)]
        if not len(candidates):
            continue
        p, c = yield candidates
        ok = accept(c)
        labelled, accepted = labelled + len(c), accepted + int(ok.sum())
        codes.append(candidates[ok]), probs.append(p[ok]), classes.append(c[ok])
        found += int(ok.sum())
    if not codes:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(codes)[:n], np.concatenate(probs)[:n], np.concatenate(classes)[:n]


def _everything(codes: np.ndarray) -> np.ndarray:
    return np.ones(len(codes), dtype=bool)


def _unique_rows(rows: np.ndarray) -> np.ndarray:
    """Distinct rows, first occurrences in their original order (row 0 stays first)."""
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


@register
class Abele(Explainer):
    """Exemplars, counter-exemplars, rules and a saliency map from an AAE's latent space.

    aae: path of a checkpoint from ``saliency-audit train-aae`` (or a loaded
    :class:`saliency_audit.explainers.blackbox.aae.AdversarialAutoencoder`); it must have been trained on images of
    the shape, channels and value range the model receives (ValueError otherwise).
    neighbours: latent neighbourhood size (1000: half prior draws that pass the
    discriminator, half from the genetic search); generations (10), cxpb (0.5), mutpb (0.2,
    share of individuals mutated), indpb (0.2, share of a mutant's coordinates redrawn from
    N(0,1)), tournament_size (3), alpha1/alpha2 (0.5/0.5, fitness weights of latent
    similarity and black-box agreement, ABELE's gntp); valid_threshold: discriminator score
    a latent must exceed (0.5); ocr: least share of other-class neighbours, topped up with
    prior draws (0.1); exemplars: same-class exemplars the map is the median over (100);
    counter_exemplars: counter-exemplars generated (5); stored_exemplars: exemplar images
    returned (5); tree_search: how the tree is tuned ("small": 12 depth and leaf-size settings, 3-fold,
    macro F1; "abele": ABELE's 200 settings, 5-fold; "none": grown until pure, with max_depth and
    min_samples_leaf (None, 1), which makes the fidelity 1);
    max_counterfactuals (5); max_attempts: latent draws per search (2,000; ABELE allows 100,000,
    which costs minutes for an image whose rule box holds few same-class codes, where the
    explanation then has fewer exemplars); max_forward_batch: codes per decode+classify pass (None: 32 on CPU, 1024 on an accelerator); workers: threads
    fitting the trees (default: torch.get_num_threads(), the worker's --torch-threads); storage_options:
    fsspec options for an aae path on object storage (used to read it, never recorded: they may hold credentials).

    Map: ABELE's, the pixel-wise median over the exemplars of the thresholded, rescaled
    difference image - exemplar (see :func:`difference_mask`), minus 127.5: 0 where the image
    agrees with its same-class exemplars (or within the neutral band), positive where it is
    brighter, negative where darker. Signed. ABELE's evaluation "relevancy" is
    1 - |map| / 127.5. The exemplars are the target's: inside x's own rule when the target is
    x's class (the default), else inside the tree's path to the target's class nearest to x (none,
    and a 0 map, when the tree has no leaf of that class); ``rule`` stays x's own. (Before, another
    class's exemplars were sought inside x's own rule: none for 6 of the demo sanity check's 8
    digits on the randomised model, whose maps then dropped out of the check.)
    The map is mostly the image itself: x minus typical images of the class as the autoencoder
    draws them keeps x's strokes, whatever the model and the class (demo CNN, 8 digits: rank
    correlation 0.69-0.84 with the map of a fully randomised model explaining its own class).

    Extras: ``rule`` ("z1 > 0.52 and -0.3 < z3 <= 1.1 -> class 7"), ``rule_features``,
    ``rule_lower``, ``rule_upper`` (its box: lower < z <= upper, +-inf where open),
    ``counterfactuals`` ("; "-joined conditions to change -> class), ``counterfactual_classes``,
    ``fidelity`` (locality-weighted accuracy of the tree on the neighbourhood), ``neighbours``,
    ``latent`` (the image's code), ``exemplars`` / ``counter_exemplars`` (float32 images
    [n,C,H,W] flattened, in model-input space), ``exemplar_count``,
    ``counter_exemplar_count``, ``counter_exemplar_classes``, ``map_exemplars`` (exemplars the
    map used), ``model_calls`` (codes decoded and labelled).
    """

    name = "abele"
    caveats = dict.fromkeys(("cascading", "random_logit"), (
        "Expected for abele's map: it is the image minus typical images of the class as the autoencoder "
        "draws them, so the image's own strokes dominate it whatever the model and the class; the model "
        "only decides which drawn images count as exemplars. Judge the model by abele's rules, exemplars and "
        "counter-exemplars, not by its map."))
    assets = (Option("aae", "location", spec="explain.aae",
                     help="adversarial autoencoder for abele (train one with saliency-audit train-aae)"),)
    needs_gradients = False
    extras = {"rule": "string", "rule_features": "int32[]", "rule_lower": "float32[]", "rule_upper": "float32[]",
              "counterfactuals": "string", "counterfactual_classes": "int32[]", "fidelity": "float32",
              "neighbours": "int64", "latent": "float32[]", "exemplars": "float32[]", "exemplar_count": "int64",
              "counter_exemplars": "float32[]", "counter_exemplar_count": "int64",
              "counter_exemplar_classes": "int32[]", "map_exemplars": "int64", "model_calls": "int64"}

    def __init__(self, model, aae, neighbours: int = 1000, generations: int = 10, cxpb: float = 0.5,
                 mutpb: float = 0.2, indpb: float = 0.2, tournament_size: int = 3, alpha1: float = 0.5,
                 alpha2: float = 0.5, valid_threshold: float = 0.5, ocr: float = 0.1, exemplars: int = 100,
                 counter_exemplars: int = 5, stored_exemplars: int = 5, max_depth: int | None = None,
                 min_samples_leaf: int = 1, tree_search: str = "small", max_counterfactuals: int = 5,
                 max_attempts: int = 2000,
                 max_forward_batch: int | None = None, workers: int | None = None,
                 storage_options: dict | None = None):
        super().__init__(model)
        if isinstance(aae, AdversarialAutoencoder):
            self.autoencoder, self.aae = aae.eval(), f"<{type(aae).__name__} {aae.config.describe()}>"
        elif isinstance(aae, (str, os.PathLike)):
            self.autoencoder, self.aae = load_aae(str(aae), storage_options=storage_options), str(aae)
        else:
            raise ValueError(f"aae must be a checkpoint path or an AdversarialAutoencoder, got {type(aae).__name__}")
        if neighbours < 8 or generations < 0 or tournament_size < 1 or exemplars < 0 or counter_exemplars < 0:
            raise ValueError("need neighbours >= 8, generations >= 0, tournament_size >= 1 and exemplars, "
                             f"counter_exemplars >= 0; got {neighbours}, {generations}, {tournament_size}, "
                             f"{exemplars}, {counter_exemplars}")
        for name, p in (("cxpb", cxpb), ("mutpb", mutpb), ("indpb", indpb), ("valid_threshold", valid_threshold),
                        ("ocr", ocr)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        check_chunk("max_forward_batch", max_forward_batch)
        rules.check_tree_search(tree_search)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.neighbours, self.generations, self.cxpb, self.mutpb, self.indpb = neighbours, generations, cxpb, mutpb, indpb
        self.tournament_size, self.alpha1, self.alpha2 = tournament_size, alpha1, alpha2
        self.valid_threshold, self.ocr = valid_threshold, ocr
        self.exemplars, self.counter_exemplars, self.stored_exemplars = exemplars, counter_exemplars, stored_exemplars
        self.max_depth, self.min_samples_leaf, self.max_counterfactuals = max_depth, min_samples_leaf, max_counterfactuals
        self.tree_search = tree_search
        self.max_attempts, self.max_forward_batch, self.workers = max_attempts, max_forward_batch, workers

    def passes(self):
        genetic = self.neighbours // 2 * (1 + 6 * self.generations // 10)
        return {"forward": self.neighbours // 2 + genetic + 2 * (self.exemplars + self.counter_exemplars),
                "backward": 0}

    # -- the neighbourhood -------------------------------------------------------------------

    def _neighbourhood(self, z, p_x, target, rng, valid):
        """Generator (one image): ABELE's hrgp neighbourhood. Returns (codes [n,k], classes [n])."""
        k = len(z)
        half = self.neighbours // 2
        random_half, _, _ = yield from sample_accepted(
            rng, half, lambda r, m: r.standard_normal((m, k)).astype(np.float32), valid,
            _everything, self.max_attempts)

        def fitness(pop, reply, same):
            near = logistic(1 - neuclidean(pop, z))
            if same:  # x itself earns nothing for being x
                near = np.where((pop == z).all(1), 0.0, near)
            agree = logistic(1 - cosine_distance(reply[0], p_x))
            return self.alpha1 * near + self.alpha2 * (agree if same else 1 - agree)

        def mutation(pop, r):
            parent = pop.copy()
            rows = mutate(pop, self.mutpb, self.indpb, r, draw=_normal)
            for _ in range(10):  # as ABELE: redraw until the discriminator passes, then give up
                bad = rows & ~valid(pop)
                if not bad.any():
                    return
                pop[bad] = parent[bad]
                resample_genes(pop, bad, self.indpb, r, draw=_normal)
            bad = rows & ~valid(pop)
            pop[bad] = parent[bad]

        size = max(2, (self.neighbours - half) // 2)
        kept = yield from evolve(z, rng, size=size, generations=self.generations, cxpb=self.cxpb,
                                 tournament_size=self.tournament_size, fitness=fitness, mutate=mutation)
        codes = _unique_rows(np.concatenate([z[None], *([random_half] if len(random_half) else []), *kept]))
        _, classes = yield codes
        classes = classes.copy()
        classes[0] = int(np.argmax(p_x))  # row 0 stands for x itself, as in ABELE
        counts = np.bincount(classes)
        others = len(classes) - counts[target] if target < len(counts) else len(classes)
        want = int(round(self.ocr * self.neighbours))
        if others < want:  # ABELE's balancing: top up with prior draws of other classes
            extra, _, extra_classes = yield from sample_accepted(
                rng, want - others, lambda r, m: r.standard_normal((m, k)).astype(np.float32), valid,
                lambda c: c != target, self.max_attempts)
            if len(extra):
                codes, classes = np.concatenate([codes, extra]), np.concatenate([classes, extra_classes])
        return codes, classes

    # -- exemplars and counter-exemplars -------------------------------------------------------

    def _examples(self, z, target, rng, valid, factual, counterfactuals, target_rule):
        """Generator (one image): (exemplar codes, confirmed counterfactuals, counter-exemplar codes
        and classes). Exemplars are prior draws inside ``target_rule``'s box (the factual rule
        when the target is x's class; None: the tree has no leaf of the target's class, and there
        are no exemplars) labelled as the target; counter-exemplars are z with a confirmed
        counterfactual's coordinates redrawn from the prior inside its box (all other coordinates
        as z), labelled otherwise; without any, prior draws outside the rule's box labelled
        otherwise (ABELE's two kinds)."""
        k = len(z)
        exemplars = np.zeros((0, k), np.float32)
        if target_rule is not None:
            inside = rules.box(target_rule, k)
            exemplars, _, _ = yield from sample_accepted(
                rng, self.exemplars, lambda r, m: truncated_normal(r, *inside, m), valid,
                lambda c: c == target, self.max_attempts)
        lower, upper = rules.box(factual, k)
        counter, counter_classes, confirmed = np.zeros((0, k), np.float32), np.zeros(0, np.int64), []
        if counterfactuals:
            moved = np.repeat(z[None], len(counterfactuals), 0)  # ABELE's check: just past the thresholds
            for row, (changes, _, _) in zip(moved, counterfactuals):
                for f, thr, above in changes:
                    row[f] = thr + 0.01 if above else thr - 0.01
            _, flipped = yield moved
            boxes = [rules.box(path, k) for _, _, path in counterfactuals]
            free = [sorted({f for f, _, _ in changes}) for changes, _, _ in counterfactuals]

            def sample(r, m):
                which = r.integers(0, len(counterfactuals), m)
                out = np.repeat(z[None], m, 0)
                for j, (lo, hi) in enumerate(boxes):
                    rows = np.flatnonzero(which == j)
                    out[np.ix_(rows, free[j])] = truncated_normal(r, lo[free[j]], hi[free[j]], len(rows))
                return out

            # like ABELE's counterfactual prototypes: x's code moved into the box, not screened by D
            counter, _, counter_classes = yield from sample_accepted(
                rng, self.counter_exemplars, sample, _everything, lambda c: c != target, self.max_attempts)
            # a counterfactual holds if the black box agrees just past its thresholds or anywhere inside
            confirmed = [cf for j, cf in enumerate(counterfactuals)
                         if flipped[j] == cf[1] or in_box(counter, *boxes[j]).any()]
        if not len(counter):  # ABELE's other kind: prior draws outside the rule, labelled otherwise
            def outside(r, m):
                draws = r.standard_normal((m, k)).astype(np.float32)
                return draws[~in_box(draws, lower, upper)]
            counter, _, counter_classes = yield from sample_accepted(
                rng, self.counter_exemplars, outside, valid, lambda c: c != target, self.max_attempts)
        return exemplars, confirmed, counter, counter_classes

    # -- the batch -----------------------------------------------------------------------------

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach()
        self.autoencoder.check_images(images)
        batch = images.shape[0]
        aae = self.autoencoder.to(images.device)
        seeds = image_seeds(seeds, batch)
        rngs = [np.random.default_rng(s) for s in seeds]
        targets = [int(t) for t in targets]
        chunk = chunk_within_budget(forward_chunk(self.max_forward_batch, images.device), images.shape[1:],
                                    images.device)
        with torch.inference_mode():
            z = alone(aae.encode, images).float().cpu().numpy()
            p_x = alone(lambda x: torch.softmax(self.model(x).float(), dim=1), images).cpu().numpy()
        blackbox = LatentBlackBox(self.model, aae, batch, chunk)

        def valid(codes):
            return blackbox.prior_like(codes, self.valid_threshold)

        found = run_searches(blackbox, [self._neighbourhood(z[i], p_x[i], targets[i], rngs[i], valid)
                                        for i in range(batch)])
        # Default: torch's thread count, which the job sets to this worker's share of the cores
        # (--torch-threads), so that SDK processes sharing a machine do not oversubscribe it.
        with ThreadPoolExecutor(self.workers or torch.get_num_threads()) as pool:
            fitted = list(pool.map(lambda i: self._fit(*found[i], int(seeds[i])), range(batch)))
        explained = [rules.tree_rules(tree, z[i], self.max_counterfactuals, collapse=True)
                     for i, (tree, _) in enumerate(fitted)]
        # The map answers for the target: its exemplars respect x's own rule when the tree gives x
        # the target's class (the default: the prediction), else the tree's path to the target's
        # class nearest to x (another class's exemplars inside x's own box are rare or none).
        examples = run_searches(blackbox, [
            self._examples(z[i], targets[i], rngs[i], valid, factual, counterfactuals,
                           factual if label == targets[i] else
                           rules.path_to_class(fitted[i][0], z[i], targets[i], collapse=True))
            for i, (factual, label, counterfactuals) in enumerate(explained)])
        return self._explanation(images, aae, blackbox, z, found, fitted, explained, examples)

    def _fit(self, codes, classes, seed):
        """The tree on the locality-weighted neighbourhood (ABELE's kernel on neuclidean distance)."""
        lo, hi = codes.min(), codes.max()
        scaled = codes if lo >= 0 and hi <= 1 else (codes - lo) / max(hi - lo, 1e-12)
        distance = neuclidean(scaled, scaled[0])
        weights = np.sqrt(np.exp(-distance ** 2 / (0.75 * np.sqrt(codes.shape[1])) ** 2))
        return rules.fit_tree(codes, classes, weights, seed, self.tree_search, self.max_depth, self.min_samples_leaf)

    def _explanation(self, images, aae, blackbox, z, found, fitted, explained, examples):
        lo, hi = aae.config.value_range
        levels = np.round((images.float().cpu().numpy() - lo) / (hi - lo) * 255)
        maps, extras = [], {name: [] for name in self.extras}
        for i, ((codes, _), (_, fidelity), (factual, label, _), (ex, confirmed, counter, counter_classes)) in \
                enumerate(zip(found, fitted, explained, examples)):
            ex_images = blackbox.decode(ex).float().cpu().numpy() if len(ex) else np.zeros((0, *images.shape[1:]))
            counter_images = blackbox.decode(counter).float().cpu().numpy() if len(counter) else \
                np.zeros((0, *images.shape[1:]))
            maps.append(abele_map(levels[i], np.round((ex_images - lo) / (hi - lo) * 255)))
            lower, upper = rules.box(factual, z.shape[1])
            features = list(dict.fromkeys(f for f, _, _ in factual))
            extras["rule"].append(f"{_box_text(features, lower, upper)} -> class {label}")
            extras["rule_features"].append(torch.tensor(features, dtype=torch.int32))
            extras["rule_lower"].append(torch.tensor(lower[features], dtype=torch.float32))
            extras["rule_upper"].append(torch.tensor(upper[features], dtype=torch.float32))
            extras["counterfactuals"].append("; ".join(
                f"{_box_text(list(dict.fromkeys(f for f, _, _ in changes)), *rules.box(changes, z.shape[1]))}"
                f" -> class {k}" for changes, k, _ in confirmed))
            extras["counterfactual_classes"].append(torch.tensor([k for _, k, _ in confirmed], dtype=torch.int32))
            extras["fidelity"].append(fidelity)
            extras["neighbours"].append(len(codes))
            extras["latent"].append(torch.from_numpy(z[i].copy()))
            shown = ex_images[:self.stored_exemplars]
            extras["exemplars"].append(torch.from_numpy(shown.reshape(-1).astype(np.float32)))
            extras["exemplar_count"].append(len(shown))
            extras["counter_exemplars"].append(torch.from_numpy(counter_images.reshape(-1).astype(np.float32)))
            extras["counter_exemplar_count"].append(len(counter_images))
            extras["counter_exemplar_classes"].append(torch.from_numpy(counter_classes.astype(np.int32)))
            extras["map_exemplars"].append(len(ex))
        for name in ("fidelity",):
            extras[name] = torch.tensor(extras[name], dtype=torch.float32)
        for name in ("neighbours", "exemplar_count", "counter_exemplar_count", "map_exemplars"):
            extras[name] = torch.tensor(extras[name], dtype=torch.int64)
        extras["model_calls"] = torch.from_numpy(blackbox.calls.copy())
        return Explanation(torch.from_numpy(np.stack(maps)).to(images.device), extras)


def _box_text(features: list[int], lower: np.ndarray, upper: np.ndarray) -> str:
    parts = []
    for f in features:
        lo, hi = lower[f], upper[f]
        if np.isfinite(lo) and np.isfinite(hi):
            parts.append(f"{lo:.3g} < z{f} <= {hi:.3g}")
        elif np.isfinite(lo):
            parts.append(f"z{f} > {lo:.3g}")
        else:
            parts.append(f"z{f} <= {hi:.3g}")
    return " and ".join(parts) or "any code"
