"""Gradient saliency (Simonyan et al. 2013) and gradient x input (Shrikumar et al. 2016)."""
from __future__ import annotations

from captum.attr import InputXGradient, Saliency

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register


@register
class GradientSaliency(Explainer):
    """|d logit_target / d x|, summed over channels. 1 forward + 1 backward.

    absolute: True (default, Simonyan et al.'s saliency): unsigned; False: the signed
        gradient, which separates pixels whose darkening would raise the target (negative)
        from those that support it. Deletion order punishes the unsigned map for ranking both
        alike (see benchmarks/signed_vs_unsigned.py): on the demo CNN, 100 test digits, zero
        substrate, |gradient| is at 0.29 of a random map's deletion AUC and the signed gradient
        at 0.15 (gradient x input, ``grad``, 0.13). The default stays Simonyan's definition;
        ``grad`` is the signed map to use for deletion.
    """

    name = "sal"
    signed = False

    def __init__(self, model, absolute: bool = True):
        super().__init__(model)
        if not isinstance(absolute, bool):
            raise ValueError(f"absolute must be True or False, got {absolute!r}")
        self.absolute = absolute
        self.signed = not absolute  # per instance: the option decides

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        grads = Saliency(self.model).attribute(images, target=targets, abs=self.absolute)
        return Explanation(sum_channels(grads.detach()))


@register
class GradientTimesInput(Explainer):
    """x * d logit_target / d x, summed over channels. Signed. 1 forward + 1 backward."""

    name = "grad"

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        attributions = InputXGradient(self.model).attribute(images, target=targets)
        return Explanation(sum_channels(attributions.detach()))
