"""Grad-CAM (Selvaraju et al. 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from explainers._base import Explainer, Explanation, check_batch
from explainers._registry import register


def last_conv2d(model: nn.Module) -> str:
    """Name of the last nn.Conv2d in registration order (normally the last one applied)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("gradcam needs a Conv2d layer; the model has none (pass layer= a module name)")
    return names[-1]


def require_module_hooks(model: torch.nn.Module, method: str) -> None:
    """Methods that hook modules need a plain nn.Module.

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
class GradCAM(Explainer):
    """ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of d logit_target / d A^k. Unsigned.

    layer: name of the module whose output A [B,K,h,w] is used (as in
        ``model.named_modules()``); default the last Conv2d.  The map is upsampled
        bilinearly from h x w to the input size.

    Values are raw: no per-image min-max scaling (pytorch-grad-cam's default), so maps
    stay comparable across images and models.  Cost: 1 forward + 1 backward (down to the
    layer only) per image.
    """

    name = "gradcam"
    signed = False

    def __init__(self, model, layer: str | None = None):
        require_module_hooks(model, "gradcam")
        super().__init__(model)
        if layer is None:
            layer = last_conv2d(model)
        modules = dict(model.named_modules())
        if not isinstance(layer, str) or layer not in modules:
            raise ValueError(f"gradcam: the model has no module named {layer!r}")
        self.layer = layer
        self._module = modules[layer]

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)  # requires grad, so A does even with frozen weights
        activations: list[torch.Tensor] = []

        def keep(module, inputs, output):
            activations.append(output)

        handle = self._module.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                logits = self.model(images)
        finally:
            handle.remove()
        if len(activations) != 1:
            raise ValueError(f"gradcam: layer {self.layer!r} ran {len(activations)} times in one forward; "
                             "it must run exactly once")
        (a,) = activations
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            raise ValueError(f"gradcam: layer {self.layer!r} must output [B,K,h,w], got "
                             f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
        score = logits.gather(1, targets.to(logits.device).long().unsqueeze(1)).sum()
        grads, = torch.autograd.grad(score, a)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * a).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam.float(), size=images.shape[2:], mode="bilinear", align_corners=False)
        return Explanation(cam.squeeze(1))
