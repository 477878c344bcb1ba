"""Superpixels for the model-agnostic methods (lime, anchor, lore): segmentation and fills.

Images arrive in model-input space [C,H,W] (possibly mean/std normalised). Segmenters see a
per-image min-max rescaled copy in [0,1], grey replicated to RGB (skimage's quickshift needs
3 channels, lime#116); fills are computed in model-input space, since that is what the model sees.

Segment labels are always contiguous 0..S-1 (skimage's slic starts at 1, alibi#748), int32 [H,W].
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import felzenszwalb, quickshift, slic

SEGMENTATIONS = ("quickshift", "slic", "felzenszwalb", "grid")


def _unit_rgb(image: np.ndarray) -> np.ndarray:
    """[C,H,W] any range -> [H,W,3] float64 in [0,1]; only for segmenting."""
    image = np.asarray(image, dtype=np.float64)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    image = np.moveaxis(image, 0, -1)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] != 3:
        raise ValueError(f"superpixel methods need 1 or 3 channels, got {image.shape[-1]}")
    return image


def default_options(segmentation: str, height: int, width: int) -> dict[str, Any]:
    """Defaults per segmenter for an image of this size.

    quickshift: lime_image's max_dist=200, ratio=0.2; lime's kernel_size=4 at >= 256 px,
    shrunk to max(1, min(H,W)/64) below, because 4 leaves 1-3 segments on 28x28 digits (lime#386)
    while 1 gives ~7; this keeps ~40 segments on astronaut at 64, 128 and 256 px.
    slic: n_segments=25, compactness=10, sigma=0.5: a superpixel is ~1/25 of the image at any
    size (~19 on a digit, whose background is flat); small enough that a 4x4 high-contrast
    patch on 28x28 noise stays its own superpixel, few enough that hiding a random half of
    them still changes what a digit shows (at 50, anchor's empty rule held on 4% of digits
    under a 0 fill against 1% at 25, and each anchor cost 5x the model calls). alibi uses
    10, too coarse for digits.
    felzenszwalb: scale=100, sigma=0.5, min_size scaled with the image (~1/400 of its area, >= 5).
    grid: n_segments=16 square-ish cells.
    """
    side = min(height, width)
    if segmentation == "quickshift":
        return {"kernel_size": float(min(4, max(1, side // 64))), "max_dist": 200.0, "ratio": 0.2}
    if segmentation == "slic":
        return {"n_segments": 25, "compactness": 10.0, "sigma": 0.5}
    if segmentation == "felzenszwalb":
        return {"scale": 100.0, "sigma": 0.5, "min_size": max(5, height * width // 400)}
    if segmentation == "grid":
        return {"n_segments": 16}
    raise ValueError(f"unknown segmentation {segmentation!r}; use one of {', '.join(SEGMENTATIONS)}")


def _finer(segmentation: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The next finer settings, or None when there is nothing finer to try."""
    o = dict(options)
    if segmentation == "quickshift":
        if o["kernel_size"] <= 1 and o.get("max_dist", 200) <= 2:
            return None
        if o["kernel_size"] > 1:
            o["kernel_size"] = max(1.0, o["kernel_size"] / 2)
        else:
            o["max_dist"] = o.get("max_dist", 200) / 4
        return o
    if segmentation == "slic":
        o["n_segments"] = o.get("n_segments", 50) * 2
        o["compactness"] = o.get("compactness", 10.0) / 4
        return o if o["n_segments"] <= 4096 else None
    if segmentation == "felzenszwalb":
        if o.get("scale", 100.0) < 0.1 and o.get("min_size", 20) <= 1:
            return None
        o["scale"] = o.get("scale", 100.0) / 4
        o["min_size"] = max(1, o.get("min_size", 20) // 2)
        return o
    if segmentation == "grid":
        return None
    raise ValueError(f"unknown segmentation {segmentation!r}; use one of {', '.join(SEGMENTATIONS)}")


def grid_segments(height: int, width: int, n_segments: int = 16) -> np.ndarray:
    """A regular grid of about n_segments cells, int32 [H,W], labels row-major."""
    rows = min(height, max(1, round(math.sqrt(n_segments * height / width))))
    cols = min(width, max(1, math.ceil(n_segments / rows)))
    r = np.arange(height) * rows // height
    c = np.arange(width) * cols // width
    return (r[:, None] * cols + c[None, :]).astype(np.int32)


def _run(segmentation: str, rgb: np.ndarray, options: dict[str, Any], seed: int) -> np.ndarray:
    if segmentation == "quickshift":
        return quickshift(rgb, rng=seed, **options)
    if segmentation == "slic":
        return slic(rgb, start_label=0, **options)
    if segmentation == "felzenszwalb":
        return felzenszwalb(rgb, **options)
    if segmentation == "grid":
        return grid_segments(rgb.shape[0], rgb.shape[1], **options)
    raise ValueError(f"unknown segmentation {segmentation!r}; use one of {', '.join(SEGMENTATIONS)}")


def segment(image: np.ndarray | torch.Tensor, segmentation: str = "quickshift",
            options: dict[str, Any] | None = None, min_segments: int = 4, seed: int = 0) -> np.ndarray:
    """Superpixels of one image [C,H,W] (C = 1 or 3): int32 [H,W], labels 0..S-1.

    ``options`` override :func:`default_options`. If fewer than ``min_segments`` come out, the
    image is segmented again with finer settings (halved quickshift kernel, then smaller
    max_dist; twice the slic segments; a quarter of the felzenszwalb scale), and as a last
    resort with a regular grid, so a flat image still gets ``min_segments`` regions rather
    than one meaningless segment. ValueError if the image has fewer pixels than that.
    Cost: one skimage call, a few ms at 28x28, ~0.3 s for quickshift at 256x256.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if image.ndim != 3:
        raise ValueError(f"segment takes one image [C,H,W], got shape {image.shape}")
    _, height, width = image.shape
    if height * width < min_segments:
        raise ValueError(f"a {height}x{width} image cannot be split into "
                         f"min_segments={min_segments} superpixels")
    opts = {**default_options(segmentation, height, width), **(options or {})}
    rgb = _unit_rgb(image)
    while opts is not None:
        _, labels = np.unique(_run(segmentation, rgb, opts, seed), return_inverse=True)
        labels = labels.reshape(height, width).astype(np.int32)
        if labels.max() + 1 >= min_segments:
            return labels
        opts = _finer(segmentation, opts)
    return grid_segments(height, width, max(min_segments, 16))


def segment_batch(images: torch.Tensor, segmentation: str, options: dict[str, Any] | None,
                  min_segments: int, seeds: np.ndarray) -> list[np.ndarray]:
    """:func:`segment` for each image of [B,C,H,W]; seeds [B] (>= 0) seed quickshift's tie-breaking
    (taken modulo 2**31: a C int there)."""
    array = images.detach().float().cpu().numpy()
    return [segment(array[i], segmentation, options, min_segments, int(seeds[i]) % 2 ** 31)
            for i in range(len(array))]


def fill_images(images: torch.Tensor, segments: torch.Tensor, fill: float | str) -> torch.Tensor:
    """The "switched off" image for each of [B,C,H,W]: what an off superpixel shows.

    fill: "image-mean" (the image's own per-channel mean everywhere: a hidden region shows
    the image's average colour and none of its content, whatever the normalisation),
    "mean" (each superpixel's own per-channel mean, as lime_image's hide_color=None: it
    removes only texture inside a superpixel, so a uniform region, a stroke or a patch that
    is its own superpixel, stays visible when "hidden"), a number (a constant in model-input
    space, e.g. 0.0), "blur" (a Gaussian blur with sigma=5 px, RISE's substrate) or
    "blur:SIGMA". segments: long [B,H,W] labels.
    """
    check_fill(fill)
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return torch.full_like(images, float(fill))
    if fill == "image-mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if fill == "mean":
        b, c, h, w = images.shape
        n = int(segments.max()) + 1
        flat = segments.reshape(b, 1, h * w).expand(b, c, h * w)
        sums = torch.zeros(b, c, n, dtype=images.dtype, device=images.device)
        sums.scatter_add_(2, flat, images.reshape(b, c, h * w))
        counts = torch.zeros(b, 1, n, dtype=images.dtype, device=images.device)
        counts.scatter_add_(2, flat[:, :1], torch.ones_like(images[:, :1]).reshape(b, 1, h * w))
        means = sums / counts.clamp(min=1)
        return torch.gather(means, 2, flat).reshape(b, c, h, w)
    if isinstance(fill, str) and (fill == "blur" or fill.startswith("blur:")):
        sigma = float(fill.split(":", 1)[1]) if ":" in fill else 5.0
        array = images.detach().cpu().double().numpy()
        blurred = ndimage.gaussian_filter(array, sigma=(0, 0, sigma, sigma), mode="nearest")
        return torch.as_tensor(blurred, dtype=images.dtype, device=images.device)
    raise AssertionError(fill)  # check_fill refused anything else


def check_fill(fill: float | str) -> None:
    """ValueError unless ``fill`` is one that :func:`fill_images` knows."""
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return
    if fill in ("image-mean", "mean", "blur"):
        return
    if isinstance(fill, str) and fill.startswith("blur:"):
        try:
            if float(fill.split(":", 1)[1]) > 0:
                return
        except ValueError:
            pass
    raise ValueError(f"unknown fill {fill!r}; use 'image-mean', 'mean', a number, 'blur' or 'blur:SIGMA' "
                     "(SIGMA > 0)")


def paint(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Spread per-superpixel values [S] over the pixels: [H,W] float32."""
    return np.asarray(values, dtype=np.float32)[segments]


def describe(ids) -> str:
    """'{3, 7}' for superpixel ids, as used in the readable rules."""
    return "{" + ", ".join(str(int(i)) for i in ids) + "}"
