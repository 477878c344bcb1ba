"""Shard -> decoded, preprocessed batches, with every failure sent to the errors output."""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import apache_beam as beam
import numpy as np
import torch

from saliency_audit.transforms.io import progress
from saliency_audit.transforms.io.prefetch import prefetched
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
from saliency_audit.transforms.model.threads import ThreadBudget, device_type

READ = "read"
PREFETCH = 2  # batches decoded ahead of the one the model is on (ReadShardBatches)


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

    Decoding and preprocessing run ahead in a pool of decode threads (``decode_threads``, or the
    worker's share of ``threads`` on ``device``: ThreadBudget.split; 0 decodes inline), at most
    ``prefetch`` batches of records beyond the one handed out, so the explain step fused after
    this one never waits for the decoder while the decoder keeps up. Outputs, their order and
    every error are the same with or without the pool. On a CUDA worker the batches' pixels are
    in pinned host memory, for a non-blocking copy to the device.
    """

    def __init__(self, prep: Preprocessing, batch_size: int, storage_options: dict[str, Any] | None = None,
                 limit_per_shard: int | None = None, progress: progress.Sink | None = None,
                 threads: ThreadBudget = ThreadBudget(), device: str = "cpu", prefetch: int = PREFETCH,
                 decode_threads: int | None = None):
        self.prep, self.batch_size, self.storage_options = prep, batch_size, storage_options
        self.limit_per_shard = limit_per_shard
        self.progress = progress
        self.threads, self.device, self.prefetch, self.decode_threads = threads, device, prefetch, decode_threads

    def process(self, shard_url: str):
        pending: dict[tuple[int, ...], list] = {}
        progress.shard_started(self.progress, shard_url)
        records = read_shard(shard_url, self.storage_options, max_pixels=self.prep.max_pixels)
        if self.limit_per_shard is not None:
            records = itertools.islice(records, self.limit_per_shard)
        kind = device_type(self.device)
        threads = self.threads.split(kind)[1] if self.decode_threads is None else self.decode_threads
        pin = kind == "cuda" and torch.cuda.is_available()
        # Beam fuses this step with the explain step: a batch yielded here is explained before the
        # next record is asked for, so the decoding of the next PREFETCH batches must already be
        # under way in the pool (prefetched), or the model would wait for it. In record order.
        ahead = prefetched(self._prepare, records, threads, self.prefetch * self.batch_size)
        self._open().add(ahead)
        for record, prepared in ahead:
            yield beam.pvalue.TaggedOutput(READ, 1)
            progress.record_read(self.progress, shard_url, failed=isinstance(prepared, ErrorRecord))
            if isinstance(prepared, ErrorRecord):
                yield beam.pvalue.TaggedOutput(ERRORS, prepared)
                continue
            size, pixels, mask = prepared
            group = pending.setdefault(pixels.shape, [])
            group.append((record, size, pixels, mask))
            if len(group) == self.batch_size:
                yield _to_batch(pending.pop(pixels.shape), pin)
        progress.shard_finished(self.progress, shard_url)
        for group in pending.values():
            yield _to_batch(group, pin)

    def _prepare(self, record: RawImage | ErrorRecord):
        return record if isinstance(record, ErrorRecord) else _prepare(record, self.prep)

    def _open(self) -> weakref.WeakSet:
        """The prefetching iterators of this instance's shards in progress (at most one: a DoFn
        instance processes one element at a time)."""
        if getattr(self, "_ahead", None) is None:
            self._ahead = weakref.WeakSet()
        return self._ahead

    def __getstate__(self):  # what runs on a worker is its own
        return {key: value for key, value in self.__dict__.items() if key != "_ahead"}

    def teardown(self):
        # A failed bundle (the model raised while this shard's generator waited at a yield) is
        # torn down without resuming that generator: close its pool here, not at garbage collection.
        for ahead in list(self._open()):
            try:
                ahead.close()
            except ValueError:  # running in another thread: it ends its pool itself when it ends
                pass

    def finish_bundle(self):
        progress.flush(self.progress)


def _prepare(record: RawImage, prep: Preprocessing) -> tuple[tuple[int, int], np.ndarray, np.ndarray | None] | ErrorRecord:
    """(original (height, width), model input [C,H,W], ground truth bool [H',W'] at the model
    input size or None), or the ErrorRecord that costs this record. Run in the decode pool: the
    decoded original is not kept (only its size), so what waits in the prefetch window is the
    model input."""
    stage = "decode"
    try:
        array = decode(record, prep.max_pixels)
        mask = ground_truth(record, array.shape[:2], prep.max_pixels)
        stage = "preprocess"
        return array.shape[:2], preprocess(array, prep), None if mask is None else resize_mask(mask, prep)
    except BadImage as e:
        return ErrorRecord(record.image_id, record.source, e.stage, str(e))
    except Exception as e:  # a failure nobody foresaw still costs only this record
        return ErrorRecord(record.image_id, record.source, stage, f"{type(e).__name__}: {e}")


def _to_batch(group, pin: bool = False) -> ImageBatch:
    pixels = _stack([p for _, _, p, _ in group], pin)
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


def _stack(arrays: list[np.ndarray], pin: bool) -> np.ndarray:
    """The batch's model input [B,C,H,W]; with ``pin`` (a CUDA worker) in page-locked host memory,
    so the explain step's copy to the device is a non-blocking DMA (torch's pinned-memory cache
    makes the allocation cheap after the first batches). Still a NumPy array: it pickles, as a
    plain one, where a runner moves it between stages."""
    if not pin:
        return np.stack(arrays)
    out = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.float32, pin_memory=True)
    np.stack(arrays, out=out.numpy())
    return out.numpy()
