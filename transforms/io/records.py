"""The records that flow between pipeline stages (plain dataclasses, picklable by Beam)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import numpy as np

from saliency_audit.explainers.core.paths import redact

# The side outputs that several steps emit (Beam tags; plain names, so the Beam-free handler emits them too).
ERRORS = "errors"    # ErrorRecord: a record that costs itself, never the run
SKIPPED = "skipped"  # ((method, shard), n): pairs an audit history already holds
TARGETS = "targets"  # n: (image, target) pairs beyond one per record (several --target requests)

# Preprocessing's default --max-pixels; here so the readers can size-check without importing torch.
DEFAULT_MAX_PIXELS = 4096 * 4096
# " at 0x7f..." in object reprs (PIL and tarfile name the BytesIO they read): differs per run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclasses.dataclass
class RawImage:
    """One encoded image as read from a shard."""

    image_id: str
    source: str
    data: bytes
    fmt: str  # file extension without the dot: png, jpg, jpeg, npy
    label: int | None = None
    # Optional ground truth (docs/ground_truth.md): an encoded PNG mask of the image's size,
    # and/or boxes [x0, y0, x1, y1] in original pixel coordinates (validated by the reader).
    mask: bytes | None = None
    boxes: list[list[float]] | None = None

    @property
    def content_sha256(self) -> str:
        """The image's identity beyond its id: sha256 (hex) of its encoded bytes as the shard holds
        them, so an id whose image was replaced is not taken for the one explained before."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def record_sha256(self) -> str:
        """Everything that makes the record's rows: sha256 (hex) over its image bytes, its label and
        its ground truth (mask bytes, boxes). An audit history skips an image only when this matches
        (saliency_audit.transforms.skip_explained): a relabelled image, or one whose ground truth
        changed, is explained again (its target, label and localisation metrics change)."""
        return record_sha256(self.content_sha256, self.label, self.mask, self.boxes)


@dataclasses.dataclass
class ErrorRecord:
    """A record that could not be explained, and why. method=None: failed before any method ran."""

    image_id: str
    source: str
    stage: str  # read | decode | preprocess | model | target | explain
    reason: str
    method: str | None = None
    target: int | None = None  # the class of a failed target, where known
    target_source: str | None = None  # the --target request it failed for (None: before any target)

    def __post_init__(self):
        # Reasons must be the same on every rerun, so no memory addresses; and no storage-option
        # value, which storage clients quote in their errors (paths.redact).
        self.reason = redact(_ADDRESS.sub("", str(self.reason)))


@dataclasses.dataclass
class ImageBatch:
    """Preprocessed images of one shape, ready for the model."""

    image_ids: list[str]
    sources: list[str]
    labels: list[int | None]
    sizes: list[tuple[int, int]]  # original (height, width)
    pixels: np.ndarray  # float32 [B, C, H, W], model-input space
    # Per image, the methods an incremental audit skips for it (already in the history); None: none.
    skip: list[frozenset[str]] | None = None
    # Per image, method -> the target classes the history holds for it (skipped: those pairs only).
    held: list[dict[str, frozenset[int]]] | None = None
    # Ground truth at the model input size: bool [B, H, W] (True = object), or None when no
    # image of the batch has any. has_mask[i] is False for an image without ground truth (its
    # row of masks is all False and its localisation metrics are null); None with masks None.
    masks: np.ndarray | None = None
    has_mask: list[bool] | None = None
    content_sha256: list[str] | None = None  # per image, RawImage.content_sha256
    record_sha256: list[str] | None = None  # per image, RawImage.record_sha256 (an audit history's skip key)

    def take(self, rows: list[int]) -> "ImageBatch":
        """The batch of these rows only, in this order."""
        has_mask = None if self.has_mask is None else [self.has_mask[i] for i in rows]
        if not any(has_mask or ()):  # keep "masks is None" meaning "no ground truth here"
            has_mask = None
        hashes = None if self.content_sha256 is None else [self.content_sha256[i] for i in rows]
        records = None if self.record_sha256 is None else [self.record_sha256[i] for i in rows]
        return ImageBatch(image_ids=[self.image_ids[i] for i in rows], sources=[self.sources[i] for i in rows],
                          labels=[self.labels[i] for i in rows], sizes=[self.sizes[i] for i in rows],
                          pixels=self.pixels[rows], skip=None if self.skip is None else [self.skip[i] for i in rows],
                          held=None if self.held is None else [self.held[i] for i in rows],
                          masks=None if has_mask is None or self.masks is None else self.masks[rows],
                          has_mask=has_mask, content_sha256=hashes, record_sha256=records)


def record_sha256(content_sha256: str, label: int | None, mask: bytes | None,
                  boxes: list[list[float]] | None) -> str:
    """RawImage.record_sha256 from its parts: a canonical JSON of the image's hash, the label, the
    mask's hash and the boxes (None where absent)."""
    body = {"image": content_sha256, "label": None if label is None else int(label),
            "mask": None if mask is None else hashlib.sha256(mask).hexdigest(),
            "boxes": None if boxes is None else [[float(v) for v in box] for box in boxes]}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seed_for(image_id: str, base_seed: int = 0) -> int:
    """A 32-bit seed derived from the image id (and the run's --seed), the same on every
    runner and rerun; Python's hash() is salted per process, so it cannot be used.
    32 bits, because some random generators (NumPy's legacy RandomState) take no more."""
    digest = hashlib.sha256(f"{base_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
