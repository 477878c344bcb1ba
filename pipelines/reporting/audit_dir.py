"""A finished audit's output directory, read back: manifest, tables, maps and the images.

Large columns (maps, superpixels, curves) are read only for the images a page shows, and the
saliency rows are scanned a batch at a time with only the columns a pass needs, so reading a big
audit holds a few batches, never the audit.
"""
from __future__ import annotations

import copy
import json
import logging
from functools import cached_property
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ErrorRecord, RawImage
from saliency_audit.transforms.model import targets

BATCH_ROWS = 1 << 13        # rows a scan decodes at once: about a MB of a pass's scalar columns
MAP_BATCH_BYTES = 4 << 20   # decoded bytes of whole rows (maps, extras) a scan holds (Arrow's builders take ~4x)
_WIDTH = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}  # bytes a value, decoded


class AuditDir:
    """A published audit, read through its manifest (the pointer ``saliency_audit.transforms.io.publication``
    writes last): each output is the folder, and the files, that the manifest names, so a
    reader never mixes runs, even while another run of the same --output is being written."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None):
        self.path, self.storage_options = str(path), storage_options or {}
        self._datasets: dict[str, ds.Dataset | None] = {}  # a page scans an output several times: list it once
        self.where = None  # a view: the saliency rows this expression keeps (see ``view``)
        try:
            self.manifest = json.loads(storage.read_bytes(storage.join(self.path, "manifest.json"),
                                                          self.storage_options))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} has no manifest.json: not the output of a finished run") from None

    def files(self, name: str) -> list[str]:
        """URLs of the output's files: the manifest's list, or its folder's files for older manifests."""
        listed = (self.manifest.get("files") or {}).get(name)
        if listed is not None:
            return [storage.join(self.path, relative) for relative in listed]
        folder = (self.manifest.get("outputs") or {}).get(name, f"{name}/")
        fs, path = storage.filesystem(storage.join(self.path, folder.rstrip("/")), self.storage_options)
        return sorted(storage.full_url(fs, p) for p in storage.glob_in(fs, path, "*.parquet"))

    def _dataset(self, name: str) -> ds.Dataset | None:
        if name not in self._datasets:
            files = self.files(name)
            fs = storage.filesystem(files[0], self.storage_options)[0] if files else None
            self._datasets[name] = ds.dataset([storage.filesystem(f, self.storage_options)[1] for f in files],
                                              format="parquet", filesystem=fs) if files else None
        return self._datasets[name]

    def table(self, name: str, columns: Iterable[str] | None = None, where=None) -> pa.Table:
        """One output (saliency, summary, errors, sanity) as a table; empty if it is absent."""
        dataset = self._dataset(name)
        if dataset is None:
            return pa.table({})
        if columns is not None:
            columns = [c for c in columns if c in dataset.schema.names]
        if name == "saliency" and self.where is not None:
            where = self.where if where is None else where & self.where
        return dataset.to_table(columns=columns, filter=where)

    # --- several targets per image (--target predicted,label,top3) ---
    @cached_property
    def target(self) -> str:
        """The run's --target as its manifest records it."""
        return str((self.manifest.get("options") or {}).get("target") or targets.PREDICTED)

    @cached_property
    def several_targets(self) -> bool:
        try:
            return targets.several(self.target)
        except targets.TargetError:
            return False

    def view(self, where) -> "AuditDir":
        """The same audit, its saliency rows those the pyarrow expression ``where`` keeps."""
        other = copy.copy(self)
        other.where = where
        return other

    def main_view(self) -> "AuditDir":
        """With several targets per image, the main request's rows (one per image and method: the
        predicted class's by default, transforms.model.targets.main_request); else the audit."""
        return self.view(targets.request_filter(targets.main_of(self.target))) if self.several_targets else self

    def rows(self, name: str, columns: Iterable[str] | None = None, where=None) -> list[dict]:
        """A small output (summary, findings, sanity) as dicts; scan the saliency rows instead."""
        return self.table(name, columns, where).to_pylist()

    def scan(self, name: str, columns: Iterable[str] | None = None, *, image_ids: Iterable[str] | None = None,
             batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """One output's rows in file order, ``batch_rows`` (default BATCH_ROWS) at a time, with only
        ``columns`` (those it has; a file without one reads it as null); nothing if it is absent.
        With ``image_ids``, only those images' rows, and only the row groups holding one are decoded.

        Each file is read by pyarrow.parquet's batch reader, which holds a batch and the pages behind
        it; a dataset scan reads row groups ahead, even with no readahead asked for (10 times the
        memory on scalar columns, 130 MB more for whole rows of a 150,000-row audit)."""
        dataset = self._dataset(name)
        if dataset is None:
            return
        names = [c for c in (dataset.schema.names if columns is None else columns) if c in dataset.schema.names]
        wanted = None if image_ids is None else pa.array(sorted(set(image_ids)), pa.string())
        if wanted is not None and "image_id" not in names:
            names.append("image_id")
        view = self.where if name == "saliency" else None
        read = names if view is None else [*names, *(c for c in targets.FILTER_COLUMNS
                                                     if c in dataset.schema.names and c not in names)]
        for path in dataset.files:
            with dataset.filesystem.open_input_file(path) as f:
                reader = pq.ParquetFile(f)
                present = [c for c in read if c in reader.schema_arrow.names]
                groups = range(reader.num_row_groups) if wanted is None else _groups_holding(reader, wanted)
                for batch in reader.iter_batches(batch_size=batch_rows or BATCH_ROWS, row_groups=groups,
                                                 columns=present, use_threads=False):
                    if len(present) < len(read):
                        batch = pa.RecordBatch.from_arrays(
                            [batch.column(c) if c in present else pa.nulls(batch.num_rows, dataset.schema.field(c).type)
                             for c in read], names=read)
                    if view is not None:
                        batch = pa.Table.from_batches([batch]).filter(view).select(names).combine_chunks()
                        batch = batch.to_batches()[0] if batch.num_rows else None
                        if batch is None:
                            continue
                    yield batch if wanted is None else batch.filter(pc.is_in(batch.column("image_id"), wanted))

    def row_count(self, name: str) -> int:
        dataset = self._dataset(name)
        where = self.where if name == "saliency" else None
        return dataset.count_rows(filter=where) if dataset is not None else 0

    def columns(self, name: str) -> pa.Schema:
        dataset = self._dataset(name)
        return dataset.schema if dataset is not None else pa.schema([])

    def rows_within(self, name: str, budget: int) -> int:
        """How many whole rows of ``name`` take about ``budget`` bytes once decoded (at least one),
        from its first row group. Fixed-width values count at their width: maps are dictionary- or
        run-length-encoded on disk, often 30 times smaller than in memory."""
        dataset = self._dataset(name)
        if dataset is None or not dataset.files:
            return BATCH_ROWS
        with dataset.filesystem.open_input_file(dataset.files[0]) as f:
            return rows_for(pq.ParquetFile(f).metadata, budget)

    @cached_property
    def methods(self) -> list[str]:
        """The run's methods in the order given to --methods (the manifest's keys are sorted)."""
        known = list(self.manifest.get("methods") or {})
        given = [m.strip() for m in str((self.manifest.get("options") or {}).get("methods", "")).split(",")]
        ordered = [m for m in dict.fromkeys(given) if m in known]
        return ordered + [m for m in known if m not in ordered]

    def signed(self, method: str) -> bool:
        return bool((self.manifest.get("methods") or {}).get(method, {}).get("signed", True))

    def control(self, method: str) -> bool:
        """A control map (random, sobel): the level to beat, not an explanation."""
        return bool((self.manifest.get("methods") or {}).get(method, {}).get("control", False))

    def map_rows(self, image_ids: Iterable[str], methods: Iterable[str] | None = None) -> dict[tuple[str, str], dict]:
        """Full rows (maps and extras) of the given images: (image_id, method) -> row, the map as a
        numpy array (a Python float a value would take 8 times its bytes). The scan decodes every
        row's maps to filter them, so its batches are sized in bytes."""
        ids, found = set(image_ids), {}
        batches = self.scan("saliency", image_ids=ids, batch_rows=self.rows_within("saliency", MAP_BATCH_BYTES)) \
            if ids else ()
        for batch in batches:
            if methods is not None:
                batch = batch.filter(pc.is_in(batch.column("method"), pa.array(list(methods), pa.string())))
            maps = _arrays(batch.column("saliency")) if "saliency" in batch.schema.names else None
            rows = batch.drop_columns(["saliency"]).to_pylist() if maps is not None else batch.to_pylist()
            for i, row in enumerate(rows):
                if maps is not None:
                    row["saliency"] = maps[i]
                found[(row["image_id"], row["method"])] = row
        return found

    def display_preprocessing(self) -> Preprocessing:
        """The run's geometry (resize, crop, channels) without the normalisation: what the model saw, as a
        picture."""
        prep = self.manifest.get("preprocessing") or {}
        pairs = {key: tuple(prep[key]) if prep.get(key) else None for key in ("resize", "crop")}
        geometry = {key: prep[key] for key in ("resize_shortest", "interpolation", "crop_offset") if prep.get(key)}
        return Preprocessing(**pairs, **geometry, channels=prep.get("channels"),
                             to_grayscale=bool(prep.get("to_grayscale")),
                             max_pixels=int(prep.get("max_pixels") or 4096 * 4096))

    def images(self, sources: dict[str, str]) -> dict[str, np.ndarray]:
        """image_id -> [H,W,C] float in [0,1], read back from the shards the rows name.

        Images that cannot be read back are left out (pages show a placeholder): a shard that
        has moved, no longer decodes, or cannot be reached (permissions, network, a missing
        bucket: any exception) costs its images and one warning line, never the page.
        """
        prep = self.display_preprocessing()
        found: dict[str, np.ndarray] = {}

        def read_back(source: str, ids: set[str]) -> str | None:
            """Decode the shard's wanted images into ``found``; why some were not there, if any were not."""
            seen, reason = set(), None
            for record in read_shard(source, self.storage_options, max_pixels=prep.max_pixels):
                if isinstance(record, RawImage) and record.image_id in ids:
                    seen.add(record.image_id)
                    try:
                        found[record.image_id] = preprocess(decode(record, prep.max_pixels), prep).transpose(1, 2, 0)
                    except BadImage:
                        pass  # decodable when it was audited; a placeholder now
                    if ids <= seen:
                        return None
                elif isinstance(record, ErrorRecord) and reason is None:
                    reason = record.reason
            return None if ids <= seen else reason or "the images are no longer in it"

        wanted: dict[str, set[str]] = {}
        for image_id, source in sources.items():
            wanted.setdefault(source, set()).add(image_id)
        for source, ids in sorted(wanted.items()):
            try:
                problem = read_back(source, ids)
            except Exception as e:  # noqa: BLE001 - whatever storage raises costs only the pictures
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                logging.getLogger("saliency_audit").warning(
                    "shard %s unreadable, %d image(s) shown as placeholders: %s", source,
                    len(ids - found.keys()), " ".join(problem.split()))
        return found


def rows_for(metadata: pq.FileMetaData, budget: int) -> int:
    """AuditDir.rows_within for one file, from its footer (its first row group)."""
    if metadata.num_row_groups == 0 or metadata.row_group(0).num_rows == 0:
        return BATCH_ROWS
    group = metadata.row_group(0)
    decoded = 0
    for i in range(group.num_columns):
        chunk, width = group.column(i), metadata.schema.column(i).length or 0  # length: fixed-size binary (float16)
        decoded += max(chunk.num_values * _WIDTH.get(chunk.physical_type, width), chunk.total_uncompressed_size)
    return max(1, min(BATCH_ROWS, budget * group.num_rows // max(decoded, 1)))


def _groups_holding(reader: pq.ParquetFile, ids: pa.Array) -> list[int]:
    """The file's row groups whose image_id column holds one of ``ids`` (read alone: a few KB a group)."""
    return [g for g in range(reader.num_row_groups)
            if pc.any(pc.is_in(reader.read_row_group(g, columns=["image_id"]).column("image_id"), ids)).as_py()]


def _arrays(lists: pa.ListArray) -> list[np.ndarray | None]:
    """A list column as one numpy array a row (None for a null list), views of Arrow's buffer."""
    offsets, values = lists.offsets.to_numpy(), lists.values.to_numpy(zero_copy_only=False)
    valid = pc.is_valid(lists).to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(lists))]


def saliency_map(row: dict) -> np.ndarray:
    """A row's raw map as [H,W] float32."""
    return np.asarray(row["saliency"], dtype=np.float32).reshape(row["height"], row["width"])
