"""Saliency explainers for image classifiers: pure PyTorch/NumPy, no pipeline code.

    from saliency_audit.explainers import get_explainer, list_methods
    result = get_explainer("intg", model, n_steps=50).explain(images, targets)
    result.maps  # [B,H,W]

Methods are grouped by family, one file per method (or per small group of variants), each class
registered under its short name: gradient/ (sal, grad, intg, smoothgrad, expected_gradients,
xrai), relevance/ (deeplift, elrp, lrp), cam/ (gradcam and its variants), transformer/ (rollout,
attention_grad, attnlrp, legrad), perturbation/
(occlusion, mask, rise), blackbox/ (lime, anchor, lore, abele) and controls (random, sobel).
core/ holds what they share: the interface, the registry, baselines, target scores, map helpers.
metrics/ holds the quality metrics.
"""
from saliency_audit.explainers.core.base import Explainer, Explanation
from saliency_audit.explainers.core.registry import (asset_options, explainer_class, get_explainer, list_methods,
                                                     method_parameters, register)

# Importing a method module registers it.
from saliency_audit.explainers.gradient import (expected_gradients, integrated_gradients, saliency,  # noqa: E402,F401,I001
                                                smoothgrad, xrai)
from saliency_audit.explainers.relevance import deeplift, lrp  # noqa: E402,F401
from saliency_audit.explainers.cam import gradcam, variants  # noqa: E402,F401
from saliency_audit.explainers.transformer import attention_grad, attnlrp, legrad, rollout  # noqa: E402,F401
from saliency_audit.explainers.perturbation import meaningful_perturbation, occlusion, rise  # noqa: E402,F401
from saliency_audit.explainers.blackbox import abele, anchor, lime, lore  # noqa: E402,F401
from saliency_audit.explainers import controls  # noqa: E402,F401

__all__ = ["Explainer", "Explanation", "asset_options", "explainer_class", "get_explainer", "list_methods",
           "method_parameters", "register"]
