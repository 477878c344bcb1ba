"""Expected gradients (Erion et al. 2021), the estimator behind GradientShap (Lundberg & Lee 2017)."""
from __future__ import annotations

import numpy as np
import torch

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch, chunk_within_budget
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.metrics._utils import STREAM_EXPECTED_GRADIENTS, as_seed_list, generator

BACKGROUNDS = ("uniform", "zeros")


def read_background(path: str) -> torch.Tensor:
    """Background images [N,C,H,W] float32 from a .npy file (never unpickled: a file from outside
    the run must not run code), local or on object storage through fsspec. Whatever stops the
    read (storage clients raise errors of their own types) is a ValueError in one line, naming
    the file without its query (a presigned signature)."""
    import fsspec

    from saliency_audit.explainers.core.paths import shown, unquoted
    name = shown(path)
    try:
        with fsspec.open(path, "rb") as f:
            array = np.load(f, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - botocore's, aiohttp's... are no OSError
        message = " ".join(unquoted(e, path).split())[:200]
        raise ValueError(f"expected_gradients: cannot read background {name!r}: {type(e).__name__}: {message}"
                         ) from None
    if array.ndim != 4 or not array.shape[0] or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"expected_gradients: background {name!r} must hold numeric images [N,C,H,W], "
                         f"got {array.dtype} {array.shape}")
    background = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(background).all():
        raise ValueError(f"expected_gradients: background {name!r} holds NaN or infinite values")
    return background


@register
class ExpectedGradients(Explainer):
    """E over baselines x' ~ background and alpha ~ U(0, 1) of (x - x') * grad f(x' + alpha (x - x')),
    summed over channels. Signed; it sums to f(x) - E f(x') in expectation (completeness).

    n_samples: (baseline, alpha) draws per image (default 50; Captum's GradientShap uses 5,
        which leaves visible sampling noise).
    background: where baselines come from: "uniform" (default): noise uniform between the
        image's own minimum and maximum, a reference that carries no structure; "zeros": the
        all-zero input (then this is integrated gradients with random steps); or a path to a
        .npy of images [N,C,H,W] in model-input space (the paper's choice: training images),
        drawn with replacement.
    noise: standard deviation of Gaussian noise added to x at each draw, as a fraction of the
        image's value range (GradientShap's stdevs; default 0).
    max_expanded_batch: at most this many interpolated images per forward pass.

    Draws come from each image's seed, so its map does not depend on the batch.
    Cost: n_samples forward + n_samples backward passes per image.
    """

    name = "expected_gradients"
    extras = {"convergence_delta": "float32"}

    def __init__(self, model, n_samples: int = 50, background: str = "uniform", noise: float = 0.0,
                 max_expanded_batch: int = 256):
        super().__init__(model)
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not isinstance(background, str) or not background:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)} or a .npy path, got {background!r}")
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise >= 0:
            raise ValueError(f"noise must be a number >= 0, got {noise!r}")
        if not isinstance(max_expanded_batch, int) or isinstance(max_expanded_batch, bool) or max_expanded_batch < 1:
            raise ValueError(f"max_expanded_batch must be an integer >= 1, got {max_expanded_batch!r}")
        self.n_samples, self.background, self.noise = n_samples, background, float(noise)
        self.max_expanded_batch = max_expanded_batch
        self._images = None if background in BACKGROUNDS else read_background(background)

    def passes(self):
        # the baselines' (and with noise the noisy inputs') forward passes give convergence_delta
        return {"forward": (3 if self.noise else 2) * self.n_samples + 1, "backward": self.n_samples}

    def _draw(self, image: torch.Tensor, seed: int, k: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Draw k of one image: baseline, alpha and input noise, from a generator of its own, so
        chunking cannot change any draw and only one chunk of draws is ever in memory."""
        g = generator(seed, STREAM_EXPECTED_GRADIENTS, k)
        shape = image.shape
        if self.background == "zeros":
            baseline = torch.zeros(shape)
        elif self.background == "uniform":
            low, high = image.min().item(), image.max().item()
            baseline = torch.rand(shape, generator=g) * (high - low) + low
        else:
            baseline = self._images[torch.randint(0, len(self._images), (1,), generator=g).item()]
        alpha = torch.rand(1, generator=g).item()
        noise = torch.randn(shape, generator=g) * (self.noise * (image.max() - image.min()).item()) \
            if self.noise else torch.zeros(shape)
        return baseline, alpha, noise

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach()
        batch = len(images)
        device, dtype = images.device, images.dtype
        targets = targets.to(device).long()
        if self._images is not None and tuple(self._images.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"expected_gradients: the background images are {tuple(self._images.shape[1:])}, "
                             f"the input is {tuple(images.shape[1:])}")
        seeds, cpu = as_seed_list(seeds, batch), images.cpu()
        total, chunk = batch * self.n_samples, chunk_within_budget(self.max_expanded_batch, images.shape[1:],
                                                                            images.device)
        attributions = torch.zeros_like(images, dtype=torch.float32)
        baseline_scores = torch.zeros(batch, device=device)
        for start in range(0, total, chunk):
            index = torch.arange(start, min(start + chunk, total))
            b, k = index // self.n_samples, index % self.n_samples
            draws = [self._draw(cpu[i], seeds[i], j) for i, j in zip(b.tolist(), k.tolist())]
            base = torch.stack([d[0] for d in draws]).to(device, dtype)
            alpha = torch.tensor([d[1] for d in draws]).to(device, dtype).view(-1, 1, 1, 1)
            b = b.to(device)
            x = images[b] + torch.stack([d[2] for d in draws]).to(device, dtype)
            point = (base + alpha * (x - base)).requires_grad_(True)
            with torch.enable_grad():
                score = self.model(point).gather(1, targets[b].unsqueeze(1)).sum()
                grads, = torch.autograd.grad(score, point)
            attributions.index_add_(0, b, ((x - base) * grads).float())
            with torch.no_grad():  # completeness compares f(x) - f(x') at the draw's own x (noisy with noise > 0)
                gap = self.model(base).gather(1, targets[b].unsqueeze(1)).squeeze(1).float()
                if self.noise:
                    gap = gap - self.model(x).gather(1, targets[b].unsqueeze(1)).squeeze(1).float()
                baseline_scores.index_add_(0, b, gap)
        attributions /= self.n_samples
        with torch.no_grad():  # completeness in expectation: sum = mean (f(x) - f(x')); the gap shows sampling error
            clean = torch.zeros_like(baseline_scores) if self.noise else \
                self.model(images).gather(1, targets.unsqueeze(1)).squeeze(1).float()
            expected = clean - baseline_scores / self.n_samples
        maps = sum_channels(attributions)
        return Explanation(maps, {"convergence_delta": maps.sum((1, 2)) - expected})
