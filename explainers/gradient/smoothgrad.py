"""SmoothGrad (Smilkov, Thorat, Kim, Viegas, Wattenberg 2017)."""
from __future__ import annotations

import torch

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch, chunk_within_budget
from saliency_audit.explainers.core.maps import image_generators
from saliency_audit.explainers.core.registry import register

STATISTICS = ("mean", "mean_square", "variance")


@register
class SmoothGrad(Explainer):
    """Mean gradient of the target logit over noisy copies of the image.

    n_samples: noisy copies per image (default 50, the paper's choice).
    noise_level: noise standard deviation as a fraction of the image's value range
        max(x) - min(x) (default 0.15; the paper recommends 0.1-0.2).
    absolute: False (default): average the signed gradient, summed over channels (a signed
        map); True: average |gradient|, like ``sal`` (unsigned). The default was True until
        issue 12: an unsigned map ranks pixels whose removal would raise the target (evidence
        against the class) as high as those that support it, and deletion punishes that. On
        the first 100 MNIST test digits (zero substrate, deletion AUC over a random map's;
        ``python benchmarks/signed_vs_unsigned.py``): demo CNN 0.30 with True, 0.16 with False;
        a Keras-style CNN 0.29 and 0.18. 11% of the top 20% pixels of the |gradient| map are
        evidence against the class (gradient x input < 0), 2% of the signed map's.
    statistic: what is taken over the noisy copies, per input element, before channels are
        summed: "mean" (default: SmoothGrad), "mean_square" (SmoothGrad-squared, Hooker et al.
        2019) or "variance" (VarGrad, Adebayo et al. 2018): the two last are unsigned; Captum's
        NoiseTunnel calls them smoothgrad, smoothgrad_sq and vargrad. ``absolute`` applies to "mean".
    max_expanded_batch: at most this many noisy copies go through the model at once (fewer
        for large images: see CHUNK_BUDGET_BYTES).

    Noise is seeded per image from ``seeds`` so each map depends only on its image, its
    target and its seed.  Cost: n_samples forward + n_samples backward passes per image.
    """

    name = "smoothgrad"
    signed = True

    def __init__(self, model, n_samples: int = 50, noise_level: float = 0.15, absolute: bool = False,
                 statistic: str = "mean", max_expanded_batch: int = 256):
        super().__init__(model)
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        if not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool) or noise_level < 0:
            raise ValueError(f"noise_level must be a number >= 0, got {noise_level!r}")
        if not isinstance(absolute, bool):
            raise ValueError(f"absolute must be True or False, got {absolute!r}")
        if not isinstance(max_expanded_batch, int) or isinstance(max_expanded_batch, bool) or max_expanded_batch < 1:
            raise ValueError(f"max_expanded_batch must be an integer >= 1, got {max_expanded_batch!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.absolute = absolute
        self.statistic = statistic
        self.max_expanded_batch = max_expanded_batch
        self.signed = statistic == "mean" and not absolute  # per instance: the options decide

    def passes(self):
        return {"forward": self.n_samples, "backward": self.n_samples}

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach()
        batch, channels, height, width = images.shape
        device = images.device
        targets = targets.to(device).long()
        generators = image_generators(seeds, batch)
        flat = images.reshape(batch, -1)
        std = self.noise_level * (flat.max(1).values - flat.min(1).values)
        total, chunk = batch * self.n_samples, chunk_within_budget(self.max_expanded_batch, images.shape[1:],
                                                                            images.device)
        # per input element: the sum of gradients, and of their squares for the other statistics
        # float64 for the second moments: E[g^2] - E[g]^2 in float32 cancels to noise when the
        # gradient hardly varies (a linear model's variance came out 1e-2 against E[g^2] ~ 1e4)
        wide = torch.float32 if self.statistic == "mean" else torch.float64
        sums = torch.zeros(batch, channels, height, width, device=device, dtype=wide)
        squares = torch.zeros_like(sums) if self.statistic != "mean" else None
        for start in range(0, total, chunk):
            index = torch.arange(start, min(start + chunk, total), device=device)
            b = index // self.n_samples
            # (image, sample) pairs in row-major order: each image draws its samples
            # from its own generator in the same order whatever the chunking.
            noise = torch.empty(len(index), channels, height, width)
            for i, image in enumerate(b.tolist()):
                noise[i].normal_(generator=generators[image])
            # in place: the chunk's copies are the only images-sized tensors besides the gradients
            noisy = noise.to(device, images.dtype).mul_(std[b].view(-1, 1, 1, 1)).add_(images[b])
            noisy.requires_grad_(True)
            with torch.enable_grad():
                score = self.model(noisy).gather(1, targets[b].unsqueeze(1)).sum()
                grads, = torch.autograd.grad(score, noisy)
            grads = grads.to(wide)
            if squares is not None:
                squares.index_add_(0, b, grads * grads)
            sums.index_add_(0, b, grads.abs_() if self.absolute and squares is None else grads)
        mean = sums / self.n_samples
        if self.statistic == "mean":
            return Explanation(mean.sum(1))
        mean_square = squares / self.n_samples
        per_element = mean_square if self.statistic == "mean_square" else (mean_square - mean * mean).clamp_(min=0)
        return Explanation(per_element.sum(1).float())
