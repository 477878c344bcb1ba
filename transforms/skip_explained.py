"""Incremental audits in the Beam job: explain only the (image, method, target class) triples the
history lacks.

The launcher (saliency_audit.pipelines.job.incremental) has already left out the shards every method explained
before and says, per shard it reads, which methods are still to run there. Within those shards
an image the history already explained (for this model, with the same method options) is found
by a join of two id listings, the shards' and the history's saliency files', so the side input
the main pass reads holds only the ids that are in both: the repeats, not the dataset. An image
counts by its id and its record (``record_sha256``: the sha256 of its bytes, its label and its
ground truth): the history's newest map of the id must be of the record read now, else it is
explained again, so a relabelled image (or one whose mask or boxes changed) gets maps of its new
target, label and localisation. (``content_sha256``, the image bytes' hash alone, is what the
gates compare a baseline's images by.)

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

from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.records import SKIPPED, TARGETS, ImageBatch
from saliency_audit.transforms.model.targets import PREDICTED, held_classes, parse_targets

CONTENT = "record_sha256"  # the saliency rows' column (saliency_audit.transforms.io.rows): the skip key
NO_CONTENT = ""  # a recorded map without a record hash: it matches no image read
log = logging.getLogger("saliency_audit")


def explained_ids(url: str, run_id: str, methods: tuple[str, ...], storage_options: dict[str, Any] | None):
    """(image_id, method, record sha256, run id, target class, its rank) for each row of one recorded
    saliency file whose method counts. A file that is gone or unreadable holds nothing: its images
    are explained again. A file written before record hashes were recorded gives NO_CONTENT, which
    matches no image read: whether its maps are of the records read now (image, label, ground
    truth) is unknown. A row written before ranks were has rank 1 if its target is its prediction,
    else an unknown rank (None)."""
    try:
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            columns = [c for c in ("image_id", "method", CONTENT, "target", "target_rank", "predicted")
                       if c in parquet.schema_arrow.names]
            table = parquet.read(columns=columns)
    except Exception as e:  # noqa: BLE001 - the history's files are another run's output
        log.warning("history file %s unreadable (%s: %s); its images will be explained again", url,
                    type(e).__name__, " ".join(str(e).split())[:120])
        return
    wanted = set(methods)

    def column(name: str) -> list:
        return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows

    for image_id, method, content, target, rank, predicted in zip(
            column("image_id"), column("method"), column(CONTENT), column("target"), column("target_rank"),
            column("predicted")):
        if method in wanted and isinstance(image_id, str) and isinstance(target, int):
            rank = rank if rank is not None else 1 if target == predicted else None
            yield image_id, method, content or NO_CONTENT, run_id, target, rank


def _newer(seen: tuple, other: tuple | None) -> tuple:
    """Of two (run id, content, rank): the later run's (run ids sort by start time); ties by
    content, so that every runner picks the same."""
    return seen if other is None or seen[:2] > other[:2] else other


class _NewestContent(beam.CombineFn):
    """Of one image id: the contents this run's shards hold under it, and per (method, target class)
    the newest recorded run's (run id, content, rank), and under (method, None) the newest of any
    class: an image the newest run saw with other content (replaced, or replaced and put back)
    holds no map of the content read now, whichever classes that run explained."""

    def create_accumulator(self):
        return set(), {}

    def add_input(self, acc, value):
        contents, newest = acc
        if value[0] == "input":
            contents.add(value[1])
        else:
            _, method, content, run_id, target, rank = value
            for key in ((method, target), (method, None)):
                newest[key] = _newer((run_id, content, rank), newest.get(key))
        return acc

    def merge_accumulators(self, accumulators):
        contents, newest = set(), {}
        for more, seen in accumulators:
            contents |= more
            for key, run_content in seen.items():
                newest[key] = _newer(run_content, newest.get(key))
        return contents, newest

    def extract_output(self, acc):
        """content read -> method -> the (class, rank) pairs whose newest recorded map is of that content."""
        contents, newest = acc
        out = {}
        classes = sorted((key for key in newest if key[1] is not None), key=lambda key: (key[0], key[1]))
        for content in contents:
            held: dict[str, list] = {}
            for method, target in classes:
                _, done, rank = newest[(method, target)]
                if done == content and newest[(method, None)][1] == content:
                    held.setdefault(method, []).append((target, rank))
            out[content] = {method: tuple(pairs) for method, pairs in held.items()}
        return out


class ExplainedBefore(beam.PTransform):
    """(image_id, shard url, content: the record's hash) of the shards read -> ((image_id, content),
    method -> the (target class, rank) pairs whose newest recorded map in the history is of that very
    content). An id whose image changed since (another content under the same id) is explained
    again, and so is one whose image changed and changed back: the newest map is of the other image."""

    def __init__(self, history_files: dict[str, tuple[str, tuple[str, ...]]],
                 storage_options: dict[str, Any] | None):
        super().__init__()
        self.history_files, self.storage_options = history_files, storage_options

    def expand(self, listed):
        done = (listed.pipeline
                | "HistoryFiles" >> beam.Create(sorted(self.history_files.items()))
                | "SpreadHistoryFiles" >> beam.Reshuffle()
                | "HistoryIds" >> beam.FlatMap(lambda kv, options: explained_ids(kv[0], *kv[1], options),
                                               self.storage_options)
                | "Done" >> beam.Map(lambda found: (found[0], ("done", *found[1:]))))
        read = listed | "Input" >> beam.MapTuple(lambda image_id, _, content: (image_id, ("input", content)))
        return ((done, read) | "BothSides" >> beam.Flatten()
                | "PerId" >> beam.CombinePerKey(_NewestContent())
                | "SameContent" >> beam.FlatMapTuple(
                    lambda image_id, found: [((image_id, content), methods) for content, methods in found.items()
                                             if methods]))


class SkipExplained(beam.DoFn):
    """Batches -> the same batches, each image marked with the methods it skips (the shard's
    methods already explained, and those whose maps of every class the run's --target names the
    history holds for its id and content) and, per other method, the classes the history holds
    (those targets only are skipped, after the forward pass). Images that skip every method are
    dropped here, before the model sees them, their (image, target) pairs counted as skipped."""

    def __init__(self, methods: list[str], needed: dict[str, tuple[str, ...]], target: str = PREDICTED):
        self.methods, self.needed, self.requests = list(methods), needed, parse_targets(target)

    def process(self, batch: ImageBatch, done: dict[tuple[str, str], dict[str, tuple]]):
        everything = frozenset(self.methods)
        shard_done = everything - frozenset(self.needed.get(batch.sources[0], self.methods))
        contents = batch.record_sha256 or [None] * len(batch.image_ids)
        skip, held, pairs = [], [], []
        for image_id, content, label in zip(batch.image_ids, contents, batch.labels):
            found, skipping, partly, classes = done.get((image_id, content), {}), set(shard_done), {}, None
            for method, recorded in found.items():
                if method in skipping or method not in everything:
                    continue
                whole = held_classes(self.requests, dict(recorded), label)
                if whole is None:
                    partly[method] = frozenset(cls for cls, _ in recorded)
                else:
                    skipping.add(method)
                    classes = whole
            skip.append(frozenset(skipping))
            held.append(partly)
            pairs.append(len(classes) if classes else 1)
        keep = [i for i, s in enumerate(skip) if not everything <= s]
        dropped = [i for i, s in enumerate(skip) if everything <= s]
        if dropped:
            for method in self.methods:
                yield beam.pvalue.TaggedOutput(SKIPPED, ((method, batch.sources[0]), sum(pairs[i] for i in dropped)))
            extra = sum(pairs[i] - 1 for i in dropped)
            if extra:
                yield beam.pvalue.TaggedOutput(TARGETS, extra)
        if not keep:
            return
        marks, partial = [skip[i] for i in keep], [held[i] for i in keep]
        yield dataclasses.replace(batch.take(keep) if dropped else batch, skip=marks if any(marks) else None,
                                  held=partial if any(partial) else None)
