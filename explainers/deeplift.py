"""DeepLIFT with the Rescale rule (Shrikumar, Greenside, Kundaje 2017)."""
from __future__ import annotations

import warnings

import torch
from captum.attr import DeepLift as _CaptumDeepLift

from explainers._base import Explainer, Explanation, check_batch
from explainers._registry import register
from explainers.baselines import make_baseline
from explainers.gradient import sum_channels


def require_module_hooks(model: torch.nn.Module, method: str) -> None:
    """Methods that rewrite the backward pass through module hooks need a plain nn.Module.

    TorchScript modules do not run hooks, and a torch.export graph has no activation
    modules to hook, so the method would silently degrade to a plain gradient.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"{method} needs an nn.Module with hooks; TorchScript models do not support them. "
                         "Load the model as module:Callable with --weights instead")
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError(f"{method} needs an nn.Module with activation modules; a torch.export graph has none. "
                         "Load the model as module:Callable with --weights instead")


@register
class DeepLift(Explainer):
    """DeepLIFT-Rescale against a baseline (default black). Signed.

    One forward on the baseline, one on the image, one modified backward. Sums to
    f(x) - f(baseline) (summation-to-delta); ``convergence_delta`` records the gap.
    """

    name = "deeplift"
    extras = {"convergence_delta": "float32"}

    def __init__(self, model, baseline: float | str = 0.0):
        require_module_hooks(model, "deeplift")
        super().__init__(model)
        self.baseline = baseline

    def passes(self):
        return {"forward": 2, "backward": 1}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        with warnings.catch_warnings():
            # Captum announces on every call that it hooks the activations (and removes the hooks).
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
            attributions, delta = _CaptumDeepLift(self.model).attribute(
                images, baselines=make_baseline(self.baseline, images), target=targets,
                return_convergence_delta=True,
            )
        return Explanation(sum_channels(attributions.detach()),
                           {"convergence_delta": delta.detach().float()})
