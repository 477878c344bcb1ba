"""Saliency maps and images as PNGs: colour maps, overlays, grids.

Maps are stored raw; they are normalised here for display only, per image, by a high
percentile of |value| (one hot pixel would otherwise wash out the rest of the map).
Signed maps get a diverging map (blue = against the class, red = for it, white = 0),
unsigned maps a sequential one (black = 0).
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

DISPLAY_PERCENTILE = 99.5
DISPLAY_NOTE = (f"Maps are normalised per image for display only (divided by the {DISPLAY_PERCENTILE}th "
                "percentile of |value|, then clipped); the Parquet files hold the raw values. Signed maps: "
                "red = evidence for the explained class, blue = against, white = 0. Unsigned maps: "
                "dark = 0, yellow = high.")

# Colour stops (position, RGB): a RdBu-like diverging map and an inferno-like sequential one.
_DIVERGING = ((0.0, (33, 102, 172)), (0.25, (103, 169, 207)), (0.5, (247, 247, 247)),
              (0.75, (239, 138, 98)), (1.0, (178, 24, 43)))
_SEQUENTIAL = ((0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)),
               (0.75, (249, 142, 9)), (1.0, (252, 255, 164)))


def _colour(values: np.ndarray, stops) -> np.ndarray:
    """values in [0,1] -> uint8 RGB by piecewise-linear interpolation between the stops."""
    positions = [p for p, _ in stops]
    channels = [np.interp(values, positions, [rgb[c] for _, rgb in stops]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def display_values(saliency: np.ndarray, signed: bool) -> np.ndarray:
    """Raw map -> [-1,1] (signed) or [0,1] (unsigned), for display only."""
    values = np.asarray(saliency, dtype=np.float64)
    if not signed:
        values = values - min(0.0, float(values.min()))  # unsigned maps are >= 0; guard anyway
    scale = float(np.percentile(np.abs(values), DISPLAY_PERCENTILE)) if values.size else 0.0
    if scale <= 0:
        scale = float(np.abs(values).max()) or 1.0
    return np.clip(values / scale, -1.0 if signed else 0.0, 1.0)


def colour_map(saliency: np.ndarray, signed: bool) -> np.ndarray:
    """[H,W] raw map -> [H,W,3] uint8."""
    values = display_values(saliency, signed)
    return _colour((values + 1) / 2, _DIVERGING) if signed else _colour(values, _SEQUENTIAL)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """[H,W,C] float in [0,1] (C = 1 or 3) -> [H,W,3] uint8."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return (image[:, :, :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, saliency: np.ndarray, signed: bool) -> np.ndarray:
    """The map's colours over a dimmed grey copy of the image, opaque where |map| is high."""
    grey = as_rgb(image).astype(np.float64).mean(axis=2, keepdims=True) * 0.6
    alpha = np.abs(display_values(saliency, signed))[:, :, None]
    blended = (1 - alpha) * grey + alpha * colour_map(saliency, signed)
    return blended.round().astype(np.uint8)


def placeholder(height: int, width: int) -> np.ndarray:
    """A grey checkerboard for an image that could not be read back from its shard."""
    yy, xx = np.mgrid[:height, :width]
    return np.where(((yy // 4 + xx // 4) % 2)[:, :, None] == 0, 170, 200).repeat(3, axis=2).astype(np.uint8)


def resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour when enlarging (keeps pixels visible), antialiased when shrinking."""
    smaller = height < rgb.shape[0] or width < rgb.shape[1]
    method = Image.Resampling.LANCZOS if smaller else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(rgb).resize((width, height), method))


def fit(rgb: np.ndarray, longest: int) -> np.ndarray:
    """Shrink so the longest side is at most ``longest`` (report size stays bounded)."""
    height, width = rgb.shape[:2]
    if max(height, width) <= longest:
        return rgb
    scale = longest / max(height, width)
    return resize(rgb, max(1, round(height * scale)), max(1, round(width * scale)))


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png(rgb)).decode("ascii")


def segments_image(image: np.ndarray, segments: np.ndarray, longest: int = 112) -> np.ndarray:
    """The image enlarged, superpixel boundaries in yellow and each superpixel's number at
    its centre, so rules such as "superpixels 3, 7 kept" can be read off it."""
    from PIL import ImageDraw, ImageFont
    height, width = segments.shape
    scale = max(1, longest // max(height, width))
    big = resize(as_rgb(image), height * scale, width * scale).copy()
    labels = np.kron(segments, np.ones((scale, scale), dtype=segments.dtype))
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    big[edge] = (255, 215, 0)
    canvas = Image.fromarray(big)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for label in np.unique(segments):
        ys, xs = np.nonzero(segments == label)
        draw.text(((xs.mean() + 0.5) * scale, (ys.mean() + 0.5) * scale), str(int(label)), fill=(0, 255, 255),
                  font=font, anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)


def flattened_images(values, height: int, width: int, channels: int = 1) -> list[np.ndarray] | None:
    """A flat list of whole images (e.g. abele's exemplars, in model-input space) -> [H,W,3]
    uint8 each, min-max scaled on its own; None if the values are not whole images."""
    values = np.asarray(values, dtype=np.float64)
    size = height * width * channels
    if values.size == 0 or values.size % size:
        return None
    images = values.reshape(-1, channels, height, width)
    return [as_rgb(((x - x.min()) / (np.ptp(x) or 1.0)).transpose(1, 2, 0)) for x in images]
