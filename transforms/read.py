"""Shard -> decoded, preprocessed batches, with every failure sent to the errors output."""
from __future__ import annotations

import itertools
from typing import Any

import apache_beam as beam
import numpy as np

from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.preprocess import (
    BadImage,
    Preprocessing,
    decode,
    ground_truth,
    preprocess,
    resize_mask,
)
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ERRORS, ErrorRecord, ImageBatch, RawImage

READ = "read"


class ReadShardBatches(beam.DoFn):
    """Read one shard and emit ImageBatch elements of at most ``batch_size`` images.

    Batches are cut in shard order, per image shape, inside one shard, so their
    composition (and so every float computed on them) is the same on every runner and
    rerun. Tagged outputs: ``errors`` (ErrorRecord) and ``read`` (1 per record read,
    good or bad, for the manifest's counts). ``limit_per_shard`` stops after that many
    records of each shard (a deterministic sample: the first ones). ``progress``: where the
    worker reports the records read (saliency_audit.transforms.io.progress), or None. Ground truth
    (docs/ground_truth.md) rides along as ``ImageBatch.masks``/``has_mask``; a record whose
    ground truth cannot be read is an error like one whose image cannot.
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
            array, pixels, mask = prepared
            group = pending.setdefault(pixels.shape, [])
            group.append((record, array.shape[:2], pixels, mask))
            if len(group) == self.batch_size:
                yield _to_batch(pending.pop(pixels.shape))
        progress.shard_finished(self.progress, shard_url)
        for group in pending.values():
            yield _to_batch(group)

    def finish_bundle(self):
        progress.flush(self.progress)


def _prepare(record: RawImage, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | ErrorRecord:
    """(decoded [H,W,C], model input [C,H,W], ground truth bool [H',W'] at the model input
    size or None), or the ErrorRecord that costs this record."""
    stage = "decode"
    try:
        array = decode(record, prep.max_pixels)
        mask = ground_truth(record, array.shape[:2], prep.max_pixels)
        stage = "preprocess"
        return array, preprocess(array, prep), None if mask is None else resize_mask(mask, prep)
    except BadImage as e:
        return ErrorRecord(record.image_id, record.source, e.stage, str(e))
    except Exception as e:  # a failure nobody foresaw still costs only this record
        return ErrorRecord(record.image_id, record.source, stage, f"{type(e).__name__}: {e}")


def _to_batch(group) -> ImageBatch:
    pixels = np.stack([p for _, _, p, _ in group])
    has_mask = [m is not None for _, _, _, m in group]
    masks = None
    if any(has_mask):  # images without ground truth get an all-False row, flagged in has_mask
        empty = np.zeros(pixels.shape[2:], dtype=bool)
        masks = np.stack([empty if m is None else m for _, _, _, m in group])
    return ImageBatch(
        image_ids=[r.image_id for r, _, _, _ in group],
        sources=[r.source for r, _, _, _ in group],
        labels=[r.label for r, _, _, _ in group],
        sizes=[tuple(int(v) for v in size) for _, size, _, _ in group],
        pixels=pixels,
        masks=masks,
        has_mask=has_mask if masks is not None else None,
        content_sha256=[r.content_sha256 for r, _, _, _ in group],
        record_sha256=[r.record_sha256 for r, _, _, _ in group],
    )
