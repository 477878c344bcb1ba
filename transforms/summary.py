"""Run-level summaries: per (method, target class) and per method over all classes."""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from transforms.rows import METRIC_COLUMNS, SUMMARY_STATISTICS

_MEANS = ("score", "time_ms", "saliency_abs_mean", "saliency_sum")


class _SummaryFn(beam.CombineFn):
    """Counts, accuracy, means, and the metric values themselves for exact quantiles (a few
    floats per image: small beside the maps the same run writes)."""

    def create_accumulator(self):
        return {"count": 0, "labelled": 0, "correct": 0, "sums": dict.fromkeys(_MEANS, 0.0),
                "metrics": {k: [] for k in METRIC_COLUMNS}}

    def add_input(self, acc, row):
        acc["count"] += 1
        if row.get("label") is not None:
            acc["labelled"] += 1
            acc["correct"] += int(row["label"] == row["predicted"])
        for k in _MEANS:
            acc["sums"][k] += float(row[k])
        for k in METRIC_COLUMNS:
            if row.get(k) is not None:
                acc["metrics"][k].append(float(row[k]))
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for k in ("count", "labelled", "correct"):
                merged[k] += acc[k]
            for k in _MEANS:
                merged["sums"][k] += acc["sums"][k]
            for k in METRIC_COLUMNS:
                merged["metrics"][k].extend(acc["metrics"][k])
        return merged

    def extract_output(self, acc):
        n = acc["count"]
        out = {"count": n, "labelled": acc["labelled"],
               "accuracy": acc["correct"] / acc["labelled"] if acc["labelled"] else None,
               "mean_score": acc["sums"]["score"] / n if n else None,
               "mean_time_ms": acc["sums"]["time_ms"] / n if n else None,
               "mean_saliency_abs": acc["sums"]["saliency_abs_mean"] / n if n else None,
               "mean_saliency_sum": acc["sums"]["saliency_sum"] / n if n else None}
        for k, values in acc["metrics"].items():
            out.update(_statistics(k, values))
        return out


def _statistics(name: str, values: list[float]) -> dict[str, float | None]:
    """mean, median, p10 and p90 of one metric's values (all None without values)."""
    if not values:
        return {f"{stat}_{name}": None for stat in SUMMARY_STATISTICS}
    p10, median, p90 = np.quantile(values, (0.1, 0.5, 0.9))
    return {f"mean_{name}": float(np.mean(values)), f"median_{name}": float(median),
            f"p10_{name}": float(p10), f"p90_{name}": float(p90)}


class Summarize(beam.PTransform):
    """Saliency rows -> summary rows (target None = all classes of the method)."""

    def expand(self, rows):
        return (rows
                | "KeyByClass" >> beam.FlatMap(lambda r: [((r["method"], r["target"]), r), ((r["method"], None), r)])
                | "Combine" >> beam.CombinePerKey(_SummaryFn())
                | "ToRow" >> beam.MapTuple(lambda key, stats: {"method": key[0], "target": key[1], **stats}))
