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
import importlib
import importlib.util

# The names below load on first use (PEP 562), not with the package: importing any submodule runs
# this file, and the command line imports core.paths (torch-free) to parse, where the registry and
# the methods would bring in torch.
_FROM = {"Explainer": "core.base", "Explanation": "core.base",
         **dict.fromkeys(("asset_options", "explainer_class", "get_explainer", "list_methods", "method_parameters",
                          "register"), "core.registry")}


def __getattr__(name: str):
    if name not in _FROM:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a subpackage as an attribute (E.cam)
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # saliency_audit's modules, not f"{__name__}...": from the repository root this file is also the
    # top-level package explainers (the contract's import form), whose own copy of the registry
    # would stay empty
    value = getattr(importlib.import_module(f"saliency_audit.explainers.{_FROM[name]}"), name)
    globals()[name] = value  # found here from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM})


def _import_methods() -> None:
    """Import every method module: importing one registers it. The registry calls this on its first
    look-up (core.registry._methods), so the registry is complete however it was imported."""
    from saliency_audit.explainers.gradient import (expected_gradients, integrated_gradients, saliency,  # noqa: F401,I001
                                                    smoothgrad, xrai)
    from saliency_audit.explainers.relevance import deeplift, lrp  # noqa: F401
    from saliency_audit.explainers.cam import gradcam, variants  # noqa: F401
    from saliency_audit.explainers.transformer import attention_grad, attnlrp, legrad, rollout  # noqa: F401
    from saliency_audit.explainers.perturbation import meaningful_perturbation, occlusion, rise  # noqa: F401
    from saliency_audit.explainers.blackbox import abele, anchor, lime, lore  # noqa: F401
    from saliency_audit.explainers import controls  # noqa: F401


__all__ = ["Explainer", "Explanation", "asset_options", "explainer_class", "get_explainer", "list_methods",
           "method_parameters", "register"]
