"""A finished audit's output directory, read back: manifest, tables, maps and the images.

Large columns (maps, superpixels, curves) are read only for the images a page shows, so a
report on a big audit reads its metric columns once and a few maps.
"""
from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from transforms import storage
from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import read_shard
from transforms.records import RawImage


class AuditDir:
    def __init__(self, path: str, storage_options: dict[str, Any] | None = None):
        self.path, self.storage_options = str(path), storage_options or {}
        try:
            self.manifest = json.loads(storage.read_bytes(storage.join(self.path, "manifest.json"),
                                                          self.storage_options))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} has no manifest.json: not the output of a finished run") from None

    def _dataset(self, name: str) -> ds.Dataset | None:
        fs, path = storage.filesystem(storage.join(self.path, name), self.storage_options)
        files = sorted(fs.glob(f"{path}/*.parquet"))
        return ds.dataset(files, format="parquet", filesystem=fs) if files else None

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

        Images whose shard has moved or no longer decodes are left out (pages show a
        placeholder); each shard is read once.
        """
        prep = self.display_preprocessing()
        wanted: dict[str, set[str]] = {}
        for image_id, source in sources.items():
            wanted.setdefault(source, set()).add(image_id)
        found = {}
        for source, ids in sorted(wanted.items()):
            try:
                for record in read_shard(source, self.storage_options):
                    if isinstance(record, RawImage) and record.image_id in ids:
                        try:
                            pixels = preprocess(decode(record, prep.max_pixels), prep)
                            found[record.image_id] = pixels.transpose(1, 2, 0)
                        except BadImage:
                            pass
                        if ids <= found.keys():
                            break
            except (OSError, ValueError):
                continue
        return found


def saliency_map(row: dict) -> np.ndarray:
    """A row's raw map as [H,W] float32."""
    return np.asarray(row["saliency"], dtype=np.float32).reshape(row["height"], row["width"])
