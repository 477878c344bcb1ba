"""Factual and counterfactual rules read off a fitted sklearn decision tree (LORE, ABELE).

A condition is (feature, threshold, above): ``x[feature] > threshold`` when above, else
``x[feature] <= threshold`` (sklearn's split convention). The factual rule of x is its
root-to-leaf path; a counterfactual is the path to a leaf of another class, reported as the
conditions x violates on it (the "delta"), fewest first.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.tree import DecisionTreeClassifier
# sklearn is imported where a tree is fitted: it adds ~150 MB to every process that imports the
# explainers, and only lore and abele fit trees.

Condition = tuple[int, float, bool]

# ABELE tunes its tree by a 5-fold grid search over 200 settings scored by macro F1 ("abele":
# 1,000 fits per image); "small" searches 12 of those settings with 3 folds (36 fits), and "none"
# grows the tree until its leaves are pure, which makes the fidelity on the neighbourhood 1.
TREE_SEARCHES = {
    "abele": ({"min_samples_split": [0.002, 0.01, 0.05, 0.1, 0.2],
               "min_samples_leaf": [0.001, 0.01, 0.05, 0.1, 0.2],
               "max_depth": [None, 2, 4, 6, 8, 10, 12, 16]}, 5),
    "small": ({"min_samples_leaf": [0.001, 0.01, 0.05], "max_depth": [None, 4, 8, 12]}, 3),
    "none": (None, 0),
}


def _macro_f1(tree, features, labels, sample_weight=None) -> float:
    # a plain callable: sklearn's make_scorer fails on a fold whose training part has one class
    from sklearn.metrics import f1_score
    return f1_score(labels, tree.predict(features), average="macro", zero_division=0, sample_weight=sample_weight)


def check_tree_search(search: str) -> None:
    if search not in TREE_SEARCHES:
        raise ValueError(f"tree_search must be one of {', '.join(TREE_SEARCHES)}, got {search!r}")


def fit_tree(features: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, seed: int, search: str = "small",
             max_depth: int | None = None, min_samples_leaf: int = 1) -> tuple[DecisionTreeClassifier, float]:
    """The surrogate tree on a neighbourhood (weighted, or not with weights None) and its fidelity
    (weighted accuracy on it).

    search: a key of TREE_SEARCHES; max_depth and min_samples_leaf apply with "none"."""
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.tree import DecisionTreeClassifier
    grid, folds = TREE_SEARCHES[search]
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf, random_state=seed % 2 ** 32)
    if grid is not None and len(np.unique(labels)) > 1 and len(labels) >= 2 * folds:
        searcher = GridSearchCV(tree, grid, cv=KFold(folds, shuffle=True, random_state=seed % 2 ** 32),
                                scoring=_macro_f1)
        tree = searcher.fit(features, labels, sample_weight=weights).best_estimator_
    else:
        tree.fit(features, labels, sample_weight=weights)
    return tree, float(tree.score(features, labels, sample_weight=weights))


def _node_classes(tree, collapse: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per node: its majority class (index into classes_), and whether it ends a path.

    With collapse, a node whose leaves all predict one class ends the path: ABELE prunes
    sibling leaves of the same class, which leaves the predictions as they were and drops
    splits that cannot change the outcome."""
    t = tree.tree_
    majority = np.argmax(t.value[:, 0, :], axis=1)
    leaf = t.children_left == -1
    ends = leaf.copy()
    if collapse:
        pure = np.where(leaf, majority, -1)
        for node in range(t.node_count - 1, -1, -1):  # children have larger ids than parents
            if not leaf[node]:
                left, right = t.children_left[node], t.children_right[node]
                pure[node] = pure[left] if pure[left] == pure[right] else -1
        ends = pure >= 0
        majority = np.where(ends, pure, majority)
    return majority, ends


def tree_paths(tree, collapse: bool = False) -> list[tuple[list[Condition], int]]:
    """Every root-to-end path: (conditions in path order, class of the end node)."""
    t = tree.tree_
    majority, ends = _node_classes(tree, collapse)
    out, stack = [], [(0, [])]
    while stack:
        node, conditions = stack.pop()
        if ends[node]:
            out.append((conditions, int(tree.classes_[majority[node]])))
            continue
        f, thr = int(t.feature[node]), float(t.threshold[node])
        stack.append((int(t.children_right[node]), conditions + [(f, thr, True)]))
        stack.append((int(t.children_left[node]), conditions + [(f, thr, False)]))
    return out


def satisfied(conditions: list[Condition], x: np.ndarray) -> list[bool]:
    x = np.asarray(x, dtype=np.float32)  # what the tree compares (sklearn fits on float32)
    return [bool(x[f] > thr) == above for f, thr, above in conditions]


def tree_rules(tree, x: np.ndarray, max_counterfactuals: int, collapse: bool = False):
    """(factual conditions, class, counterfactuals) of x [d] in a fitted tree.

    counterfactuals: up to max_counterfactuals (changes, class, path), the distinct sets of
    conditions x violates on paths to leaves of other classes (with the first such path), all
    tied at the fewest, ordered by class then conditions.
    """
    paths = tree_paths(tree, collapse)
    factual, label = next((c, k) for c, k in paths if all(satisfied(c, x)))
    others: dict[tuple, list[Condition]] = {}
    for conditions, leaf_class in paths:
        if leaf_class != label:
            changes = [c for c, ok in zip(conditions, satisfied(conditions, x)) if not ok]
            others.setdefault((tuple(changes), leaf_class), conditions)
    if not others:
        return factual, label, []
    fewest = min(len(c) for c, _ in others)
    best = sorted(((list(c), k, path) for (c, k), path in others.items() if len(c) == fewest),
                  key=lambda ckp: (ckp[1], ckp[0]))
    return factual, label, best[:max_counterfactuals]


def path_to_class(tree, x: np.ndarray, cls: int, collapse: bool = False) -> list[Condition] | None:
    """The root-to-end path of a fitted tree that ends in class ``cls`` and whose conditions x [d]
    violates fewest (x's own path when it ends there; the first in depth-first order among ties),
    or None when no end of the tree predicts ``cls``: what the tree says about a class that may not
    be x's, for a method asked to explain another class than its prediction."""
    best = None
    for conditions, leaf_class in tree_paths(tree, collapse):
        if leaf_class == cls:
            violated = satisfied(conditions, x).count(False)
            if best is None or violated < best[0]:
                best = (violated, conditions)
    return None if best is None else best[1]


def box(conditions: list[Condition], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The hyper-rectangle of a conjunction: lower, upper [d] (x in it iff lower < x <= upper)."""
    lower = np.full(n_features, -np.inf)
    upper = np.full(n_features, np.inf)
    for f, thr, above in conditions:
        if above:
            lower[f] = max(lower[f], thr)
        else:
            upper[f] = min(upper[f], thr)
    return lower, upper
