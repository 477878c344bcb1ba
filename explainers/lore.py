"""LORE on superpixels (Guidotti et al. 2018): genetic neighbourhood, decision tree, rules.

The reference LORE is tabular; here the features are superpixel on/off bits as in LIME, the
instance x is all-on, and the tree is sklearn's CART in place of the YaDT binary.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.tree import DecisionTreeClassifier

from explainers._base import Explanation
from explainers._blackbox import SuperpixelExplainer, run_searches
from explainers._registry import register
from explainers.superpixels import describe, paint


def _labels(masks: np.ndarray):
    """Generator: the black box's classes [n] for masks [n,S] (repeats cost nothing, see BlackBox)."""
    _, labels = yield masks
    return labels


def two_point_crossover(pop: np.ndarray, cxpb: float, rng: np.random.Generator) -> np.ndarray:
    """Swap a random slice between consecutive pairs, each pair with probability cxpb (in place).

    Returns a bool [n] of the rows that changed hands (they need a new fitness)."""
    n, s = pop.shape
    pairs = np.flatnonzero(rng.random(n // 2) < cxpb)
    cuts = np.sort(rng.integers(0, s + 1, (len(pairs), 2)), axis=1)
    cols = np.arange(s)
    swap = (cols >= cuts[:, :1]) & (cols < cuts[:, 1:])  # [pairs, S]
    a, b = 2 * pairs, 2 * pairs + 1
    pa, pb = pop[a].copy(), pop[b].copy()
    pop[a] = np.where(swap, pb, pa)
    pop[b] = np.where(swap, pa, pb)
    touched = np.zeros(n, dtype=bool)
    touched[a] = touched[b] = True
    return touched


def mutate(pop: np.ndarray, mutpb: float, indpb: float, rng: np.random.Generator) -> np.ndarray:
    """Each row with probability mutpb resamples each bit uniformly with probability indpb (in place)."""
    rows = rng.random(len(pop)) < mutpb
    resample = (rng.random(pop.shape) < indpb) & rows[:, None]
    pop[resample] = rng.random(int(resample.sum())) < 0.5
    return rows


def above_largest_gap(fitness: np.ndarray) -> np.ndarray:
    """LORE's filter: keep the individuals whose fitness is above the largest gap in the sorted values."""
    values = np.unique(fitness)
    if len(values) < 2:
        return np.ones(len(fitness), dtype=bool)
    cut = values[np.argmax(np.diff(values)) + 1]
    return fitness >= cut


def lore_neighbourhood(n_features: int, target: int, rng: np.random.Generator, *, population_size: int,
                       generations: int, cxpb: float, mutpb: float, indpb: float, tournament_size: int,
                       alpha1: float, alpha2: float, eta: float):
    """One image's genetic neighbourhood, as a generator for :func:`run_searches`.

    Two populations of population_size/2, both starting as copies of x (all on): fitness
    alpha1 * similarity + alpha2 * [f(z) == target] ("same") or [f(z) != target]
    ("different"), where similarity = share of superpixels as in x, set to 0 at >= eta so x
    itself is not rewarded. DEAP-style simple GA: tournament selection, two-point crossover,
    bit-resampling mutation; a hall of fame of the best 10% is added at the end, and the
    union is cut at the largest fitness gap. If only one class is found, population_size/2
    uniformly random masks are added (the random fallback). Both populations of a
    generation are labelled in one request. Returns (masks [n,S] distinct, labels [n]).
    """
    half = max(2, population_size // 2)
    x = np.ones((1, n_features), dtype=bool)

    def fitness(pop, lab, same):
        similarity = pop.mean(1)
        similarity = np.where(similarity >= eta, 0.0, similarity)
        hit = (lab == target) if same else (lab != target)
        return alpha1 * similarity + alpha2 * hit

    pops = [np.repeat(x, half, 0), np.repeat(x, half, 0)]
    both = yield from _labels(np.concatenate(pops))
    fits = [fitness(pops[0], both[:half], True), fitness(pops[1], both[half:], False)]
    fame = [(pops[k].copy(), fits[k].copy()) for k in range(2)]
    for _ in range(generations):
        for k in range(2):
            aspirants = rng.integers(0, half, (half, tournament_size))
            winners = aspirants[np.arange(half), np.argmax(fits[k][aspirants], axis=1)]
            pops[k] = pops[k][winners]
            fits[k] = fits[k][winners]
            two_point_crossover(pops[k], cxpb, rng)
            mutate(pops[k], mutpb, indpb, rng)
        both = yield from _labels(np.concatenate(pops))
        fits = [fitness(pops[0], both[:half], True), fitness(pops[1], both[half:], False)]
        for k in range(2):  # hall of fame: the best distinct individuals seen, 10% of a population
            pool = np.concatenate([fame[k][0], pops[k]])
            pool_fit = np.concatenate([fame[k][1], fits[k]])
            _, first = np.unique(pool, axis=0, return_index=True)
            best = first[np.argsort(-pool_fit[first], kind="stable")[:max(1, half // 10)]]
            fame[k] = (pool[best], pool_fit[best])
    kept = []
    for k in range(2):
        pool = np.concatenate([pops[k], fame[k][0]])
        kept.append(pool[above_largest_gap(np.concatenate([fits[k], fame[k][1]]))])
    masks = np.unique(np.concatenate([x] + kept), axis=0)
    found = yield from _labels(masks)
    if len(np.unique(found)) < 2:
        extra = rng.random((half, n_features)) < 0.5
        masks = np.unique(np.concatenate([masks, extra]), axis=0)
        found = yield from _labels(masks)
    return masks, found


def _paths(tree) -> list[tuple[list[tuple[int, bool]], int]]:
    """Every root-to-leaf path of a fitted tree on 0/1 features: ([(feature, on), ...], leaf node)."""
    t = tree.tree_
    out, stack = [], [(0, [])]
    while stack:
        node, conditions = stack.pop()
        if t.children_left[node] == -1:
            out.append((conditions, node))
            continue
        f = int(t.feature[node])  # threshold is 0.5: left is "off", right is "on"
        stack.append((int(t.children_right[node]), conditions + [(f, True)]))
        stack.append((int(t.children_left[node]), conditions + [(f, False)]))
    return out


def _conditions_text(conditions: list[tuple[int, bool]]) -> str:
    on = [f for f, v in conditions if v]
    off = [f for f, v in conditions if not v]
    parts = [f"superpixels {describe(ids)} {state}" for ids, state in ((on, "on"), (off, "off")) if ids]
    return " and ".join(parts) or "any image"


def tree_rules(tree, n_features: int, max_counterfactuals: int):
    """Factual rule of x (all on) and its counterfactuals from a fitted tree.

    Returns (conditions, class, counterfactuals) with counterfactuals a list of
    (changes, class): the conditions of another class's leaf that x violates, fewest first;
    all leaves tied at the minimum are kept, up to max_counterfactuals.
    """
    classes = tree.classes_
    paths = _paths(tree)
    x = np.ones(n_features, dtype=bool)
    leaf_of_x = int(tree.apply(x[None].astype(np.float32))[0])
    value = tree.tree_.value
    factual = next(c for c, node in paths if node == leaf_of_x)
    label = int(classes[np.argmax(value[leaf_of_x][0])])
    others = []
    for conditions, node in paths:
        leaf_class = int(classes[np.argmax(value[node][0])])
        if leaf_class != label:
            changes = [(f, v) for f, v in conditions if x[f] != v]
            others.append((len(changes), changes, leaf_class))
    if not others:
        return factual, label, []
    fewest = min(n for n, _, _ in others)
    best = sorted(((c, k) for n, c, k in others if n == fewest), key=lambda ck: (ck[1], ck[0]))
    return factual, label, best[:max_counterfactuals]


@register
class Lore(SuperpixelExplainer):
    """A local decision tree on a genetic neighbourhood of superpixel on/off masks.

    population_size: neighbours bred, half per population (1000); generations (10);
    cxpb: crossover probability per pair (0.5); mutpb: mutation probability per individual
    (0.2); indpb: per-bit resampling probability of a mutation (0.2); tournament_size (3);
    alpha1, alpha2: fitness weights of similarity and outcome (0.5, 0.5); eta: similarity at
    or above which it counts 0 (1.0: only x itself) -- LORE's defaults; max_depth of the
    sklearn DecisionTreeClassifier (None); max_counterfactuals listed (5); plus the
    superpixel options (segmentation, fill, ...). Outcome = the model's argmax; "same" means
    the target class.
    Map: +1 on superpixels the factual rule requires on, -1 on those it requires off (x is
    all on, so its own rule only ever requires "on"), 0 elsewhere. Signed.
    Cost: at most population_size * (1 + 0.6 generations) forward passes per image, far fewer
    in practice since every distinct mask is evaluated once; each generation of all images
    goes through the model together.

    Extras: ``rule`` ("superpixels {3, 7} on -> class 4"), ``rule_superpixels`` (int32[] ids
    in the rule, path order), ``counterfactuals`` ("; "-joined "superpixels {3} off -> class
    9"), ``counterfactual_superpixels`` (int32[] superpixels to switch in the first
    counterfactual), ``fidelity`` (the tree's accuracy on the neighbourhood), ``segments``,
    ``neighbours`` (distinct masks in the neighbourhood), ``model_calls``.
    """

    name = "lore"
    extras = {"rule": "string", "rule_superpixels": "int32[]", "counterfactuals": "string",
              "counterfactual_superpixels": "int32[]", "fidelity": "float32", "segments": "int32[]",
              "neighbours": "int64", "model_calls": "int64"}

    def __init__(self, model, population_size: int = 1000, generations: int = 10, cxpb: float = 0.5,
                 mutpb: float = 0.2, indpb: float = 0.2, tournament_size: int = 3, alpha1: float = 0.5,
                 alpha2: float = 0.5, eta: float = 1.0, max_depth: int | None = None,
                 max_counterfactuals: int = 5, segmentation: str = "quickshift",
                 segmentation_options: dict | None = None, min_segments: int = 4,
                 fill: float | str = "mean", max_forward_batch: int = 1024):
        super().__init__(model, segmentation, segmentation_options, min_segments, fill, max_forward_batch)
        if population_size < 4 or generations < 0 or tournament_size < 1:
            raise ValueError("need population_size >= 4, generations >= 0 and tournament_size >= 1; got "
                             f"{population_size}, {generations}, {tournament_size}")
        for name, p in (("cxpb", cxpb), ("mutpb", mutpb), ("indpb", indpb)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability, got {p}")
        self.population_size, self.generations = population_size, generations
        self.cxpb, self.mutpb, self.indpb, self.tournament_size = cxpb, mutpb, indpb, tournament_size
        self.alpha1, self.alpha2, self.eta = alpha1, alpha2, eta
        self.max_depth, self.max_counterfactuals = max_depth, max_counterfactuals

    def passes(self):
        return {"forward": self.population_size * (1 + 6 * self.generations // 10), "backward": 0}

    def explain(self, images, targets, seeds=None):
        segments, blackbox, seeds = self._prepare(images, targets, seeds)
        targets = [int(t) for t in targets]
        options = dict(population_size=self.population_size, generations=self.generations,
                       cxpb=self.cxpb, mutpb=self.mutpb, indpb=self.indpb,
                       tournament_size=self.tournament_size, alpha1=self.alpha1, alpha2=self.alpha2,
                       eta=self.eta)
        counts = [int(s.max()) + 1 for s in segments]
        searches = [lore_neighbourhood(s, targets[i], np.random.default_rng(seeds[i]), **options)
                    for i, s in enumerate(counts)]
        found = run_searches(blackbox, searches)
        maps, extras = [], {k: [] for k in self.extras}
        for i, (masks, labels) in enumerate(found):
            tree = DecisionTreeClassifier(max_depth=self.max_depth, random_state=int(seeds[i]) % 2 ** 32)
            tree.fit(masks.astype(np.float32), labels)
            conditions, label, counterfactuals = tree_rules(tree, counts[i], self.max_counterfactuals)
            signs = np.zeros(counts[i], dtype=np.float32)
            for f, on in conditions:
                signs[f] = 1.0 if on else -1.0
            maps.append(paint(signs, segments[i]))
            extras["rule"].append(f"{_conditions_text(conditions)} -> class {label}")
            extras["rule_superpixels"].append(torch.tensor([f for f, _ in conditions], dtype=torch.int32))
            extras["counterfactuals"].append("; ".join(f"{_conditions_text(c)} -> class {k}"
                                                       for c, k in counterfactuals))
            flips = [f for f, _ in counterfactuals[0][0]] if counterfactuals else []
            extras["counterfactual_superpixels"].append(torch.tensor(flips, dtype=torch.int32))
            extras["fidelity"].append(float(tree.score(masks.astype(np.float32), labels)))
            extras["segments"].append(torch.from_numpy(segments[i].reshape(-1)))
            extras["neighbours"].append(len(masks))
        extras["fidelity"] = torch.tensor(extras["fidelity"], dtype=torch.float32)
        extras["neighbours"] = torch.tensor(extras["neighbours"], dtype=torch.int64)
        extras["model_calls"] = torch.from_numpy(blackbox.calls.copy())
        return Explanation(torch.from_numpy(np.stack(maps)).to(images.device), extras)
