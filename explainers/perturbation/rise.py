"""RISE: randomized input sampling for explanation (Petsiuk, Das, Saenko, BMVC 2018)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saliency_audit.explainers.core.base import (
    Explainer,
    Explanation,
    check_batch,
    check_chunk,
    chunk_within_budget,
    forward_chunk,
)
from saliency_audit.explainers.core.maps import image_generators
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.core.scores import class_probabilities


def rise_masks(grids: torch.Tensor, shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Smooth masks [N,H,W] from binary grids [N,s,s] and shifts [N,2]: each grid is upsampled
    bilinearly to (s+1) cells of ceil(H/s) x ceil(W/s) pixels and cropped to H x W at the shift, so
    cell edges fall anywhere, not only on the grid's lines (the paper's construction)."""
    n, cells = grids.shape[0], grids.shape[1]
    cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
    up = F.interpolate(grids.unsqueeze(1), size=((cells + 1) * cell_h, (cells + 1) * cell_w),
                       mode="bilinear", align_corners=False)[:, 0]
    rows = shifts[:, :1] + torch.arange(height, device=grids.device)  # [N,H]
    cols = shifts[:, 1:] + torch.arange(width, device=grids.device)  # [N,W]
    return up[torch.arange(n, device=grids.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


@register
class RISE(Explainer):
    """Saliency = E[score(x * M) M] / E[M] over random smooth masks M: the pixels whose presence
    goes with a high score. Unsigned; forward passes only (a black box).

    n_masks: masks per image (default 4000, the paper's choice for ResNet-50; it used 8000 for VGG-16).
    cells: the binary grid's side s (default 7): masks vary on the scale of 1/s of the image.
    keep: probability that a cell is kept (default 0.5).
    max_forward_batch: masked images per forward pass (default: suits the device; see
        forward_chunk), fewer for large images (CHUNK_BUDGET_BYTES).

    score: the target's softmax probability, as in the paper. Removed pixels are 0 in model-input
    space (black for [0, 1] inputs, the mean colour after --mean/--std). Each image's masks come
    from its own seed, so its map is the same in any batch up to float rounding; the masked
    images of several images share forward passes.  Cost: n_masks forward passes per image.
    """

    name = "rise"
    agrees_at = ("bf16",)  # rank correlation with float32's maps 0.99999 or more (docs/performance.md)
    signed = False
    needs_gradients = False

    def __init__(self, model, n_masks: int = 4000, cells: int = 7, keep: float = 0.5,
                 max_forward_batch: int | None = None):
        super().__init__(model)
        for option, value in (("n_masks", n_masks), ("cells", cells)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
            raise ValueError(f"keep must be a number in (0, 1], got {keep!r}")
        check_chunk("max_forward_batch", max_forward_batch)
        self.n_masks, self.cells, self.keep = n_masks, cells, float(keep)
        self.max_forward_batch = max_forward_batch

    def passes(self):
        return {"forward": self.n_masks, "backward": 0}

    def draw(self, g: torch.Generator, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's grids [n_masks,s,s] and shifts [n_masks,2] (see rise_masks), all drawn up
        front from its generator, so chunking cannot change them (a few bytes per mask)."""
        cells = min(self.cells, height, width)
        grids = (torch.rand(self.n_masks, cells, cells, generator=g) < self.keep).float()
        shifts = torch.stack([torch.randint(0, math.ceil(height / cells), (self.n_masks,), generator=g),
                              torch.randint(0, math.ceil(width / cells), (self.n_masks,), generator=g)], 1)
        return grids, shifts

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach()
        batch, _, height, width = images.shape
        device = images.device
        targets = targets.to(device).long()
        draws = [self.draw(g, height, width) for g in image_generators(seeds, batch)]
        grids = torch.stack([grid for grid, _ in draws]).to(device)
        shifts = torch.stack([shift for _, shift in draws]).to(device)
        total = batch * self.n_masks
        chunk = chunk_within_budget(forward_chunk(self.max_forward_batch, device), images.shape[1:], device)
        maps = torch.zeros(batch, height, width, device=device)
        with torch.no_grad():
            for start in range(0, total, chunk):
                index = torch.arange(start, min(start + chunk, total), device=device)
                owner, k = index // self.n_masks, index % self.n_masks
                masks = rise_masks(grids[owner, k], shifts[owner, k], height, width).to(images.dtype)
                logits = self.model(images[owner] * masks.unsqueeze(1))
                score = class_probabilities(logits.float()).gather(1, targets[owner].unsqueeze(1)).squeeze(1)
                # maps[owner] += score * mask as one matrix product: index_add_ is several times slower on CPU
                weights = torch.zeros(batch, len(index), device=device)
                weights[owner, torch.arange(len(index), device=device)] = score
                maps.view(batch, -1).addmm_(weights, masks.float().view(len(index), -1))
        return Explanation(maps / (self.n_masks * self.keep))
