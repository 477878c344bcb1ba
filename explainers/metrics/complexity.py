"""Sparsity of a map: the Gini index of its absolute values."""
from __future__ import annotations

import torch

from saliency_audit.explainers.metrics._utils import check_maps


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of |map| per image, [B,H,W] -> [B] float32 in [0, 1 - 1/N].

    0 for a uniform map, 1 - 1/N for a single non-zero pixel out of N (the most
    concentrated map possible). With |values| sorted ascending v_1..v_N,
    G = sum_k (2k - N - 1) v_k / (N * sum_k v_k) (Hurley & Rickard 2009; the form Quantus
    uses for its "Sparseness"). An all-zero map has no concentration and gets 0.
    """
    check_maps(maps)
    batch, height, width = maps.shape
    n = height * width
    values, _ = torch.sort(maps.detach().abs().reshape(batch, n).double(), dim=1)
    weights = 2 * torch.arange(1, n + 1, device=maps.device, dtype=torch.float64) - n - 1
    total = values.sum(dim=1)
    index = (values * weights).sum(dim=1) / (n * torch.where(total > 0, total, 1))
    return torch.where(total > 0, index, 0).float()
