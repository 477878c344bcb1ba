"""Run-level summaries: per (method, target class) and per method over all classes."""
from __future__ import annotations

import apache_beam as beam

_SUMS = ("score", "time_ms", "saliency_abs_mean", "saliency_sum")


class _SummaryFn(beam.CombineFn):
    def create_accumulator(self):
        return {"count": 0, "labelled": 0, "correct": 0, **{k: 0.0 for k in _SUMS}}

    def add_input(self, acc, row):
        acc["count"] += 1
        if row.get("label") is not None:
            acc["labelled"] += 1
            acc["correct"] += int(row["label"] == row["predicted"])
        for k in _SUMS:
            acc[k] += float(row[k])
        return acc

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for acc in accumulators:
            for k in merged:
                merged[k] += acc[k]
        return merged

    def extract_output(self, acc):
        n = acc["count"]
        return {
            "count": n, "labelled": acc["labelled"],
            "accuracy": acc["correct"] / acc["labelled"] if acc["labelled"] else None,
            "mean_score": acc["score"] / n if n else None,
            "mean_time_ms": acc["time_ms"] / n if n else None,
            "mean_saliency_abs": acc["saliency_abs_mean"] / n if n else None,
            "mean_saliency_sum": acc["saliency_sum"] / n if n else None,
        }


class Summarize(beam.PTransform):
    """Saliency rows -> summary rows (target None = all classes of the method)."""

    def expand(self, rows):
        return (rows
                | "KeyByClass" >> beam.FlatMap(lambda r: [((r["method"], r["target"]), r), ((r["method"], None), r)])
                | "Combine" >> beam.CombinePerKey(_SummaryFn())
                | "ToRow" >> beam.MapTuple(lambda key, stats: {"method": key[0], "target": key[1], **stats}))
