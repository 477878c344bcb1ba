"""MNIST in its original IDX format, and writing it as WebDataset-style tar shards.

IDX layout (big-endian): two zero bytes, a dtype code (0x08 = uint8), the number of
dimensions, one uint32 size per dimension, then the data. MNIST images are
``00 00 08 03`` (2051) and labels ``00 00 08 01`` (2049).
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES_MAGIC = 2051  # uint8, 3 dimensions: N x rows x cols
LABELS_MAGIC = 2049  # uint8, 1 dimension: N
_MAGIC_NDIM = {IMAGES_MAGIC: 3, LABELS_MAGIC: 1}

# Fixed tar header fields so that the same input always gives byte-identical shards.
_TAR_MTIME = 0
_TAR_MODE = 0o644


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an MNIST IDX file (gzip-compressed or plain) into a uint8 array.

    Parameters
    ----------
    path
        An images file (magic 2051, returns [N, rows, cols]) or a labels file
        (magic 2049, returns [N]). Gzip is detected from the content, not the name.

    Raises
    ------
    ValueError
        If the file is not IDX, has an unsupported magic number, or its data is
        shorter or longer than its header says.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # truncated or corrupt gzip stream
            raise ValueError(f"{path}: corrupt gzip data: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic not in _MAGIC_NDIM:
        raise ValueError(f"{path}: not an MNIST IDX file: magic number {magic} "
                         f"(expected {IMAGES_MAGIC} for images or {LABELS_MAGIC} for labels)")
    ndim = _MAGIC_NDIM[magic]
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    if ndim == 3 and (shape[1] == 0 or shape[2] == 0):
        raise ValueError(f"{path}: invalid image dimensions {shape[1]}x{shape[2]}")
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header_len
    if actual < expected:
        raise ValueError(f"{path}: truncated IDX data: header says {'x'.join(map(str, shape))} "
                         f"= {expected} bytes, file has {actual}")
    if actual > expected:
        raise ValueError(f"{path}: IDX data longer than its header says "
                         f"({actual} bytes, expected {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def load_mnist_split(images_path: str | os.PathLike,
                     labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one split: images uint8 [N, 28, 28] and labels int64 [N].

    Raises
    ------
    ValueError
        If either file is invalid, the files are swapped, or the counts differ.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected an IDX images file (3 dimensions), got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected an IDX labels file (1 dimension), got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W] -> float32 [N, 1, H, W] in [0, 1], the reference model's input."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array [N, H, W], got {images.dtype} {list(images.shape)}")
    return (images[:, None].astype(np.float32) / 255.0)


def write_tar_shards(images: np.ndarray, labels: np.ndarray, output_dir: str | os.PathLike,
                     shard_size: int, prefix: str) -> list[str]:
    """Write images and labels as WebDataset-style tar shards.

    Shard ``i`` is ``{output_dir}/{prefix}-{i:06d}.tar``. Sample ``j`` (global index)
    has key ``{prefix}-{j:06d}`` and two members: ``KEY.png`` (8-bit grayscale PNG)
    and ``KEY.cls`` (the label as ASCII decimal). Tar headers carry fixed mtime,
    uid, gid and owner names, so the same input gives byte-identical shards.

    Parameters
    ----------
    images
        uint8 array [N, H, W].
    labels
        Integer array [N].
    output_dir
        Created if missing.
    shard_size
        Samples per shard (the last shard may be smaller).
    prefix
        Start of shard and key names; must not contain "/" or ".".

    Returns
    -------
    list[str]
        The shard paths, in order.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array [N, H, W], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array [N], got {labels.dtype} {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    # A dot would make WebDataset readers cut the key short; a slash would make a directory.
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix must be non-empty and contain no '/' or '.', got {prefix!r}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_index, start in enumerate(range(0, len(images), shard_size)):
        path = output_dir / f"{prefix}-{shard_index:06d}.tar"
        # USTAR format: no PAX headers, which could carry timestamps of their own.
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + shard_size, len(images))):
                key = f"{prefix}-{index:06d}"
                _add_member(tar, f"{key}.png", _encode_png(images[index]))
                _add_member(tar, f"{key}.cls", str(int(labels[index])).encode("ascii"))
        paths.append(str(path))
    return paths


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # A 2-D uint8 array becomes a mode "L" (8-bit grayscale) image.
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
