"""Loading labelled shards into memory, for training the reference models."""
from __future__ import annotations

import numpy as np

from transforms import storage
from transforms.preprocess import BadImage, Preprocessing, decode, preprocess
from transforms.readers import read_shard
from transforms.records import ErrorRecord


def load_labelled(pattern: str, prep: Preprocessing, storage_options: dict | None = None,
                  require_labels: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All decodable images of the shards matching ``pattern`` as float32 [N,C,H,W], their
    labels int64 [N] (-1 where absent) and one line per record that was skipped."""
    images, labels, skipped = [], [], []
    for url in storage.expand_glob(pattern, storage_options):
        for record in read_shard(url, storage_options):
            if isinstance(record, ErrorRecord):
                skipped.append(f"{record.image_id}: {record.reason}")
                continue
            if require_labels and record.label is None:
                skipped.append(f"{record.image_id}: no label")
                continue
            try:
                images.append(preprocess(decode(record, prep.max_pixels), prep))
            except BadImage as e:
                skipped.append(f"{record.image_id}: {e}")
                continue
            labels.append(-1 if record.label is None else record.label)
    if not images:
        raise ValueError(f"no usable images in {pattern}" + (f" ({skipped[0]})" if skipped else ""))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {pattern} have different shapes {sorted(shapes)}; pass --resize")
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped
