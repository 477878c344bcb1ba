"""Sliding-window occlusion (Zeiler & Fergus 2014)."""
from __future__ import annotations

import torch

from explainers._base import Explainer, Explanation, check_batch, check_chunk, forward_chunk
from explainers._registry import register

REFERENCE_SIZE = (28, 28)  # the image size passes() reports before the first batch


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis: every ``stride`` pixels, plus one flush with the far
    border when the stride does not land there, so every pixel is covered at least once."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def window_masks(height: int, width: int, window: int, stride: int, device=None) -> torch.Tensor:
    """All windows as a boolean tensor [N, H, W] (True = occluded), rows first."""
    rows = window_starts(height, window, stride)
    cols = window_starts(width, window, stride)
    masks = torch.zeros(len(rows), len(cols), height, width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            masks[i, j, r:r + window, c:c + window] = True
    return masks.view(-1, height, width)


@register
class Occlusion(Explainer):
    """Average drop of the target score when a window x window square is occluded. Signed.

    Every window of side ``window`` at offsets ``stride`` apart (plus a last one flush
    with each border) replaces all channels of its pixels by ``fill``; a pixel's value is
    the mean of score(x) - score(occluded) over the windows that cover it, so positive
    means occluding it lowers the target score.

    window: side in pixels (default 4, for 28-32 px images; the paper used large grey
        squares on 224 px images).
    stride: step between windows (default 2).
    fill: value the occluded pixels take, in model-input space (default 0.0, black for
        [0,1] inputs; DeepExplain uses 0 too).
    score: "probability" (default, as in the paper: the softmax probability of the target)
        or "logit".  Probabilities saturate for confident predictions, so a single window
        rarely moves them much; logits do not saturate.
    max_forward_batch: at most this many occluded images go through the model at once,
        which bounds memory whatever the batch size and number of windows (default None:
        32 on CPU, 1024 on an accelerator).

    Cost: (number of windows + 1) forward passes per image, no backward: 13 x 13 windows
    + 1 = 170 forwards for 28 px with the defaults.
    """

    name = "occlusion"

    def __init__(self, model, window: int = 4, stride: int = 2, fill: float = 0.0,
                 score: str = "probability", max_forward_batch: int | None = None):
        super().__init__(model)
        check_chunk("max_forward_batch", max_forward_batch)
        for option, value in (("window", window), ("stride", stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not isinstance(fill, (int, float)) or isinstance(fill, bool):
            raise ValueError(f"fill must be a number, got {fill!r}")
        if score not in ("probability", "logit"):
            raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
        self.window = window
        self.stride = stride
        self.fill = float(fill)
        self.score = score
        self.max_forward_batch = max_forward_batch
        self._size = REFERENCE_SIZE

    def passes(self):
        """Forwards per image for the last batch's image size (28 x 28 before the first)."""
        height, width = self._size
        if self.window > min(height, width):
            return {"forward": 1, "backward": 0}
        n = len(window_starts(height, self.window, self.stride)) * len(window_starts(width, self.window, self.stride))
        return {"forward": n + 1, "backward": 0}

    def _scores(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        if self.score == "probability":
            logits = torch.log_softmax(logits.float(), dim=1).exp()
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1).float()

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        batch, _, height, width = images.shape
        if self.window > min(height, width):
            raise ValueError(f"window {self.window} is larger than the image ({height}x{width})")
        self._size = (height, width)
        device = images.device
        targets = targets.to(device).long()
        masks = window_masks(height, width, self.window, self.stride, device)  # [N,H,W]
        n = masks.shape[0]
        with torch.inference_mode():
            drops = torch.empty(batch, n, device=device)
            images = images.detach()
            base = self._scores(images, targets)
            # The (image, window) pairs in row-major order, evaluated in chunks.
            total, chunk = batch * n, forward_chunk(self.max_forward_batch, device)
            for start in range(0, total, chunk):
                index = torch.arange(start, min(start + chunk, total), device=device)
                b, w = index // n, index % n
                occluded = images[b].masked_fill(masks[w].unsqueeze(1), self.fill)
                drops.view(-1)[index] = base[b] - self._scores(occluded, targets[b])
            coverage = masks.sum(0, dtype=torch.float32)  # >= 1 everywhere by window_starts
            maps = torch.einsum("bn,nhw->bhw", drops, masks.float()) / coverage
        return Explanation(maps.clone())  # outside inference mode: a normal tensor
