"""What every CAM shares (pytorch-grad-cam's BaseCAM): the target layer's search and hooks, the
forward pass that keeps its activations and gradients, the upsampling to the input's size."""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch

WEIGHTINGS = ("elementwise", "mean")


# The default layer's map must have at least this many positions per side: a network's last
# stage can be 1x1 on small inputs (ResNet-18 at 32 px), and a 1x1 map upsampled is constant.
MIN_SIDE = 4


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


def hookable(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule that takes a forward hook: not the model itself, and nothing inside a
    TorchScript submodule (a scripted normalisation block, say), which refuses hooks."""
    scripted = [name for name, m in model.named_modules() if name and isinstance(m, torch.jit.ScriptModule)]
    return {name: m for name, m in model.named_modules()
            if name and not any(name == s or name.startswith(s + ".") for s in scripted)}


Call = tuple[str, nn.Module, object]  # (module name, module, output) in the order forwards finish


def activated_block_output(calls: list[Call], method: str = "gradcam") -> Call:
    """The default layer: the last conv block's activated output, before it is pooled or flattened.

    From the last Conv2d to finish, follow the modules that finish after it while their output
    keeps its batch and spatial size (its ReLU, BatchNorm, the block or stage holding it) and take
    the last one that ran once; stop at the first that changes the size (pooling, flatten, the
    head). Convs whose output is smaller than MIN_SIDE per side are passed over for the last one
    that is not (ResNet-18 on 32 px images: layer2, 4x4, since layer3 and layer4 are 2x2 and
    1x1); if none is, the last conv is taken. Keras-style and VGG-style CNNs give the ReLU after the last conv, as in the Grad-CAM
    paper (relu5_3) and Keras's tutorial; ResNets give the last stage (layer4), as pytorch-grad-cam
    recommends. Modules applied more than once (ResNet's shared ReLU) are skipped. Where no such
    module exists (an activation applied functionally) the conv itself is taken.
    """
    convs = [i for i, (_, module, _) in enumerate(calls) if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{method} needs a Conv2d layer; the model ran none (pass layer= a module name)")
    counts = Counter(name for name, _, _ in calls)
    wide = [i for i in convs if min(calls[i][2].shape[2:]) >= MIN_SIDE]
    chosen = (wide or convs)[-1]
    shape = calls[chosen][2].shape
    for i in range(chosen + 1, len(calls)):
        name, _, output = calls[i]
        if not (isinstance(output, torch.Tensor) and output.dim() == 4
                and output.shape[0] == shape[0] and output.shape[2:] == shape[2:]):
            break
        if counts[name] == 1:
            chosen = i
    return calls[chosen]


class CAMBase(Explainer):
    """What every CAM shares: the ``layer`` option, one hooked forward that finds the layer and
    keeps its output A [B,K,h,w], forwards with that output replaced (the perturbation CAMs), and
    the bilinear upsampling of a [B,h,w] map to the input. Subclasses compute the map. Unsigned.

    Every CAM hooks a module, so all of them need an nn.Module with hooks, never a black box:
    the forward-only ones (scorecam, ablationcam, eigencam) still declare ``needs_gradients``,
    which is what keeps ONNX files and endpoints from being admitted to them in preflight."""

    signed = False

    def __init__(self, model, layer: str | None = None):
        require_module_hooks(model, self.name)
        super().__init__(model)
        if layer is not None and (not isinstance(layer, str) or layer not in dict(model.named_modules())):
            raise ValueError(f"{self.name}: the model has no module named {layer!r}")
        if layer is None and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            raise ValueError(f"{self.name} needs a Conv2d layer; the model has none (pass layer= a module name)")
        self.layer = layer
        self.layer_used: str | None = layer

    def _hooked(self, hooked: dict[str, nn.Module], hook, images: torch.Tensor, grad: bool) -> torch.Tensor:
        """The model's logits with ``hook`` on the ``hooked`` modules for one forward, removed after."""
        handles = [m.register_forward_hook(lambda m, i, o, name=name: hook(name, m, o)) for name, m in hooked.items()]
        try:
            with torch.set_grad_enabled(grad):
                return self.model(images)
        finally:
            for handle in handles:
                handle.remove()

    def _forward(self, images: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, str, torch.Tensor]:
        """Logits, and the chosen layer's name and output, from one hooked forward."""
        modules = dict(self.model.named_modules())
        hooked = {self.layer: modules[self.layer]} if self.layer is not None else hookable(self.model)
        calls: list[Call] = []
        logits = self._hooked(hooked, lambda *call: calls.append(call), images, grad)
        if self.layer is None:
            name, _, a = activated_block_output(calls, self.name)
        else:
            name, a = self.layer, calls[0][2] if calls else None
        runs = sum(1 for call in calls if call[0] == name)
        if runs != 1:
            raise ValueError(f"{self.name}: layer {name!r} ran {runs} times in one forward; it must run exactly once")
        if not isinstance(a, torch.Tensor) or a.dim() != 4:
            raise ValueError(f"{self.name}: layer {name!r} must output [B,K,h,w], got "
                             f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
        return logits, name, a

    def _forward_replacing(self, images: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
        """Logits [N,classes] of ``images`` [N,C,H,W] with the layer found by the last _forward
        outputting ``replacement`` [N,K,h,w] instead of its own output. No gradients."""
        return self._hooked({self.layer_used: dict(self.model.named_modules())[self.layer_used]},
                            lambda name, m, o: replacement, images, grad=False)

    @staticmethod
    def _upsample(cam: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """[B,h,w] -> [B,H,W], bilinearly (pixel centres aligned, as cv2.resize in pytorch-grad-cam)."""
        return F.interpolate(cam[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class GradientCAM(CAMBase):
    """A CAM from the layer's output A and the target logit's gradient dA at it:
    ReLU(_cam(A, dA)) upsampled. Cost: 1 forward + 1 backward (down to the layer only)."""

    def _cam(self, a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The map [B,h,w] before its ReLU."""
        raise NotImplementedError

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)  # requires grad, so A does even with frozen weights
        logits, self.layer_used, a = self._forward(images)
        score = logits.gather(1, targets.to(logits.device).long().unsqueeze(1)).sum()
        grads, = torch.autograd.grad(score, a)
        cam = torch.relu(self._cam(a.detach(), grads))
        return Explanation(self._upsample(cam, images.shape[2:]))
