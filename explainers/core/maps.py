"""Helpers on maps and noise that several methods share."""
from __future__ import annotations

import torch


def sum_channels(attributions: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W]; the additive reduction, so sums over the map stay meaningful."""
    return attributions.sum(dim=1)


def image_generators(seeds: torch.Tensor | None, batch: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded by its entry of ``seeds`` (0 when None).

    Noise is drawn on the CPU so an image gets the same noise on every runner, CPU or
    GPU, and whatever else is in its batch.
    """
    if seeds is None:
        seeds = torch.zeros(batch, dtype=torch.int64)
    if len(seeds) != batch:
        raise ValueError(f"seeds must have one entry per image ({batch}), got {len(seeds)}")
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]
