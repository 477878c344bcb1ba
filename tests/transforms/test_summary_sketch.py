"""Summary quantiles come from mergeable KLL sketches: bounded accumulators, known rank error."""
import math
import pickle
import random

import numpy as np
import pytest
from datasketches import kll_doubles_sketch

from saliency_audit.transforms.io.rows import METRIC_COLUMNS
from saliency_audit.transforms.summary import SKETCH_K, _SummaryFn

RANK_ERROR = kll_doubles_sketch.get_normalized_rank_error(SKETCH_K, False)


def rows_of(values, metrics=("deletion_auc",), label=lambda i: i % 3, predicted=lambda i: i % 2):
    for i, v in enumerate(values):
        yield {"method": "sal", "target": 1, "label": label(i), "predicted": predicted(i), "score": 0.5 + i % 7,
               "time_ms": 1.0, "saliency_abs_mean": 0.1, "saliency_sum": -1.0, **dict.fromkeys(metrics, v)}


def accumulate(fn, rows):
    acc = fn.create_accumulator()
    for row in rows:
        acc = fn.add_input(acc, row)
    return acc


def test_quantiles_of_accumulators_merged_in_random_order_are_within_the_rank_error():
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 1.5, 100_000)  # skewed: mean far from the median
    fn = _SummaryFn()
    cuts = np.sort(rng.choice(np.arange(1, len(values)), 63, replace=False))
    accs = [accumulate(fn, rows_of(part)) for part in np.split(values, cuts)]
    # merge in random order, in random groups, with a pickle round trip as between Beam stages
    order = random.Random(1)
    while len(accs) > 1:
        order.shuffle(accs)
        group = order.randint(2, min(5, len(accs)))
        merged = fn.merge_accumulators([pickle.loads(pickle.dumps(a)) for a in accs[:group]])
        accs = accs[group:] + [merged]
    out = fn.extract_output(accs[0])
    ordered = np.sort(values)
    for stat, q in (("p10", 0.1), ("median", 0.5), ("p90", 0.9)):
        estimate = out[f"{stat}_deletion_auc"]
        rank = np.searchsorted(ordered, estimate, side="right") / len(values)
        assert abs(rank - q) <= RANK_ERROR, (stat, estimate, np.quantile(values, q))
    assert out["mean_deletion_auc"] == pytest.approx(values.mean(), rel=1e-12)
    assert out["count"] == len(values)


def test_the_pickled_accumulator_stays_small_and_does_not_grow_with_the_values():
    fn = _SummaryFn()
    values = np.random.default_rng(2).random(100_000)
    parts = [accumulate(fn, rows_of(part, METRIC_COLUMNS)) for part in np.split(values, 10)]
    e5 = fn.merge_accumulators(parts)  # every metric of one key holds 1e5 values
    # at most 6 KiB per metric's sketch, where a list of its 1e5 floats takes ~0.9 MB
    bound = 6 * 1024 * len(METRIC_COLUMNS)
    assert len(pickle.dumps(e5)) < bound, len(pickle.dumps(e5))
    e6 = fn.merge_accumulators([pickle.loads(pickle.dumps(e5)) for _ in range(10)])
    assert e6.count == 1_000_000
    # KLL grows with log(n / k) only: +16% for 10x the values, where a list grows 10x
    assert len(pickle.dumps(e6)) < min(bound, len(pickle.dumps(e5)) * 1.25)


def test_counts_accuracy_and_means_match_numpy_and_non_finite_values_are_skipped():
    fn = _SummaryFn()
    values = [0.25, float("nan"), 0.5, float("inf"), None, 1.0, -float("inf")]
    out = fn.extract_output(accumulate(fn, rows_of(values, label=lambda i: None if i == 2 else i % 2,
                                                   predicted=lambda i: 1)))
    assert out["count"] == 7 and out["labelled"] == 6
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["mean_score"] == pytest.approx(np.mean([0.5 + i % 7 for i in range(7)]))
    assert out["mean_saliency_sum"] == -1.0
    assert out["mean_deletion_auc"] == pytest.approx(np.mean([0.25, 0.5, 1.0]))
    assert (out["p10_deletion_auc"], out["median_deletion_auc"], out["p90_deletion_auc"]) == (0.25, 0.5, 1.0)
    assert all(math.isfinite(v) for v in out.values() if isinstance(v, float))
    assert out["mean_gini"] is None and out["median_gini"] is None  # no values: all None
