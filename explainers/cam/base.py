"""What every CAM shares (pytorch-grad-cam's BaseCAM): the target layer's search and hooks, the
forward pass that keeps its activations and gradients, the layer's output seen as maps [B,K,h,w]
(a CNN's as it is; a channels-last map and a transformer's patch tokens reshaped, as
pytorch-grad-cam's ``reshape_transform`` recipes do by hand), the upsampling to the input's size."""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from saliency_audit.explainers.core.base import Explainer, Explanation, UnsupportedModel, check_batch

WEIGHTINGS = ("elementwise", "mean")


# The default layer's map has at least MIN_SIDE positions per side: a network's last stage can be 1x1
# on small inputs (ResNet-18 at 28 px: layer2 4x4, layer3 2x2, layer4 1x1), and a 1x1 map upsampled is
# constant. Where the model's convolutions shrink its grid that far, the search steps back to a grid of
# STEP_BACK_SIDE or more (ResNet's last stage at the 224 px it was made for) where there is one: the
# 4x4 grid just before the collapse is too coarse to point at a feature a seventh of the image wide.
# ResNet-18s trained on the planted patch (tests/planted.py) at 28 px, share of maps whose maximum
# is on it, 4x4 layer2 -> 7x7 layer1: gradcampp 0.58-0.60 -> 0.92-1.00, eigencam 0.56-0.69 ->
# 0.88-1.00, scorecam 0.71-0.96 -> 0.98-1.00 (three models).
MIN_SIDE, STEP_BACK_SIDE = 4, 7
# Models whose tokens are out of raster order until their last stage: Hiera "unrolls" them so that each
# query pooling is a reshape, and only its last grid's tokens are patches in row-major order. Known by
# the mask-unit attention that needs it (timm's MaskUnitAttention, transformers' HieraMaskUnitAttention),
# not by the name Hiera: timm's HieraDet (SAM 2's encoder) keeps its tokens [B,H,W,C] at every stage.
UNROLLED = ("MaskUnitAttention",)


def unrolled(model: nn.Module) -> bool:
    return any(type(m).__name__.endswith(UNROLLED) for m in model.modules())


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


@dataclass(frozen=True)
class Grid:
    """Where a layer's output keeps the image's spatial grid, and the map [B,K,h,w] made of it.

    layout: "BCHW" (a CNN's feature map), "BHWC" (channels last: timm's Swin stages, ConvNeXt's
        blocks) or "tokens" ([B,T,K]: a ViT's sequence, HF Swin's [B,h*w,K]), whose first
        ``prefix`` tokens (class, distillation, register tokens) are not on the grid and whose
        other h*w are the patches in row-major order.
    """

    layout: str
    size: tuple[int, int]
    prefix: int = 0

    def maps(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output (or its gradient) as [B,K,h,w]."""
        if self.layout == "BHWC":
            return output.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            return output[:, self.prefix:].reshape(len(output), *self.size, -1).permute(0, 3, 1, 2)
        return output

    def output(self, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of ``maps``: [N,K,h,w] in the layer's layout, prefix tokens taken from ``like``."""
        if self.layout == "BHWC":
            return maps.permute(0, 2, 3, 1)
        if self.layout == "tokens":
            return torch.cat([like[:, :self.prefix], maps.flatten(2).transpose(1, 2)], dim=1)
        return maps

    @property
    def reshape(self) -> str | None:
        """How ``maps`` reads the output, for the manifest; None when it takes it as it is."""
        if self.layout == "BHWC":
            return "BHWC -> BCHW"
        if self.layout == "tokens":
            return f"tokens{f'[{self.prefix}:]' if self.prefix else ''} -> {self.size[0]}x{self.size[1]} grid"
        return None


def grid_of(t, batch: int, grids: set[tuple[int, int]], named: bool = False) -> Grid | None:
    """The grid a module's output keeps, if any. ``grids`` are the spatial sizes the image can have
    inside the model: the input's size divided by an integer, and every Conv2d output's size.

    [B,K,h,w] with (h,w) a grid size is read as it is; else [B,h,w,K] with (h,w) a grid size is
    channels last. [B,T,K] holds tokens: the largest grid h*w <= T with fewer prefix tokens T-h*w
    than patches (a class token and registers, never a second grid). A layer named by the user
    (``named``) that is 4-D and neither is taken as [B,K,h,w], as before tokens were read."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (3, 4) or len(t) != batch:
        return None
    if t.dim() == 4:
        if tuple(t.shape[2:]) in grids or (named and tuple(t.shape[1:3]) not in grids):
            return Grid("BCHW", tuple(t.shape[2:]))
        return Grid("BHWC", tuple(t.shape[1:3])) if tuple(t.shape[1:3]) in grids else None
    tokens, channels = t.shape[1:]
    fits = [(h, w) for h, w in grids if 0 <= tokens - h * w < h * w]
    if channels < 2 or not fits:
        return None
    h, w = max(fits, key=lambda size: size[0] * size[1])
    return Grid("tokens", (h, w), tokens - h * w)


@dataclass
class Call:
    """One module's run in a forward: when it started and finished on one clock (a call made inside
    another lies between the other's start and finish), its first tensor argument and its output
    (a tuple's first element: a transformer block's hidden states)."""

    name: str
    module: nn.Module
    start: int
    finish: int
    input: torch.Tensor | None
    output: torch.Tensor | None


def first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def replacing_first(value, tensor: torch.Tensor):
    """``value`` (a module's output) with ``tensor`` in place of its first tensor."""
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)([tensor, *value[1:]]) if isinstance(value, list) else (tensor, *value[1:])


def record(modules: dict[str, nn.Module], run) -> tuple[object, list[Call]]:
    """``run()``'s result and every call of ``modules`` in it, in the order they finished."""
    calls: list[Call] = []
    running: list[tuple[int, torch.Tensor | None]] = []
    clock = itertools.count()

    def started(args, kwargs):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        running.append((next(clock), tensors[0] if tensors else None))

    def finished(name, module, output):
        start, first = running.pop()  # calls nest, so the last one started is the one finishing
        calls.append(Call(name, module, start, next(clock), first, first_tensor(output)))

    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(lambda m, a, k: started(a, k), with_kwargs=True))
            handles.append(m.register_forward_hook(lambda m, i, o, name=name: finished(name, m, o)))
        return run(), calls
    finally:
        for handle in handles:
            handle.remove()


def owns_weights(module: nn.Module) -> bool:
    return any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))


def attention_weights(t: torch.Tensor) -> bool:
    """[B,heads,T,T] whose rows are distributions: attention, not a feature map, even where T x T is
    one of the image's grid sizes (CoAtNet's 4x4 windows, 16 tokens, at 128 px, whose grids include 16x16)."""
    if t.dim() != 4 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2:
        return False
    with torch.no_grad():
        return bool(t.min() >= 0) and bool(torch.allclose(t.sum(-1).float(), torch.ones(()), atol=1e-3))


def pooled(call: Call) -> bool:
    """A layer on globally pooled features [B,C,1,1] (squeeze-excitation's gate): it does not shrink the grid."""
    return isinstance(call.input, torch.Tensor) and call.input.dim() == 4 and tuple(call.input.shape[2:]) == (1, 1)


def residual_block(call: Call) -> bool:
    """A container of layers with weights (none of its own) that keeps its input's shape."""
    module = call.module
    return (not owns_weights(module) and any(owns_weights(m) for m in module.modules())
            and isinstance(call.input, torch.Tensor) and call.output is not None
            and call.input.shape == call.output.shape)


def choose_layer(calls: list[Call], live: dict[int, Grid], min_side: int = MIN_SIDE) -> int | None:
    """The default layer: the index in ``calls`` of the last representation of the image's grid
    that the target still reads, before the grid is pooled away. ``live``: the calls whose output
    keeps a grid with a non-zero gradient from the target at some position of it.

    1. The final resolution: the grid size of the last live output of a module with weights (the
       last convolution of a CNN, a ViT's attention projections, Swin's last norm), at least
       ``min_side`` per side. Pooling after it (VGG's pool5, a Keras CNN's last max pool) is
       part of pooling the grid away, as in the Grad-CAM paper (relu5_3, not pool5).
    2. The last live output at that resolution, from a module that ran once (ResNet's shared
       ReLU runs twice: its block's output is taken, i.e. the stage's) and not before the first
       module with weights (an input normalisation is not a feature): a CNN's last activation or
       block (relu5_3; layer4, as pytorch-grad-cam recommends), Swin's last norm, ConvNeXt's last
       stage; where the activation is applied functionally, the convolution itself.
    3. Where that output is computed inside a module that collapses the grid (its input is live,
       its output not: a ViT's last block and its attention, whose patch tokens reach the class
       token only as keys and values, so that its output's patch tokens get no gradient), the
       last live input of a module that collapses it instead: the input of the last attention,
       i.e. the last block's first norm, as pytorch-grad-cam advises, not a key or value
       projection inside the attention, whatever the blocks and projections are called.

    Where the model's own final grid has fewer than ``min_side`` positions per side, step 1 steps
    back to the last grid that has them; there the stage's output is taken, not one computed inside
    a module that takes that grid and returns a coarser one: the next stage's first steps (a
    bottleneck's 1x1 reduction before its strided convolution, ConvNeXt's norm before its
    downsampling; CAMBase._search takes that norm's output where the stage's output is read only
    through it, since every gradient CAM vanishes there).
    """
    every = live
    live = {i: grid for i, grid in live.items() if min(grid.size) >= min_side}
    learned = [i for i in live if owns_weights(calls[i].module)]
    if not learned:
        return None
    size, runs = live[max(learned)].size, Counter(call.name for call in calls)
    allowed = [i for i in live if i >= min(learned) and runs[calls[i].name] == 1]
    if size != every[max(i for i in every if owns_weights(calls[i].module))].size:  # stepped back
        sizes = {id(calls[i].output): grid.size for i, grid in every.items()}
        next_stage = [c for c in calls if sizes.get(id(c.input)) == size and sizes.get(id(c.output), size) != size]
        # ... but a residual block there (a container whose output is its input's shape: LeViT's stage
        # runs its blocks, then its downsampling, as one module) is the stage's representation
        allowed = [i for i in allowed if residual_block(calls[i])
                   or not any(c.start < calls[i].start and calls[i].finish < c.finish for c in next_stage)]
    candidates = [i for i in allowed if live[i].size == size]
    if not candidates:
        return None
    last = max(candidates)
    live_outputs = {id(calls[i].output) for i in live}
    collapsing = [c for c in calls if id(c.input) in live_outputs and c.output is not None
                  and id(c.output) not in live_outputs]
    if not any(c.start < calls[last].start and calls[last].finish < c.finish for c in collapsing):
        return last
    # at any size: CvT's last attention reads its tokens (14x14 at 224 px) through key and value
    # projections strided to 7x7, which set the final resolution above, yet are not the tokens' grid
    inputs = {id(c.input) for c in collapsing}
    return max((i for i in allowed if id(calls[i].output) in inputs), default=last)


class CAMBase(Explainer):
    """What every CAM shares: the ``layer`` option and its search, a forward that keeps the layer's
    output A as maps [B,K,h,w], forwards with that output replaced (the perturbation CAMs), and
    the bilinear upsampling of a [B,h,w] map to the input. Subclasses compute the map. Unsigned.

    The layer, named or found (choose_layer), is settled once per input size by one forward of
    the first image with every module hooked (and, to find it, one backward); ``layer_used``
    names it and ``layer_reshape`` says how its output becomes maps ("tokens[1:] -> 14x14 grid",
    "BHWC -> BCHW"; None for a CNN's), both in the run's manifest.

    Every CAM hooks a module, so all of them need an nn.Module with hooks, never a black box:
    the forward-only ones (scorecam, ablationcam, eigencam) still declare ``needs_gradients``,
    which is what keeps ONNX files and endpoints from being admitted to them in preflight."""

    signed = False
    compiles = False  # hooks a layer

    def __init__(self, model, layer: str | None = None):
        require_module_hooks(model, self.name)
        super().__init__(model)
        if layer is not None and (not isinstance(layer, str) or layer not in dict(model.named_modules())):
            raise ValueError(f"{self.name}: the model has no module named {layer!r}")
        self.layer = layer
        self.layer_used: str | None = layer
        self.layer_reshape: str | None = None
        self._layers: dict[tuple[int, ...], tuple[str, Grid]] = {}  # per input size (C,H,W)

    def _find(self, images: torch.Tensor, targets: torch.Tensor) -> Grid:
        """Settle the layer for this input size (once); set layer_used and layer_reshape."""
        key = tuple(images.shape[1:])
        if key not in self._layers:
            self._layers[key] = self._search(images[:1].detach(), targets[:1].to(images.device).long())
        self.layer_used, grid = self._layers[key]
        self.layer_reshape = grid.reshape
        return grid

    def _search(self, image: torch.Tensor, target: torch.Tensor) -> tuple[str, Grid]:
        # the image twice: a batch of 2 tells outputs that carry the batch from those that do not
        # (a position bias [1,heads,n,n]); requires grad so outputs do even with frozen weights
        probe = torch.cat([image, image]).requires_grad_(self.layer is None)
        with torch.set_grad_enabled(self.layer is None):
            logits, calls = record(hookable(self.model), lambda: self.model(probe))
        height, width = probe.shape[2:]
        grids = {(height // s, width // s) for s in range(1, max(height, width) + 1) if height % s == width % s == 0}
        grids |= {tuple(c.output.shape[2:]) for c in calls if isinstance(c.module, nn.Conv2d) and c.output is not None}
        if self.layer is not None:
            runs = [c for c in calls if c.name == self.layer]
            if len(runs) != 1:
                raise ValueError(f"{self.name}: layer {self.layer!r} ran {len(runs)} times in one forward; "
                                 "it must run exactly once")
            grid = grid_of(runs[0].output, 2, grids, named=True)
            if grid is not None and unrolled(self.model):  # (only then: it walks every call's output)
                final = [g for c in calls if owns_weights(c.module) and (g := grid_of(c.output, 2, grids)) is not None]
                if final and grid.size != final[-1].size:
                    raise ValueError(f"{self.name}: layer {self.layer!r} is a {grid.size[0]}x{grid.size[1]} grid of "
                                     "Hiera's tokens, which are in raster order only at its last stage "
                                     f"({final[-1].size[0]}x{final[-1].size[1]}): name a layer there")
            if grid is None:
                out = runs[0].output
                raise ValueError(f"{self.name}: layer {self.layer!r} must output [B,K,h,w], [B,h,w,K] or patch "
                                 f"tokens [B,T,K] over the image's grid, got "
                                 f"{tuple(out.shape) if out is not None else 'no tensor'}")
            return self.layer, grid
        gridded = {i: grid for i, c in enumerate(calls)
                   if (grid := grid_of(c.output, 2, grids)) is not None and not attention_weights(c.output)}
        tensors = {id(calls[i].output): (calls[i].output, grid) for i, grid in gridded.items()
                   if calls[i].output.requires_grad}
        score = logits.gather(1, target.repeat(2)[:, None]).sum()
        grads = torch.autograd.grad(score, [t for t, _ in tensors.values()], allow_unused=True) if tensors else ()
        reached = {key for (key, (_, grid)), g in zip(tensors.items(), grads)
                   if g is not None and bool(grid.maps(g).ne(0).any())}
        live = {i: grid for i, grid in gridded.items() if id(calls[i].output) in reached}
        # outputs where gradient x activation, summed over channels, is 0 at every position: the target
        # reads them only through a norm that divides out each position's scale (Euler: y(c a) = y(a)
        # gives sum_k a_k dy/da_k = 0), so every gradient CAM there is float noise
        vanishing = set()
        for (key, (t, grid)), g in zip(tensors.items(), grads):
            if key in reached:
                product = self._wide(grid.maps(g)) * self._wide(grid.maps(t.detach()))
                scale = product.abs().sum(1).amax()
                if scale > 0 and product.sum(1).abs().amax() <= 1e-4 * scale:
                    vanishing.add(key)
        # where the model's own convolutions shrink its grid under MIN_SIDE, the last grid of
        # STEP_BACK_SIDE or more, else of MIN_SIDE (a head's norm on the pooled 1x1 features does not
        # count); a small input may leave neither: then the last live one of any size
        collapsed = any(isinstance(calls[i].module, nn.Conv2d) and min(grid.size) < MIN_SIDE and not pooled(calls[i])
                        for i, grid in live.items())
        sides = (STEP_BACK_SIDE, MIN_SIDE, 1) if collapsed else (MIN_SIDE, 1)
        if unrolled(self.model):  # a step back would read unrolled tokens as a grid: scrambled maps
            sides = (1,)
        chosen = next((i for side in sides if (i := choose_layer(calls, live, side)) is not None), None)
        if chosen is None:
            runs = Counter(c.name for c in calls)
            shared = [f"{calls[i].name!r} keeps it but ran {runs[calls[i].name]} times in one forward"
                      for i in live if runs[calls[i].name] > 1][-1:]
            raise UnsupportedModel(self.name, "no layer's output keeps the image's spatial grid ([B,K,h,w], "
                                   "[B,h,w,K] or patch tokens [B,T,K]) with a gradient from the target"
                                   + "".join(f" ({s})" for s in shared) + "; pass layer= a module name, or use a "
                                   "method that needs no layer (sal, intg, occlusion)")
        # A ConvNeXt stage's output feeds only the next stage's downsampling LayerNorm: where a step back
        # lands on it (a 4-stage ConvNeXt at 32 or 64 px) gradcam's maps were at most 6e-8, |sum_k g a|
        # 3e-7 of sum_k |g a| per position. The norm's output, the same grid as the next stage reads it,
        # is taken instead, as a ViT's last block's first norm is rather than the block's input.
        if id(calls[chosen].output) in vanishing:
            chosen = next((i for i in live if calls[i].input is calls[chosen].output and owns_weights(calls[i].module)
                           and live[i].size == live[chosen].size and id(calls[i].output) not in vanishing), chosen)
        return calls[chosen].name, live[chosen]

    def _hooked(self, hooked: dict[str, nn.Module], hook, images: torch.Tensor, grad: bool) -> torch.Tensor:
        """The model's logits with ``hook`` on the ``hooked`` modules for one forward, removed after."""
        handles = [m.register_forward_hook(lambda m, i, o, name=name: hook(name, m, o)) for name, m in hooked.items()]
        try:
            with torch.set_grad_enabled(grad):
                return self.model(images)
        finally:
            for handle in handles:
                handle.remove()

    def _forward(self, images: torch.Tensor, targets: torch.Tensor,
                 grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """Logits, the layer's output as the layer gives it, and its grid, from one hooked forward."""
        grid = self._find(images, targets)
        outputs = []
        logits = self._hooked({self.layer_used: dict(self.model.named_modules())[self.layer_used]},
                              lambda name, m, o: outputs.append(first_tensor(o)), images, grad)
        if len(outputs) != 1:
            raise ValueError(f"{self.name}: layer {self.layer_used!r} ran {len(outputs)} times in one forward; "
                             "it must run exactly once")
        return logits, outputs[0], grid

    @staticmethod
    def _wide(a: torch.Tensor) -> torch.Tensor:
        """A layer's output (or its gradient) in at least float32: under autocast (--precision) it is
        bfloat16 or float16, and the map's sums over channels and positions must not be."""
        return a.float() if a.is_floating_point() and torch.finfo(a.dtype).bits < 32 else a

    def _forward_replacing(self, images: torch.Tensor, maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Logits [N,classes] of ``images`` [N,C,H,W] with the layer found by the last _forward
        outputting ``maps`` [N,K,h,w] instead of its own output, put back in the layer's layout
        (prefix tokens from ``like``, the layer's own output for these images). No gradients."""
        replacement = self._layers[tuple(images.shape[1:])][1].output(maps.to(like.dtype), like)
        return self._hooked({self.layer_used: dict(self.model.named_modules())[self.layer_used]},
                            lambda name, m, o: replacing_first(o, replacement), images, grad=False)

    @staticmethod
    def _upsample(cam: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """[B,h,w] -> [B,H,W], bilinearly (pixel centres aligned, as cv2.resize in pytorch-grad-cam)."""
        return F.interpolate(cam[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


class GradientCAM(CAMBase):
    """A CAM from the layer's output A and the target logit's gradient dA at it (both as maps
    [B,K,h,w]): ReLU(_cam(A, dA)) upsampled. Cost: 1 forward + 1 backward (down to the layer only)."""

    def _cam(self, a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The map [B,h,w] before its ReLU."""
        raise NotImplementedError

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)  # requires grad, so A does even with frozen weights
        logits, a, grid = self._forward(images, targets)
        score = logits.gather(1, targets.to(logits.device).long().unsqueeze(1)).sum()
        grads, = torch.autograd.grad(score, a)
        cam = torch.relu(self._cam(self._wide(grid.maps(a.detach())), self._wide(grid.maps(grads))))
        return Explanation(self._upsample(cam, images.shape[2:]))
