"""Gradient saliency (Simonyan et al. 2013) and gradient x input (Shrikumar et al. 2016)."""
from __future__ import annotations

import torch
from captum.attr import InputXGradient, Saliency

from explainers._base import Explainer, Explanation, check_batch
from explainers._registry import register


def sum_channels(attributions: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B,H,W]; the additive reduction, so sums over the map stay meaningful."""
    return attributions.sum(dim=1)


@register
class GradientSaliency(Explainer):
    """|d logit_target / d x|, summed over channels. Unsigned. 1 forward + 1 backward."""

    name = "sal"
    signed = False

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        grads = Saliency(self.model).attribute(images, target=targets, abs=True)
        return Explanation(sum_channels(grads.detach()))


@register
class GradientTimesInput(Explainer):
    """x * d logit_target / d x, summed over channels. Signed. 1 forward + 1 backward."""

    name = "grad"

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        attributions = InputXGradient(self.model).attribute(images, target=targets)
        return Explanation(sum_channels(attributions.detach()))
