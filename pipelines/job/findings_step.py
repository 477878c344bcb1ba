"""The Clever-Hans findings' statistics, gathered inside the job (saliency_audit.pipelines.checks.findings).

Per (method, class) the job pools each stored map to the findings' grid and keeps the exact sum of
the cells and the sample of the smallest (hash, id): accumulators that merge in any order to the
same state. Each bundle pools its rows in batches (one map at a time cost ~100 us a row) into one
accumulator per (method, class); a combiner merges them, and the job writes the result to one
small file in the run's private folder. The launcher computes the findings from it without reading
a saliency file: its time and memory depend on the number of methods and classes, never on the
number of images.

A bundle that fails and is retried contributes neither files nor accumulators, so the statistics
hold exactly the rows of the committed files (the maps ``find_clever_hans`` would read).
"""
from __future__ import annotations

import io
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindows

from saliency_audit.pipelines.checks.findings import (
    DEFAULT_GRID,
    DEFAULT_SAMPLE,
    ClassMaps,
    add_rows,
    statistics_table,
)
from saliency_audit.transforms.io import storage
from saliency_audit.transforms.model.targets import main_request, satisfies, several

STATISTICS = "findings-statistics.parquet"  # in the run's private folder (Run.private)
BATCH_BYTES = 8 << 20  # a bundle's maps waiting to be pooled together, at most


class _PoolPerBundle(beam.DoFn):
    """Rows -> ((method, class), ClassMaps) once per bundle. With several targets per image, only the
    main request's rows count (one map per image and method)."""

    def __init__(self, grid: int, sample: int, request: str | None):
        self.grid, self.sample, self.request = grid, sample, request

    def start_bundle(self):
        self.groups: dict[tuple[str, int], ClassMaps] = {}
        self.rows: list[dict] = []
        self.bytes = 0

    def process(self, row):
        if self.request is None or satisfies(self.request, row):
            self.rows.append(row)
            self.bytes += getattr(row.get("saliency"), "nbytes", 0)
            if self.bytes >= BATCH_BYTES:
                self._pool()

    def _pool(self):
        add_rows(self.groups, self.rows, self.grid, self.sample)
        self.rows, self.bytes = [], 0

    def finish_bundle(self):
        self._pool()
        for key, group in self.groups.items():
            yield GlobalWindows.windowed_value((key, group))


class _MergeFn(beam.CombineFn):
    def __init__(self, sample: int):
        self.sample = sample

    def create_accumulator(self) -> ClassMaps:
        return ClassMaps(self.sample)

    def add_input(self, acc: ClassMaps, other: ClassMaps) -> ClassMaps:
        acc.merge(other)
        return acc

    def merge_accumulators(self, accumulators) -> ClassMaps:
        merged = self.create_accumulator()
        for acc in accumulators:
            merged.merge(acc)
        return merged

    def extract_output(self, acc: ClassMaps) -> ClassMaps:
        return acc


def _write(groups: list[tuple[tuple[str, int], ClassMaps]], url: str, grid: int,
           storage_options: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    pq.write_table(statistics_table(dict(groups), grid), buffer, compression="zstd")
    storage.write_bytes_atomic(url, buffer.getvalue(), storage_options)


class GatherFindingStatistics(beam.PTransform):
    """Stored saliency rows -> the findings' statistics, written to ``url`` (one put, written
    also when there are no rows)."""

    def __init__(self, url: str, target: Any, storage_options: dict[str, Any], grid: int = DEFAULT_GRID,
                 sample: int | None = None):
        super().__init__()
        self.url, self.storage_options, self.grid = url, storage_options, grid
        self.sample = sample or DEFAULT_SAMPLE
        self.request = main_request(target) if target is not None and several(target) else None

    def expand(self, rows):
        return (rows
                | "PoolPerBundle" >> beam.ParDo(_PoolPerBundle(self.grid, self.sample, self.request))
                | "PerClass" >> beam.CombinePerKey(_MergeFn(self.sample))
                | "AllClasses" >> beam.combiners.ToList()
                | "Write" >> beam.Map(_write, self.url, self.grid, self.storage_options))


def read_statistics(url: str, storage_options: dict[str, Any] | None = None):
    """The statistics a run's job wrote, as a table (saliency_audit.pipelines.checks.findings.STATISTICS_SCHEMA)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(url, storage_options)))
