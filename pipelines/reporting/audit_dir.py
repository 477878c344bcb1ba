"""A finished audit's output directory, read back: manifest, tables, maps and the images.

Large columns (maps, superpixels, curves) are read only for the images a page shows, so a
report on a big audit reads its metric columns once and a few maps.
"""
from __future__ import annotations

import json
import logging
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from transforms import storage
from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import read_shard
from transforms.records import ErrorRecord, RawImage


class AuditDir:
    """A published audit, read through its manifest (the pointer ``transforms.publication``
    writes last): each output is the folder, and the files, that the manifest names, so a
    reader never mixes runs, even while another run of the same --output is being written."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None):
        self.path, self.storage_options = str(path), storage_options or {}
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
        return sorted(storage.full_url(fs, p) for p in fs.glob(f"{path}/*.parquet"))

    def _dataset(self, name: str) -> ds.Dataset | None:
        files = self.files(name)
        if not files:
            return None
        fs, _ = storage.filesystem(files[0], self.storage_options)
        return ds.dataset([storage.filesystem(f, self.storage_options)[1] for f in files], format="parquet",
                          filesystem=fs)

    def table(self, name: str, columns: Iterable[str] | None = None, where=None) -> pa.Table:
        """One output (saliency, summary, errors, sanity) as a table; empty if it is absent."""
        dataset = self._dataset(name)
        if dataset is None:
            return pa.table({})
        if columns is not None:
            columns = [c for c in columns if c in dataset.schema.names]
        return dataset.to_table(columns=columns, filter=where)

    def rows(self, name: str, columns: Iterable[str] | None = None, where=None) -> list[dict]:
        return self.table(name, columns, where).to_pylist()

    def columns(self, name: str) -> pa.Schema:
        dataset = self._dataset(name)
        return dataset.schema if dataset is not None else pa.schema([])

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

    def scalar_rows(self) -> list[dict]:
        """Every saliency row without its list columns (maps, superpixels, curves)."""
        schema = self.columns("saliency")
        return self.rows("saliency", [f.name for f in schema if not pa.types.is_list(f.type)])

    def map_rows(self, image_ids: Iterable[str], methods: Iterable[str] | None = None) -> dict[tuple[str, str], dict]:
        """Full rows (maps and extras) of the given images: (image_id, method) -> row."""
        ids = sorted(set(image_ids))
        if not ids:
            return {}
        where = ds.field("image_id").isin(ids)
        if methods is not None:
            where &= ds.field("method").isin(list(methods))
        return {(r["image_id"], r["method"]): r for r in self.rows("saliency", where=where)}

    def display_preprocessing(self) -> Preprocessing:
        """The run's geometry (resize, channels) without the normalisation: what the model saw, as a picture."""
        prep = self.manifest.get("preprocessing") or {}
        resize = tuple(prep["resize"]) if prep.get("resize") else None
        return Preprocessing(resize=resize, channels=prep.get("channels"), to_grayscale=bool(prep.get("to_grayscale")),
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


def saliency_map(row: dict) -> np.ndarray:
    """A row's raw map as [H,W] float32."""
    return np.asarray(row["saliency"], dtype=np.float32).reshape(row["height"], row["width"])
