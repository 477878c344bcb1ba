"""Reference inputs ("baselines") for path and reference-based methods."""
from __future__ import annotations

import torch


def make_baseline(spec: float | str, images: torch.Tensor) -> torch.Tensor:
    """A baseline shaped like ``images`` from a spec.

    A number is a constant in model-input space (0.0 is black for [0,1] inputs without
    normalisation); "zeros" is the same as 0.0; "mean" is each image's per-channel mean.
    """
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return torch.full_like(images, float(spec))
    if spec == "zeros":
        return torch.zeros_like(images)
    if spec == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).contiguous()
    raise ValueError(f"unknown baseline {spec!r}; use a number, 'zeros' or 'mean'")
