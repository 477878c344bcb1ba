"""The records that flow between pipeline stages (plain dataclasses, picklable by Beam)."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass
class RawImage:
    """One encoded image as read from a shard."""

    image_id: str
    source: str
    data: bytes
    fmt: str  # file extension without the dot: png, jpg, jpeg, npy
    label: int | None = None


@dataclasses.dataclass
class ErrorRecord:
    """A record that could not be explained, and why. method=None: failed before any method ran."""

    image_id: str
    source: str
    stage: str  # read | decode | preprocess | explain
    reason: str
    method: str | None = None


@dataclasses.dataclass
class ImageBatch:
    """Preprocessed images of one shape, ready for the model."""

    image_ids: list[str]
    sources: list[str]
    labels: list[int | None]
    sizes: list[tuple[int, int]]  # original (height, width)
    pixels: np.ndarray  # float32 [B, C, H, W], model-input space


def seed_for(image_id: str, base_seed: int = 0) -> int:
    """A 32-bit seed derived from the image id (and the run's --seed), the same on every
    runner and rerun; Python's hash() is salted per process, so it cannot be used.
    32 bits, because some random generators (NumPy's legacy RandomState) take no more."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
