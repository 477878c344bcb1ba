"""A Parquet sink that writes through fsspec with deterministic file names and contents.

Rows are spread over a fixed number of files by a hash of their image id and each file
is sorted, so a retried bundle or a rerun rewrites the same files with the same bytes,
on every runner. (Beam's WriteToParquet names files per run and clears the prefix it
writes to; this sink writes only into the run's staging directory, which the driver
publishes when the whole run has succeeded.)
"""
from __future__ import annotations

import posixpath
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import storage
from transforms.records import seed_for
from transforms.rows import to_table


class _WriteFile(beam.DoFn):
    def __init__(self, directory: str, schema: pa.Schema, num_files: int, sort_by: list[str],
                 storage_options: dict[str, Any] | None):
        self.directory, self.schema, self.num_files = directory, schema, num_files
        self.sort_by, self.storage_options = sort_by, storage_options

    def process(self, element):
        index, rows = element
        rows = sorted(rows, key=lambda r: tuple("" if r.get(k) is None else str(r.get(k)) for k in self.sort_by))
        table = to_table(rows, self.schema)
        url = storage.join(self.directory, f"part-{index:05d}-of-{self.num_files:05d}.parquet")
        fs, path = storage.filesystem(url, self.storage_options)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        yield url


class WriteParquet(beam.PTransform):
    """Write dict rows to ``directory/part-NNNNN-of-MMMMM.parquet`` (at most num_files files)."""

    def __init__(self, directory: str, schema: pa.Schema, *, num_files: int = 1, key: str = "image_id",
                 sort_by: list[str] | None = None, storage_options: dict[str, Any] | None = None):
        super().__init__()
        self.directory, self.schema, self.num_files, self.key = directory, schema, max(1, num_files), key
        self.sort_by = sort_by or [key]
        self.storage_options = storage_options

    def expand(self, rows):
        num_files, key = self.num_files, self.key
        return (rows
                | "ByFile" >> beam.Map(lambda r: (seed_for(str(r.get(key))) % num_files, r))
                | "GroupByFile" >> beam.GroupByKey()
                | "WriteFiles" >> beam.ParDo(_WriteFile(self.directory, self.schema, num_files,
                                                        self.sort_by, self.storage_options)))


def write_empty_if_missing(directory: str, schema: pa.Schema, storage_options: dict | None = None) -> None:
    """Give an output directory with no rows one empty file, so readers still find the schema."""
    fs, path = storage.filesystem(directory, storage_options)
    fs.makedirs(path, exist_ok=True)
    if not fs.glob(f"{path}/*.parquet"):
        with fs.open(f"{path}/part-00000-of-00001.parquet", "wb") as f:
            pq.write_table(schema.empty_table(), f, compression="zstd")
