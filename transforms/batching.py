"""Shard -> decoded, preprocessed batches, with every failure sent to the errors output."""
from __future__ import annotations

import itertools

from typing import Any

import apache_beam as beam
import numpy as np

from transforms import progress
from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import read_shard
from transforms.records import ErrorRecord, ImageBatch, RawImage

ERRORS = "errors"
READ = "read"


class ReadShardBatches(beam.DoFn):
    """Read one shard and emit ImageBatch elements of at most ``batch_size`` images.

    Batches are cut in shard order, per image shape, inside one shard, so their
    composition (and so every float computed on them) is the same on every runner and
    rerun. Tagged outputs: ``errors`` (ErrorRecord) and ``read`` (1 per record read,
    good or bad, for the manifest's counts). ``limit_per_shard`` stops after that many
    records of each shard (a deterministic sample: the first ones). ``progress``: where the
    worker reports the records read (transforms.progress), or None.
    """

    def __init__(self, prep: Preprocessing, batch_size: int, storage_options: dict[str, Any] | None = None,
                 limit_per_shard: int | None = None, progress: progress.Sink | None = None):
        self.prep, self.batch_size, self.storage_options = prep, batch_size, storage_options
        self.limit_per_shard = limit_per_shard
        self.progress = progress

    def process(self, shard_url: str):
        pending: dict[tuple[int, ...], list] = {}
        progress.shard_started(self.progress, shard_url)
        records = read_shard(shard_url, self.storage_options, max_pixels=self.prep.max_pixels)
        if self.limit_per_shard is not None:
            records = itertools.islice(records, self.limit_per_shard)
        for record in records:
            yield beam.pvalue.TaggedOutput(READ, 1)
            prepared = record if isinstance(record, ErrorRecord) else _prepare(record, self.prep)
            progress.record_read(self.progress, shard_url, failed=isinstance(prepared, ErrorRecord))
            if isinstance(prepared, ErrorRecord):
                yield beam.pvalue.TaggedOutput(ERRORS, prepared)
                continue
            array, pixels = prepared
            group = pending.setdefault(pixels.shape, [])
            group.append((record, array.shape[:2], pixels))
            if len(group) == self.batch_size:
                yield _to_batch(pending.pop(pixels.shape))
        progress.shard_finished(self.progress, shard_url)
        for group in pending.values():
            yield _to_batch(group)

    def finish_bundle(self):
        progress.flush(self.progress)


def _prepare(record: RawImage, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray] | ErrorRecord:
    """(decoded [H,W,C], model input [C,H,W]), or the ErrorRecord that costs this record."""
    stage = "decode"
    try:
        array = decode(record, prep.max_pixels)
        stage = "preprocess"
        return array, preprocess(array, prep)
    except BadImage as e:
        return ErrorRecord(record.image_id, record.source, e.stage, str(e))
    except Exception as e:  # a failure nobody foresaw still costs only this record
        return ErrorRecord(record.image_id, record.source, stage, f"{type(e).__name__}: {e}")


def _to_batch(group) -> ImageBatch:
    return ImageBatch(
        image_ids=[r.image_id for r, _, _ in group],
        sources=[r.source for r, _, _ in group],
        labels=[r.label for r, _, _ in group],
        sizes=[tuple(int(v) for v in size) for _, size, _ in group],
        pixels=np.stack([p for _, _, p in group]),
    )
