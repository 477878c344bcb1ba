"""A streaming Parquet sink through fsspec: memory holds one row group, never a whole file.

Each writer instance appends rows to its own file (``part-<writer>-<n>.parquet``) in row groups of
about ``group_bytes`` and starts a new file after about ``file_bytes``, so memory depends on the
row group, not on the dataset. (Beam's WriteToParquet clears the prefix it writes to, and the
grouped sink this replaces sorted every row of a file in memory.)

A bundle that fails and is retried may leave a file behind; only the files that the sink emits
downstream are committed, and the driver deletes the others before it publishes the run
(``saliency_audit.pipelines.audit``). The files live in the run's own folder (``saliency_audit.transforms.io.publication``).
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindows

from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.rows import to_table

GROUP_BYTES = 32 << 20   # a row group buffered in memory before it is written
FILE_BYTES = 512 << 20   # a file is closed and a new one started after this much


def row_bytes(row: dict) -> int:
    """A cheap estimate of a row's size: its arrays and lists, plus a constant for the scalars."""
    size = 512
    for value in row.values():
        if isinstance(value, np.ndarray):
            size += value.nbytes
        elif isinstance(value, (list, tuple)):
            size += 8 * len(value)
        elif isinstance(value, (str, bytes)):
            size += len(value)
    return size


class ParquetFileWriter:
    """Rows -> Parquet files under ``directory``, rolled by size; ``closed`` lists finished files."""

    def __init__(self, directory: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None,
                 group_bytes: int = GROUP_BYTES, file_bytes: int = FILE_BYTES):
        self.directory, self.schema, self.storage_options = directory, schema, storage_options
        self.group_bytes, self.file_bytes = group_bytes, file_bytes
        self.writer_id = uuid.uuid4().hex[:12]
        self.rows: list[dict] = []
        self.buffered = self.written = 0
        self.files = 0
        self._file = self._writer = self._url = None
        self.closed: list[str] = []

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.buffered += row_bytes(row)
        if self.buffered >= self.group_bytes:
            self._flush()
        if self.written >= self.file_bytes:
            self._close_file()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self._writer is None:
            self._url = storage.join(self.directory, f"part-{self.writer_id}-{self.files:05d}.parquet")
            fs, path = storage.filesystem(self._url, self.storage_options)
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            self._file = fs.open(path, "wb")
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
            self.files += 1
        self._writer.write_table(to_table(self.rows, self.schema))
        self.written += self.buffered
        self.rows, self.buffered = [], 0

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self.closed.append(self._url)
        self._file = self._writer = self._url = None
        self.written = 0

    def close(self) -> list[str]:
        """Write what is buffered, close the open file, and return (and forget) the finished files."""
        self._flush()
        self._close_file()
        closed, self.closed = self.closed, []
        return closed


class _WriteRows(beam.DoFn):
    def __init__(self, directory: str, schema: pa.Schema, storage_options: dict[str, Any] | None):
        self.directory, self.schema, self.storage_options = directory, schema, storage_options

    def start_bundle(self):
        self._writer = ParquetFileWriter(self.directory, self.schema, self.storage_options)

    def process(self, row):
        self._writer.write(row)
        closed, self._writer.closed = self._writer.closed, []
        yield from closed

    def finish_bundle(self):
        for url in self._writer.close():
            yield GlobalWindows.windowed_value(url)


class WriteParquet(beam.PTransform):
    """Write dict rows to Parquet files in ``directory``; the output is the URLs of the files written."""

    def __init__(self, directory: str, schema: pa.Schema, *, storage_options: dict[str, Any] | None = None):
        super().__init__()
        self.directory, self.schema, self.storage_options = directory, schema, storage_options

    def expand(self, rows):
        return rows | "WriteFiles" >> beam.ParDo(_WriteRows(self.directory, self.schema, self.storage_options))


def write_table(directory: str, table: pa.Table, storage_options: dict | None = None,
                name: str = "part-00000.parquet") -> str:
    """One small table as one file (the driver's outputs: sanity, empty outputs)."""
    url = storage.join(directory, name)
    fs, path = storage.filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return url
