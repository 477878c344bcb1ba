"""Decoding image bytes and turning them into model input."""
from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transforms.records import DEFAULT_MAX_PIXELS, RawImage


class BadImage(ValueError):
    """An image that cannot be explained; ``stage`` says where it failed."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How decoded images become model input.

    resize: (height, width) or None to keep each image's size (images of one size are
        batched together). channels: 1 or 3 to require that many (grayscale images are
        repeated to 3 channels; colour images are never silently turned grey: they are
        errors unless to_grayscale is set), or None to keep what the image has.
    mean/std: per-channel normalisation after scaling to [0, 1]; max_pixels: larger
        images are rejected before they are decoded (decompression bombs).
    """

    resize: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    to_grayscale: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and self.channels and len(value) not in (1, self.channels):
                raise ValueError(f"--{name} has {len(value)} values, expected 1 or {self.channels}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("--std values must be positive")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ValueError(f"--resize must be H,W with positive sizes, got {self.resize}")


def decode(raw: RawImage, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 array [H, W, C] in [0, 1]."""
    if raw.fmt == "npy":
        return _decode_npy(raw.data, max_pixels)
    if raw.fmt not in ("png", "jpg", "jpeg"):
        raise BadImage("decode", f"unsupported image format {raw.fmt!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw.data))
            width, height = image.size  # read from the header: nothing decoded yet
            if width * height > max_pixels:
                raise BadImage("decode", f"image is {height}x{width} = {height * width} pixels, "
                                         f"over the limit of {max_pixels} (--max-pixels)")
            image.load()
    except BadImage:
        raise
    except Exception as e:  # Pillow raises several types for corrupt or truncated data
        raise BadImage("decode", f"cannot decode {raw.fmt} image: {type(e).__name__}: {e}") from None
    return _pil_to_array(image)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32) / (65535.0 if image.mode.startswith("I;16") else 2**31 - 1)
        return array[:, :, None]
    if image.mode in ("LA", "RGBA", "P", "PA", "CMYK", "YCbCr", "1"):
        # Alpha is dropped: models take opaque images.
        image = image.convert("L" if image.mode in ("LA", "1") else "RGB")
    if image.mode not in ("L", "RGB"):
        raise BadImage("decode", f"unsupported image mode {image.mode}")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[:, :, None] if array.ndim == 2 else array


def _decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadImage("decode", f"cannot decode npy array: {type(e).__name__}: {e}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise BadImage("decode", f"npy image must be [H,W] or [H,W,C], got shape {array.shape}")
    if array.shape[0] * array.shape[1] == 0:
        raise BadImage("decode", f"npy image has no pixels (shape {array.shape})")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise BadImage("decode", f"image is {array.shape[0]}x{array.shape[1]} pixels, over the limit of {max_pixels}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.isfinite(array).all():  # checked after the cast: float64 beyond float32's range becomes inf
            raise BadImage("decode", "npy image contains NaN or infinite values (in float32)")
        return array
    raise BadImage("decode", f"unsupported npy dtype {array.dtype}")


def preprocess(array: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """[H, W, C] float in [0,1] -> float32 [C, H', W'] model input."""
    channels = array.shape[2]
    if channels not in (1, 3):
        raise BadImage("preprocess", f"image has {channels} channels; supported are 1 (grey) and 3 (RGB)")
    if prep.channels == 3 and channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif prep.channels == 1 and channels == 3:
        if not prep.to_grayscale:
            raise BadImage("preprocess", "image has 3 channels but the model takes 1 (--channels 1); "
                                         "pass --to-grayscale to convert")
        array = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]  # ITU-R 601 luma
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if prep.resize is not None and tuple(tensor.shape[1:]) != tuple(prep.resize):
        tensor = F.interpolate(tensor[None], size=prep.resize, mode="bilinear", antialias=True,
                               align_corners=False)[0]
    if prep.mean is not None:
        tensor = tensor - torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    if prep.std is not None:
        tensor = tensor / torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    if not bool(torch.isfinite(tensor).all()):  # extreme pixels can overflow in resizing or normalising
        raise BadImage("preprocess", "preprocessed image has NaN or infinite values (pixel values too extreme)")
    return tensor.numpy().astype(np.float32, copy=False)
