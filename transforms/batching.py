"""Shard -> decoded, preprocessed batches, with every failure sent to the errors output."""
from __future__ import annotations

import itertools

from typing import Any

import apache_beam as beam
import numpy as np

from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import read_shard
from transforms.records import ErrorRecord, ImageBatch

ERRORS = "errors"
READ = "read"


class ReadShardBatches(beam.DoFn):
    """Read one shard and emit ImageBatch elements of at most ``batch_size`` images.

    Batches are cut in shard order, per image shape, inside one shard, so their
    composition (and so every float computed on them) is the same on every runner and
    rerun. Tagged outputs: ``errors`` (ErrorRecord) and ``read`` (1 per record read,
    good or bad, for the manifest's counts). ``limit_per_shard`` stops after that many
    records of each shard (a deterministic sample: the first ones).
    """

    def __init__(self, prep: Preprocessing, batch_size: int, storage_options: dict[str, Any] | None = None,
                 limit_per_shard: int | None = None):
        self.prep, self.batch_size, self.storage_options = prep, batch_size, storage_options
        self.limit_per_shard = limit_per_shard

    def process(self, shard_url: str):
        pending: dict[tuple[int, ...], list] = {}
        records = read_shard(shard_url, self.storage_options)
        if self.limit_per_shard is not None:
            records = itertools.islice(records, self.limit_per_shard)
        for record in records:
            yield beam.pvalue.TaggedOutput(READ, 1)
            if isinstance(record, ErrorRecord):
                yield beam.pvalue.TaggedOutput(ERRORS, record)
                continue
            try:
                array = decode(record, self.prep.max_pixels)
                pixels = preprocess(array, self.prep)
            except BadImage as e:
                yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(record.image_id, record.source, e.stage, str(e)))
                continue
            group = pending.setdefault(pixels.shape, [])
            group.append((record, array.shape[:2], pixels))
            if len(group) == self.batch_size:
                yield _to_batch(pending.pop(pixels.shape))
        for group in pending.values():
            yield _to_batch(group)


def _to_batch(group) -> ImageBatch:
    return ImageBatch(
        image_ids=[r.image_id for r, _, _ in group],
        sources=[r.source for r, _, _ in group],
        labels=[r.label for r, _, _ in group],
        sizes=[tuple(int(v) for v in size) for _, size, _ in group],
        pixels=np.stack([p for _, _, p in group]),
    )
