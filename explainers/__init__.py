"""Saliency explainers for image classifiers: pure PyTorch/NumPy, no pipeline code.

    from explainers import get_explainer, list_methods
    result = get_explainer("intg", model, n_steps=50).explain(images, targets)
    result.maps  # [B,H,W]
"""
from explainers._base import Explainer, Explanation
from explainers._registry import explainer_class, get_explainer, list_methods, method_parameters, register

# Importing a method module registers it.
from explainers import gradient, integrated_gradients, deeplift  # noqa: E402,F401
from explainers import lrp, occlusion, meaningful_perturbation, smoothgrad, gradcam, cams  # noqa: E402,F401
from explainers import lime, anchor, lore, abele  # noqa: E402,F401
from explainers import rise, expected_gradients, controls, xrai  # noqa: E402,F401

__all__ = ["Explainer", "Explanation", "explainer_class", "get_explainer", "list_methods",
           "method_parameters", "register"]
