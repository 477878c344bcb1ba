"""Reading labelled shards for training the reference models: all at once, or as a stream."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from saliency_audit.transforms.io import storage
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ErrorRecord

T = TypeVar("T")

# Images a training command keeps in memory at once (shuffle buffer, held-out images) are
# capped by count and by this many bytes, so memory does not grow with the image size either.
MEMORY_BUDGET_BYTES = 256 * 2**20


def images_within_budget(count: int, image_shape: tuple[int, ...], budget: int = MEMORY_BUDGET_BYTES) -> int:
    """``count`` float32 images of ``image_shape``, fewer where they would exceed ``budget`` (at least 1)."""
    return max(1, min(count, budget // (4 * int(np.prod(image_shape)))))


def iter_images(urls: Iterable[str], prep: Preprocessing, storage_options: dict | None = None,
                require_labels: bool = True, skipped: Callable[[str], None] | None = None
                ) -> Iterator[tuple[str, str, np.ndarray, int]]:
    """(url, image_id, image float32 [C,H,W], label or -1) of each usable record of the shards
    ``urls``, in that order; ``skipped`` receives one line per record that is not usable."""
    skip = skipped or (lambda line: None)
    for url in urls:
        for record in read_shard(url, storage_options):
            if isinstance(record, ErrorRecord):
                skip(f"{record.image_id}: {record.reason}")
                continue
            if require_labels and record.label is None:
                skip(f"{record.image_id}: no label")
                continue
            try:
                image = preprocess(decode(record, prep.max_pixels), prep)
            except BadImage as e:
                skip(f"{record.image_id}: {e}")
                continue
            yield url, record.image_id, image, -1 if record.label is None else record.label


def shuffle_buffer(items: Iterable[T], size: int, generator: torch.Generator) -> Iterator[T]:
    """The items in a random order drawn from ``generator``, holding at most ``size`` of them
    (WebDataset's shuffle): each new item takes the place of a random one of the buffer, which
    is emitted; the rest follow in random order at the end."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(torch.randint(size, (1,), generator=generator))
        buffer[i], item = item, buffer[i]
        yield item
    for i in torch.randperm(len(buffer), generator=generator).tolist():
        yield buffer[i]


def load_labelled(pattern: str, prep: Preprocessing, storage_options: dict | None = None,
                  require_labels: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All decodable images of the shards matching ``pattern`` as float32 [N,C,H,W], their
    labels int64 [N] (-1 where absent) and one line per record that was skipped."""
    images, labels, skipped = [], [], []
    for _, _, image, label in iter_images(storage.expand_glob(pattern, storage_options), prep, storage_options,
                                          require_labels, skipped.append):
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"no usable images in {pattern}" + (f" ({skipped[0]})" if skipped else ""))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {pattern} have different shapes {sorted(shapes)}; pass --resize")
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped
