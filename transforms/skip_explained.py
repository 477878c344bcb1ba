"""Incremental audits in the Beam job: explain only the (image, method) pairs the history lacks.

The launcher (pipelines.incremental) has already left out the shards every method explained
before and says, per shard it reads, which methods are still to run there. Within those shards
an image id the history already explained (for this model, with the same method options) is
found by a join of two id listings, the shards' and the history's saliency files', so the side
input the main pass reads holds only the ids that are in both: the repeats, not the dataset.

Every (image, method) pair a read record reaches is explained, an error, or skipped here, and the
skipped ones are counted (tag ``skipped``: ((method, shard), n)), so read = explained + errors +
skipped, and the history knows which shards a run explained whole by itself.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq

from transforms import storage
from transforms.records import ImageBatch

SKIPPED = "skipped"
log = logging.getLogger("saliency_audit")


def explained_ids(url: str, methods: tuple[str, ...], storage_options: dict[str, Any] | None):
    """(image_id, method) for each row of one recorded saliency file whose method counts. A file
    that is gone or unreadable holds nothing: its images are explained again."""
    try:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image_id", "method"])
    except Exception as e:  # noqa: BLE001 - the history's files are another run's output
        log.warning("history file %s unreadable (%s: %s); its images will be explained again", url,
                    type(e).__name__, " ".join(str(e).split())[:120])
        return
    wanted = set(methods)
    for image_id, method in zip(table.column("image_id").to_pylist(), table.column("method").to_pylist()):
        if method in wanted and isinstance(image_id, str):
            yield image_id, method


class _InBoth(beam.CombineFn):
    """(in this run's shards, methods the history explained) of one image id."""

    def create_accumulator(self):
        return False, frozenset()

    def add_input(self, acc, value):
        kind, method = value
        return (acc[0] or kind == "input"), (acc[1] | {method} if kind == "done" else acc[1])

    def merge_accumulators(self, accumulators):
        found, methods = False, frozenset()
        for f, m in accumulators:
            found, methods = found or f, methods | m
        return found, methods

    def extract_output(self, acc):
        return acc


class ExplainedBefore(beam.PTransform):
    """(image_id, shard url) of the shards read -> (image_id, methods the history explained it
    with), for the ids in both."""

    def __init__(self, history_files: dict[str, tuple[str, ...]], storage_options: dict[str, Any] | None):
        super().__init__()
        self.history_files, self.storage_options = history_files, storage_options

    def expand(self, listed):
        done = (listed.pipeline
                | "HistoryFiles" >> beam.Create(sorted(self.history_files.items()))
                | "SpreadHistoryFiles" >> beam.Reshuffle()
                | "HistoryIds" >> beam.FlatMap(lambda kv, options: explained_ids(*kv, options), self.storage_options)
                | "Done" >> beam.MapTuple(lambda image_id, method: (image_id, ("done", method))))
        read = listed | "Input" >> beam.MapTuple(lambda image_id, _: (image_id, ("input", None)))
        return ((done, read) | "BothSides" >> beam.Flatten()
                | "PerId" >> beam.CombinePerKey(_InBoth())
                | "InBoth" >> beam.Filter(lambda kv: kv[1][0] and kv[1][1])
                | "Methods" >> beam.MapTuple(lambda image_id, acc: (image_id, tuple(sorted(acc[1])))))


class SkipExplained(beam.DoFn):
    """Batches -> the same batches, each image marked with the methods it skips (the shard's
    methods already explained, and the history's for its id); images that skip every method
    are dropped here, before the model sees them."""

    def __init__(self, methods: list[str], needed: dict[str, tuple[str, ...]]):
        self.methods, self.needed = list(methods), needed

    def process(self, batch: ImageBatch, done: dict[str, tuple[str, ...]]):
        everything = frozenset(self.methods)
        shard_done = everything - frozenset(self.needed.get(batch.sources[0], self.methods))
        skip = [shard_done | frozenset(done.get(image_id, ())) for image_id in batch.image_ids]
        keep = [i for i, s in enumerate(skip) if not everything <= s]
        dropped = len(skip) - len(keep)
        if dropped:
            for method in self.methods:
                yield beam.pvalue.TaggedOutput(SKIPPED, ((method, batch.sources[0]), dropped))
        if not keep:
            return
        marks = [skip[i] for i in keep]
        yield dataclasses.replace(batch.take(keep) if dropped else batch, skip=marks if any(marks) else None)
