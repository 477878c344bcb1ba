"""Meaningful perturbation, the deletion game (Fong & Vedaldi 2017)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.maps import image_generators
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.core.scores import check_score, target_scores

SPAN_RTOL = 1e-3  # image-to-reference score gaps below this (relative to the score) count as none


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,C,H,W] per channel, kernel 2*ceil(3 sigma)+1, borders reflected."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    height, width = images.shape[2:]
    # reflect padding needs pad < size; replicate works for any size
    mode = "reflect" if radius < min(height, width) else "replicate"
    out = F.pad(images, (radius, radius, radius, radius), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def total_variation(masks: torch.Tensor, beta: float) -> torch.Tensor:
    """TV_beta per mask of [B,1,h,w]: mean |vertical diff|^beta + mean |horizontal diff|^beta."""
    dv = (masks[:, :, 1:, :] - masks[:, :, :-1, :]).abs().pow(beta).flatten(1).mean(1)
    dh = (masks[:, :, :, 1:] - masks[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dv + dh


@register
class MeaningfulPerturbation(Explainer):
    """The smallest smooth mask whose deletion removes the target's evidence. Unsigned, in [0,1].

    A low-resolution mask m (1 = keep) per image, upsampled bilinearly, mixes the image
    with a reference: x' = m x + (1 - m) r.  Adam minimises, for every image at once
    (each its own mask, losses summed),
        l1_coeff * mean|1 - m| + tv_coeff * TV_beta(m) + (s(x') - s(r)) / (s(x) - s(r)),
    clamping m to [0,1] after each step, where s is the target's score.  The map is
    1 - upsampled m.  The score term runs from 1 on the image to 0 on the reference
    whatever the model's logit scale, so the penalty coefficients mean the same on every
    model: deleting a share a of the image pays when it takes the score more than
    l1_coeff * a of its way to the reference's.  An image whose score the reference does not lower (s(r) >= s(x))
    has nothing to delete: its map is 0 and its ``deleted_score_relative`` NaN.

    mask_size: side of the mask grid (default None: a quarter of the image side, 7 for
        28 px; the paper used 28 for 224 px).  Finer masks invite adversarial holes.
    reference: "blur" (default; the paper's main variant, right for natural images) or a
        constant in model-input space.  On black-background data such as MNIST a blurred
        stroke stays visible: use 0.0 there (measured on the demo MNIST CNN, 100 digits:
        median deleted_score 0.10 with blur, 0.005 with 0.0; deletion AUC 0.33 and 0.19
        of a random map's).
    blur_sigma: Gaussian sigma of the blurred reference in pixels (default 3.0; the paper
        used 10 for 224 px).
    l1_coeff, tv_coeff: 0.05 and 0.01 (both penalties are means over the mask).  The
        PyTorch port's 0.01 and 0.2 (for 28 x 28 masks on 224 px) let TV win over L1 on
        a 7 x 7 mask: the pull of a hole's edge on its neighbours exceeds the L1 push back
        wherever they differ by more than ~0.1, so the hole spreads over the whole image
        (measured: 80% of a 12 px image deleted for a 4 x 4 evidence region).  Lower
        values delete larger areas, higher ones smaller; with the normalised score they
        mean the same on a model of any logit scale.
    tv_beta, lr: 3 and 0.1, as in the paper and the port.
    n_iter: Adam steps (default 100; the paper used 500 and the port 300 for 224 px,
        the small masks of 28-32 px images settle much sooner).
    noise: std of Gaussian noise added to x' at each step against adversarial masks
        (default 0: off); drawn per image from its seed, so results stay deterministic.
    score: s, the target's score (see saliency_audit.explainers.core.scores.target_scores): "margin"
        (default: the target logit minus the largest other), "log_odds", "logit" or
        "probability" (normalised like the others).  The paper optimised the probability
        itself, which saturates: once the model is confident its gradient vanishes, the
        penalties win and the mask stays at 1.  Measured before the change, 100 MNIST test
        digits, default options: on the demo CNN with its logits x50 (float32 rounds every
        probability to 1.0) all 100 maps were exactly 0 (deletion AUC 0.96 of a random
        map's); on the demo CNN itself 10 were, and deletion/random was 0.49.  With the
        normalised margin: no zero map on either, deletion/random 0.33 on the demo CNN and
        0.35 on its x50 copy (the metric itself saturates there), and the same masks for
        both, since the normalised margin is exactly invariant to the logits' scale; the
        normalised log-odds is not (maps up to 1.0 apart between the x1 and x50 copies).

    init: the mask's value where the optimisation starts (default 0.25: the image mostly
        replaced by the reference; 1 keeps the whole image, as the paper and the port start).
        From 1 Adam only follows the score's slope at the image itself, and on a confident
        model that slope can point the wrong way: deleting a little of the evidence raises the
        target's margin, the mask is clamped at 1 there and never reaches the deletion that
        removes the class.  Measured on the ResNet of tests/pipelines/test_resnet_trained.py
        (class: the colour of a 6x6 square on photo crops, p > 0.999), 48 images each of two
        training seeds: the map's maximum on the square (2 px margin; a map of 0 counts as a
        miss) for 50% and 56% of the images from 1, 81% and 92% from 0.5, 90% and 98% from
        0.25, where every miss left is a map of 0: a blurred reference that keeps the square's
        colour, so nothing is deletable (reference=0.0 deletes it);
        demo CNN, 100 digits: deletion AUC 0.231 of a random map's from 1, 0.245 from 0.25.
        From 0.25 the evidence is mostly gone, the penalties bring back what the class does
        not need, and the score term holds back what would bring it back.

    Extras: ``deleted_score``, the target probability on the image perturbed with the final
    mask (0 or 1 on a saturated model); ``deleted_score_relative``, the optimised score
    term on it: 0 when the mask deleted as much evidence as the reference does, 1 when it
    deleted none, NaN when the reference does not lower the score.

    Cost: n_iter forward + backward passes, plus 3 forwards (the image, the reference and
    the result), per image.
    """

    name = "mask"
    signed = False
    caveats = {"constant": (
        "A mask map of 0 means the reference (by default a blurred copy) scores the class as high as the "
        "image: blurring does not remove the evidence (a colour, a large shape), so there was nothing to "
        "delete; a constant reference (reference 0.0) removes it.")}
    extras = {"deleted_score": "float32", "deleted_score_relative": "float32"}

    def __init__(self, model, mask_size: int | None = None, reference: str | float = "blur",
                 blur_sigma: float = 3.0, l1_coeff: float = 0.05, tv_coeff: float = 0.01,
                 tv_beta: float = 3.0, lr: float = 0.1, n_iter: int = 100, noise: float = 0.0,
                 score: str = "margin", init: float = 0.25):
        super().__init__(model)
        if mask_size is not None and (not isinstance(mask_size, int) or isinstance(mask_size, bool) or mask_size < 1):
            raise ValueError(f"mask_size must be None or an integer >= 1, got {mask_size!r}")
        if not (reference == "blur" or (isinstance(reference, (int, float)) and not isinstance(reference, bool))):
            raise ValueError(f"reference must be 'blur' or a number, got {reference!r}")
        for option, value in (("blur_sigma", blur_sigma), ("l1_coeff", l1_coeff), ("tv_coeff", tv_coeff),
                              ("noise", noise)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{option} must be a number >= 0, got {value!r}")
        for option, value in (("tv_beta", tv_beta), ("lr", lr)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{option} must be a number > 0, got {value!r}")
        if not isinstance(init, (int, float)) or isinstance(init, bool) or not 0 <= init <= 1:
            raise ValueError(f"init must be a number in [0, 1], got {init!r}")
        if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        check_score(score)
        self.mask_size = mask_size
        self.reference = reference
        self.blur_sigma = float(blur_sigma)
        self.l1_coeff = float(l1_coeff)
        self.tv_coeff = float(tv_coeff)
        self.tv_beta = float(tv_beta)
        self.lr = float(lr)
        self.n_iter = n_iter
        self.noise = float(noise)
        self.score = score
        self.init = float(init)

    def passes(self):
        return {"forward": self.n_iter + 3, "backward": self.n_iter}

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach()
        batch, channels, height, width = images.shape
        device = images.device
        targets = targets.to(device).long()
        size = self.mask_size or max(1, min(height, width) // 4)
        if self.reference == "blur":
            reference = gaussian_blur(images, self.blur_sigma)
        else:
            reference = torch.full_like(images, float(self.reference))
        generators = image_generators(seeds, batch) if self.noise > 0 else None
        with torch.no_grad():
            ends = target_scores(self.model(torch.cat([images, reference])), targets.repeat(2), self.score)
        floor, span = ends[batch:], ends[:batch] - ends[batch:]
        # A span within rounding noise (a flat image, whose blur is itself) would be blown up to 1 by
        # the division and the mask would chase noise: such an image has nothing to delete.
        deletable = span > SPAN_RTOL * ends[:batch].abs().clamp_min(1)

        def relative_score(logits: torch.Tensor) -> torch.Tensor:
            """The score's way from the reference (0) to the image (1); 0 where nothing is deletable."""
            relative = (target_scores(logits, targets, self.score) - floor) / torch.where(deletable, span, 1.0)
            return torch.where(deletable, relative, 0.0)

        def perturb(mask: torch.Tensor) -> torch.Tensor:
            upsampled = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
            return upsampled * images + (1 - upsampled) * reference, upsampled

        # An image with nothing to delete keeps everything: its mask starts (and stays) at 1.
        start = torch.where(deletable, self.init, 1.0)
        mask = start.view(batch, 1, 1, 1).expand(batch, 1, size, size).clone().requires_grad_(True)
        optimiser = torch.optim.Adam([mask], lr=self.lr)
        for _ in range(self.n_iter):
            with torch.enable_grad():
                perturbed, _ = perturb(mask)
                if generators is not None:
                    noise = torch.stack([torch.randn(channels, height, width, generator=g) for g in generators])
                    perturbed = perturbed + self.noise * noise.to(device, perturbed.dtype)
                # Per-image losses summed: Adam is elementwise, so each mask follows only its own image.
                loss = (self.l1_coeff * (1 - mask).abs().flatten(1).mean(1)
                        + self.tv_coeff * total_variation(mask, self.tv_beta)
                        # no reward below the reference's score: the mask has done its job there
                        + relative_score(self.model(perturbed)).clamp_min(0)).sum()
                mask.grad, = torch.autograd.grad(loss, mask)
            optimiser.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
        with torch.no_grad():
            perturbed, upsampled = perturb(mask)
            logits = self.model(perturbed)
            deleted = target_scores(logits, targets, "probability")
            relative = torch.where(deletable, relative_score(logits), float("nan"))
        return Explanation((1 - upsampled).squeeze(1).float(),
                           {"deleted_score": deleted, "deleted_score_relative": relative})
