"""Image ids are unique per audit: an id read from several shards is explained once, from the
first of those shards in shard order; later records with it become errors (stage read).

A first, cheap pass lists each shard's ids (read, not decoded) and finds the ids that occur in
more than one shard; the main pass drops their later copies. (Repeats within one shard are
the reader's business: it keeps the first.) Without repeats the side input is empty, and the
main pass changes nothing.
"""
from __future__ import annotations

import itertools

import apache_beam as beam

from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ErrorRecord, ImageBatch, RawImage
from saliency_audit.transforms.read import ERRORS, ReadShardBatches


def shard_ids(url: str, reader: ReadShardBatches, hashes: bool = True):
    """(image_id, shard url, record sha256) once for every id the reader would explain from this
    shard (the hash of its image, label and ground truth, for an audit history:
    saliency_audit.transforms.skip_explained; None without ``hashes``, where only the ids are used:
    hashing every image took a tenth of this pass)."""
    records = read_shard(url, reader.storage_options, max_pixels=reader.prep.max_pixels)
    if reader.limit_per_shard is not None:
        records = itertools.islice(records, reader.limit_per_shard)
    first = {}
    for record in records:
        if isinstance(record, RawImage) and record.image_id not in first:
            first[record.image_id] = record.record_sha256 if hashes else None
    for image_id, content in first.items():
        yield image_id, url, content


class _FirstShard(beam.CombineFn):
    """(first shard url in sort order, number of shards) of one id."""

    def create_accumulator(self):
        return None, 0

    def add_input(self, acc, url):
        first, n = acc
        return (url if first is None or url < first else first), n + 1

    def merge_accumulators(self, accumulators):
        first, n = None, 0
        for url, count in accumulators:
            if url is not None and (first is None or url < first):
                first = url
            n += count
        return first, n

    def extract_output(self, acc):
        return acc


class ListShardIds(beam.PTransform):
    """Shard urls -> (image_id, shard url, record sha256 or None without ``hashes``) for every id
    the reader would explain (read, not decoded)."""

    def __init__(self, reader: ReadShardBatches, hashes: bool = True):
        super().__init__()
        self.reader, self.hashes = reader, hashes

    def expand(self, shards):
        return shards | "ShardIds" >> beam.FlatMap(shard_ids, self.reader, self.hashes)


class FirstShardOfRepeatedIds(beam.PTransform):
    """(image_id, shard url, content) -> (image_id, first shard url) for the ids found in more than one shard."""

    def expand(self, listed):
        return (listed
                | "IdAndShard" >> beam.MapTuple(lambda image_id, url, _: (image_id, url))
                | "FirstShard" >> beam.CombinePerKey(_FirstShard())
                | "Repeated" >> beam.Filter(lambda kv: kv[1][1] > 1)
                | "KeepFirst" >> beam.MapTuple(lambda image_id, first: (image_id, first[0])))


class DropRepeatedIds(beam.DoFn):
    """Batches -> the same batches without images whose id an earlier shard already holds."""

    def process(self, batch: ImageBatch, first_shard: dict[str, str]):
        keep = [i for i, (image_id, source) in enumerate(zip(batch.image_ids, batch.sources))
                if first_shard.get(image_id, source) == source]
        if len(keep) == len(batch.image_ids):
            yield batch
            return
        for i in sorted(set(range(len(batch.image_ids))) - set(keep)):
            yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                batch.image_ids[i], batch.sources[i], "read",
                f"duplicate image id: already read from {first_shard[batch.image_ids[i]]}"))
        if keep:
            yield batch.take(keep)
