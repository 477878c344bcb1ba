"""Gradient saliency (Simonyan et al. 2013) and gradient x input (Shrikumar et al. 2016)."""
from __future__ import annotations

from captum.attr import InputXGradient, Saliency

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register


UNSIGNED_CLASS_BLIND = (
    "Expected for an unsigned gradient: the map shows how strongly each pixel moves the class's score, not "
    "in which direction, and the pixels that move one class's score move the other classes' too, so the maps "
    "of two classes look alike. The sign tells the classes apart: grad, or sal with absolute false, show "
    "which class a pixel speaks for.")


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

    The unsigned map is class-blind by nature: the random logit test (maps for another class)
    flags it, since the pixels that move one class's score move the other classes' too and only
    the sign says which way. Demo CNN, 8 digits, rank correlation between the maps of the
    predicted and a random other class: 0.60 for |gradient|, -0.14 for the signed gradient
    (absolute False) and -0.10 for ``grad``; the report says so next to the flag.
    """

    name = "sal"
    signed = False

    def __init__(self, model, absolute: bool = True):
        super().__init__(model)
        if not isinstance(absolute, bool):
            raise ValueError(f"absolute must be True or False, got {absolute!r}")
        self.absolute = absolute
        self.signed = not absolute  # per instance: the option decides
        self.caveats = {"random_logit": UNSIGNED_CLASS_BLIND} if absolute else {}

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
