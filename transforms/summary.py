"""Run-level summaries: per (method, --target request, target class) and per (method, request) over
all classes."""
from __future__ import annotations

import math

import apache_beam as beam
from datasketches import kll_doubles_sketch

from saliency_audit.transforms.io.rows import METRIC_COLUMNS, SUMMARY_STATISTICS
from saliency_audit.transforms.model.targets import PREDICTED, satisfies, summary_requests

_MEANS = ("score", "time_ms", "saliency_abs_mean", "saliency_sum")

# KLL sketch size: at k=200 a quantile's rank is off by at most ~1.33% of n (99% confidence,
# kll_doubles_sketch.get_normalized_rank_error(200, False) = 0.0133) whatever n, and a sketch
# serializes to ~4.7 KB after 1e5 values, ~5 KB after 1e6 (it grows with log(n/k) only).
# Below k values the sketch keeps them all and the quantiles are exact data values.
SKETCH_K = 200
_QUANTILES = (("p10", 0.1), ("median", 0.5), ("p90", 0.9))


class SummaryAccumulator:
    """Counts, exact sums of the finite values (for means) and one KLL sketch per metric.

    Memory and its pickled size stay bounded whatever the number of images (Beam pickles
    accumulators between stages): the sketches are pickled in their compact serialized form.
    Non-finite values are skipped, so one inf or NaN never turns a mean into NaN.
    """

    def __init__(self) -> None:
        self.count = self.labelled = self.correct = self.empty = self.constant = 0
        self.sums = dict.fromkeys(_MEANS + METRIC_COLUMNS, 0.0)
        self.finite = dict.fromkeys(_MEANS + METRIC_COLUMNS, 0)
        self.sketches = {k: kll_doubles_sketch(SKETCH_K) for k in METRIC_COLUMNS}

    def add_value(self, key: str, value) -> None:
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        self.sums[key] += value
        self.finite[key] += 1
        if key in self.sketches:
            self.sketches[key].update(value)

    def merge(self, other: SummaryAccumulator) -> None:
        self.count += other.count
        self.labelled += other.labelled
        self.correct += other.correct
        self.empty += other.empty
        self.constant += other.constant
        for k in self.sums:
            self.sums[k] += other.sums[k]
            self.finite[k] += other.finite[k]
        for k, sketch in other.sketches.items():
            if not sketch.is_empty():
                self.sketches[k].merge(sketch)

    def mean(self, key: str) -> float | None:
        return self.sums[key] / self.finite[key] if self.finite[key] else None

    def statistics(self, key: str) -> dict[str, float | None]:
        """mean, median, p10 and p90 of one metric's values (all None without values)."""
        sketch = self.sketches[key]
        if sketch.is_empty():
            return {f"{stat}_{key}": None for stat in SUMMARY_STATISTICS}
        out = {f"mean_{key}": self.mean(key)}
        out.update({f"{stat}_{key}": float(sketch.get_quantile(q)) for stat, q in _QUANTILES})
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["sketches"] = {k: s.serialize() for k, s in self.sketches.items() if not s.is_empty()}
        return state

    def __setstate__(self, state: dict) -> None:
        sketches = {k: kll_doubles_sketch(SKETCH_K) for k in METRIC_COLUMNS}
        sketches.update({k: kll_doubles_sketch.deserialize(b) for k, b in state["sketches"].items()})
        self.__dict__.update(state, sketches=sketches)


class _SummaryFn(beam.CombineFn):
    """Counts, accuracy, exact means and sketched quantiles per key; with ``rows=False`` the
    output is the accumulator itself, to be merged further (per class -> per method)."""

    def __init__(self, rows: bool = True):
        self.rows = rows

    def create_accumulator(self):
        return SummaryAccumulator()

    def add_input(self, acc, row):
        acc.count += 1
        if row.get("label") is not None:
            acc.labelled += 1
            acc.correct += int(row["label"] == row["predicted"])
        if row.get("saliency_min") == row.get("saliency_max"):  # one value everywhere: points nowhere
            acc.constant += 1
            acc.empty += int(row.get("saliency_max") == 0)
        for k in _MEANS + METRIC_COLUMNS:
            acc.add_value(k, row.get(k))
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            merged.merge(acc)
        return merged

    def extract_output(self, acc):
        return summary_row(acc) if self.rows else acc


class _MergeSummaries(_SummaryFn):
    """Accumulators in, one summary row out."""

    def add_input(self, acc, other):
        acc.merge(other)
        return acc


def summary_row(acc: SummaryAccumulator) -> dict:
    n = acc.count
    out = {"count": n, "labelled": acc.labelled,
           "accuracy": acc.correct / acc.labelled if acc.labelled else None,
           "mean_score": acc.mean("score"),
           "mean_time_ms": acc.mean("time_ms"),
           "mean_saliency_abs": acc.mean("saliency_abs_mean"),
           "mean_saliency_sum": acc.mean("saliency_sum"),
           "empty_maps": acc.empty, "constant_maps": acc.constant,
           "empty_share": acc.empty / n if n else None, "constant_share": acc.constant / n if n else None}
    for k in METRIC_COLUMNS:
        out.update(acc.statistics(k))
    return out


class Summarize(beam.PTransform):
    """Saliency rows -> summary rows per (method, request, target class), and per (method, request)
    (target None) from the merged per-class accumulators. A row counts under each request it
    answers (targets.satisfies), once per request; with one --target, under that one."""

    def __init__(self, target: str = PREDICTED):
        super().__init__()
        self.requests = summary_requests(target)

    def expand(self, rows):
        requests = self.requests
        per_class = (rows
                     | "KeyByClass" >> beam.FlatMap(lambda r: [((r["method"], q, r["target"]), r)
                                                               for q in requests if satisfies(q, r)])
                     | "Combine" >> beam.CombinePerKey(_SummaryFn(rows=False)))
        overall = (per_class
                   | "KeyByMethod" >> beam.MapTuple(lambda key, acc: ((key[0], key[1], None), acc))
                   | "Merge" >> beam.CombinePerKey(_MergeSummaries()))
        classes = per_class | "ClassRows" >> beam.MapTuple(lambda key, acc: (key, summary_row(acc)))
        return ((classes, overall) | "Both" >> beam.Flatten()
                | "ToRow" >> beam.MapTuple(lambda key, stats: {"method": key[0], "target_source": key[1],
                                                               "target": key[2], **stats}))
