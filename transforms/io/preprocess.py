"""Decoding image bytes and turning them into model input."""
from __future__ import annotations

import dataclasses
import io
import math
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from saliency_audit.transforms.io.records import DEFAULT_MAX_PIXELS, RawImage


class BadImage(ValueError):
    """An image that cannot be explained; ``stage`` says where it failed."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_OFFSETS = ("floor", "round")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How decoded images become model input.

    resize: (height, width) or None to keep each image's size (images of one size are
        batched together). channels: 1 or 3 to require that many (grayscale images are
        repeated to 3 channels; colour images are never silently turned grey: they are
        errors unless to_grayscale is set), or None to keep what the image has.
    mean/std: per-channel normalisation after scaling to [0, 1]; max_pixels: larger
        images are rejected before they are decoded (decompression bombs).
    resize_shortest: instead of resize, the shorter side to this many pixels, the aspect kept
        (the longer side int(N * long / short), as Hugging Face and torchvision compute it).
    crop: (height, width) of a centre crop after resizing; crop_offset how its margin is
        split: "floor" (Hugging Face's image processors) or "round" (torchvision's CenterCrop,
        which timm uses: half the margin rounded to even).
    interpolation: "bilinear" and "bicubic" are antialiased as Pillow's (the kernels
        Hugging Face's and timm's preprocessing use), "nearest" is Pillow's nearest.
    """

    resize: tuple[int, int] | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    to_grayscale: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_shortest: int | None = None
    crop: tuple[int, int] | None = None
    interpolation: str = "bilinear"
    crop_offset: str = "floor"

    def __post_init__(self):
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and self.channels and len(value) not in (1, self.channels):
                raise ValueError(f"--{name} has {len(value)} values, expected "
                                 + ("1" if self.channels == 1 else f"1 or {self.channels}"))
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("--std values must be positive")
        with np.errstate(all="ignore"):  # a std of 1e-300 is positive, yet float32's 0: every image inf
            ends = (np.float32([[0.0], [1.0]]) - np.float32(self.mean or 0)) / np.float32(self.std or 1)
        if not np.isfinite(ends).all():
            raise ValueError(f"--mean {self.mean} and --std {self.std} take pixel values 0..1 beyond float32's range")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ValueError(f"--{name} must be H,W with positive sizes, got {value}")
        if self.resize_shortest is not None and (self.resize is not None or self.resize_shortest < 1):
            raise ValueError(f"resize_shortest must be a positive size, without resize, got {self.resize_shortest}")
        # a size from a flag or a model's preprocessor_config.json: 100000x100000 would ask every image for
        # 40 GB; the output of the resize answers to the same limit as the decoded image, though never to
        # one under the default: a user lowers --max-pixels to refuse large inputs (64x64 thumbnails), not
        # the model's own input size (224x224)
        limit = max(self.max_pixels, DEFAULT_MAX_PIXELS)
        for what, value, area in (("--resize", self.resize, math.prod(self.resize or ())),
                                  ("the centre crop", self.crop, math.prod(self.crop or ())),
                                  ("the shorter side's resize", self.resize_shortest, (self.resize_shortest or 0) ** 2)):
            if area > limit:
                raise ValueError(f"{what} to {value} makes images of at least {area} pixels, over the limit of "
                                 f"{limit} (--max-pixels)")
        if self.interpolation not in INTERPOLATIONS or self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)} and crop_offset one of "
                             f"{', '.join(CROP_OFFSETS)}, got {self.interpolation!r}, {self.crop_offset!r}")
        if self.crop is not None:  # a crop that cannot fit fails every image: refuse it up front
            if self.resize is not None:
                fits, resized = all(c <= r for c, r in zip(self.crop, self.resize)), "x".join(map(str, self.resize))
            else:  # the longer side depends on the image; the shorter must hold the crop whatever its orientation
                fits, resized = max(self.crop) <= (self.resize_shortest or max(self.crop)), \
                    f"shortest side {self.resize_shortest}"
            if not fits:
                raise ValueError(f"the centre crop {self.crop[0]}x{self.crop[1]} is larger than the resized image "
                                 f"({resized})")


def decode(raw: RawImage, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 array [H, W, C] in [0, 1]."""
    if raw.fmt == "npy":
        return _decode_npy(raw.data, max_pixels)
    if raw.fmt not in ("png", "jpg", "jpeg"):
        raise BadImage("decode", f"unsupported image format {raw.fmt!r}")
    return _pil_to_array(_open(raw.data, "image", f"{raw.fmt} image", max_pixels))


_OPENING = threading.Lock()


def _open(data: bytes, name: str, kind: str, max_pixels: int, formats: list[str] | None = None,
          size: tuple[int, int] | None = None) -> Image.Image:
    """Decode with Pillow, refusing from the header alone, before any pixel is decoded, an
    image over ``max_pixels`` (a decompression bomb) or, given ``size``, of another (height, width)."""
    try:
        # catch_warnings swaps the process's filters, so two decode threads (transforms.read's
        # pool) inside it at once leave them wrong: one at a time, for the header only
        with _OPENING, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
        width, height = image.size  # read from the header: nothing decoded yet
        if width * height > max_pixels:
            raise BadImage("decode", f"{name} is {height}x{width} = {height * width} pixels, "
                                     f"over the limit of {max_pixels} (--max-pixels)")
        if size is not None and (height, width) != tuple(size):
            raise BadImage("decode", f"{name} is {height}x{width} but its image is {size[0]}x{size[1]}")
        image.load()
    except BadImage:
        raise
    except Exception as e:  # Pillow raises several types for corrupt or truncated data
        raise BadImage("decode", f"cannot decode {kind}: {type(e).__name__}: {e}") from None
    return image


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


def ground_truth(raw: RawImage, size: tuple[int, int], max_pixels: int) -> np.ndarray | None:
    """The record's ground truth as bool [H, W] at its image's original ``size`` (True =
    object): its mask and its boxes together; None when it has neither."""
    found = []
    if raw.mask is not None:
        found.append(decode_mask(raw.mask, size, max_pixels))
    if raw.boxes is not None:
        found.append(boxes_to_mask(raw.boxes, size))
    return np.logical_or.reduce(found) if found else None


# Single-channel PNG modes: grey, 1-bit, palette (its indices are the values) and 16-bit grey.
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


def decode_mask(data: bytes, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A PNG mask -> bool [H, W], nonzero = object. It must be single-channel and exactly the
    image's (height, width): a mask of another size cannot be aligned without guessing."""
    image = _open(data, "ground truth mask", "ground truth mask PNG", max_pixels, formats=["PNG"], size=size)
    if image.mode not in MASK_MODES:
        raise BadImage("decode", f"ground truth mask must be a single-channel PNG (grey, 1-bit, palette or "
                                 f"16-bit), got mode {image.mode}")
    return np.asarray(image) != 0


def boxes_to_mask(boxes: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """Boxes [x0, y0, x1, y1] (validated, x1 and y1 exclusive like a slice) -> bool [H, W]:
    every pixel a box touches, clipped to the image. Summed-area (2-D difference) counts, so
    the cost is one pass over the image whatever the number and size of the boxes."""
    height, width = size
    corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, x1 = (np.clip(f(corners[:, i]), 0, width).astype(np.int64) for f, i in ((np.floor, 0), (np.ceil, 2)))
    y0, y1 = (np.clip(f(corners[:, i]), 0, height).astype(np.int64) for f, i in ((np.floor, 1), (np.ceil, 3)))
    counts = np.zeros((height + 1, width + 1), dtype=np.int32)
    for rows, cols, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(counts, (rows, cols), sign)
    return counts.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)[:height, :width] > 0


def resize_mask(mask: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """bool [H, W] at the original size -> bool [H', W'] at the model input size, through the image's
    geometry (the same resize condition and size, the same pixel-centre geometry as its
    align_corners=False, the same crop), nearest-neighbour so the mask stays binary."""
    size, box = geometry(prep, mask.shape)
    if size is not None:
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        mask = F.interpolate(tensor, size=size, mode="nearest-exact")[0, 0].numpy() > 0.5
    return mask if box is None else mask[box]


def geometry(prep: Preprocessing, size: tuple[int, ...]) -> tuple[tuple[int, int] | None, tuple[slice, slice] | None]:
    """Where an image of (height, width) ``size`` goes: the size it is resized to (None: kept) and
    the rows and columns of its centre crop (None: no crop)."""
    height, width = size
    target = tuple(prep.resize) if prep.resize is not None else None
    if prep.resize_shortest is not None:  # as transformers' get_resize_output_image_size and torchvision's Resize
        short, long = sorted((height, width))
        longer = int(prep.resize_shortest * long / short)
        target = (prep.resize_shortest, longer) if height <= width else (longer, prep.resize_shortest)
        # the longer side grows with the aspect ratio: a 2 x 8,000,000 image (under --max-pixels) would
        # become 256 x 1,000,000,000, terabytes, and take the run down with it
        # (its square may exceed a lowered --max-pixels: see __post_init__)
        if prep.resize_shortest * longer > max(prep.max_pixels, prep.resize_shortest ** 2):
            raise BadImage("preprocess", f"image is {height}x{width}: its shorter side resized to "
                                         f"{prep.resize_shortest} it would be {target[0]}x{target[1]} pixels, over "
                                         f"the limit of {prep.max_pixels} (--max-pixels)")
    if target == (height, width):
        target = None
    if prep.crop is None:
        return target, None
    (height, width), (crop_h, crop_w) = target or (height, width), prep.crop
    if crop_h > height or crop_w > width:
        raise BadImage("preprocess", f"image is {height}x{width} after resizing, smaller than the centre crop "
                                     f"{crop_h}x{crop_w}")
    top, left = (_crop_offset(margin, prep.crop_offset) for margin in (height - crop_h, width - crop_w))
    return target, (slice(top, top + crop_h), slice(left, left + crop_w))


def _crop_offset(margin: int, rule: str) -> int:
    # Hugging Face floors half the margin; torchvision's CenterCrop rounds it (half to even):
    # one pixel apart where the margin is odd
    return margin // 2 if rule == "floor" else round(margin / 2.0)


def _resize(tensor: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """[C, H, W] -> [C, *size]. Antialiased bilinear and bicubic are Pillow's filters (bicubic with
    a = -0.5); bicubic's overshoot is clipped to the pixel range, as Pillow's 8-bit images clip it."""
    if interpolation == "nearest":
        return F.interpolate(tensor[None], size=size, mode="nearest-exact")[0]
    resized = F.interpolate(tensor[None], size=size, mode=interpolation, antialias=True, align_corners=False)[0]
    if interpolation == "bicubic":
        resized = resized.clamp(min(0.0, float(tensor.min())), max(1.0, float(tensor.max())))
    return resized


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
    size, box = geometry(prep, tensor.shape[1:])
    if size is not None:
        tensor = _resize(tensor, size, prep.interpolation)
    if box is not None:
        tensor = tensor[:, box[0], box[1]].contiguous()
    if prep.mean is not None:
        tensor = tensor - torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    if prep.std is not None:
        tensor = tensor / torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    if not bool(torch.isfinite(tensor).all()):  # extreme pixels can overflow in resizing or normalising
        raise BadImage("preprocess", "preprocessed image has NaN or infinite values (pixel values too extreme)")
    return tensor.numpy().astype(np.float32, copy=False)
