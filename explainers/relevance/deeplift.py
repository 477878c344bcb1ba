"""DeepLIFT with the Rescale rule (Shrikumar, Greenside, Kundaje 2017), over a torch.fx graph.

DeepLIFT explains the difference f(x) - f(x0) from a reference x0 with multipliers that
replace gradients: linear ops keep their gradient, an elementwise activation y = g(z) gets
the secant slope (g(z) - g(z0)) / (z - z0) (the Rescale rule; the gradient where z = z0),
and max pooling keeps its gradient (the winner at x takes the multiplier), as in the
authors' code and DeepExplain.  The chain of multipliers times (x - x0) then sums to
f(x) - f(x0) for the target ("summation to delta"), up to what max pooling moves where
x and x0 have different winners.

Captum's DeepLift finds the activations through module hooks and explains the image and
the reference as one doubled batch, backward included.  Here the model's graph is traced
once (the same tracing as elrp, :mod:`saliency_audit.explainers.relevance.graph`), so functional activations
(``F.relu``) get the rule too, and a reference shared by the whole batch (a constant) is
run once, for one image: an explanation costs one forward and one backward of the batch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from saliency_audit.explainers.core.base import Explainer, Explanation, UnsupportedModel, check_batch
from saliency_audit.explainers.core.baselines import make_baseline
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.relevance.graph import TracedGraphs, call_node, check_model, input_nodes

_TINY = 1e-10  # |z - z0| below this counts as no difference: use the gradient (as Captum does)


def _local_grad(fn: Callable, z: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product of ``fn`` at ``z`` with ``grad_out``."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf), leaf, grad_out)
    return grad


def _secant(z, y, z0, y0, fn) -> torch.Tensor:
    """(y - y0) / (z - z0) for any elementwise activation, its derivative where z = z0."""
    dz = z - z0
    flat = dz == 0
    slope = (y - y0).div_(dz)
    if flat.any():
        slope = torch.where(flat, _local_grad(fn, z, torch.ones_like(y)), slope)
    return slope


def _relu_secant(z, y, z0, y0, fn) -> torch.Tensor:
    """The ReLU secant as the share of [min(z, z0), max(z, z0)] above 0, in five cheap passes.

    hi / |z - z0| clamped to [0, 1]: 1 if both are positive, 0 if both are not, the share
    in between; where z = z0 it is +-inf (or 0/0 at 0), which the clamp and nan_to_num turn
    into ReLU's derivative.  Elementwise passes dominate DeepLIFT's cost on small CNNs, so
    the general form (with a where and a derivative) is worth avoiding for the common case.
    """
    return torch.maximum(z, z0).div_((z - z0).abs_()).clamp_(0.0, 1.0).nan_to_num_(0.0)


class _RescaleActivation(torch.autograd.Function):
    """y = g(z) forward; backward multiplies by the secant (g(z) - g(z0)) / (z - z0)."""

    @staticmethod
    def forward(ctx, z, z0, y0, fn, slope):
        y = fn(z)
        ctx.fn, ctx.slope = fn, slope
        ctx.save_for_backward(z, y, z0, y0)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        z, y, z0, y0 = ctx.saved_tensors
        return ctx.slope(z, y, z0, y0, ctx.fn).mul_(grad_out), None, None, None, None


def _activation_input(node: fx.Node, plan: dict[fx.Node, str]) -> fx.Node:
    return [n for n in input_nodes(node) if plan.get(n) not in (None, "shape")][0]


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target == "relu"


def _run(gm: fx.GraphModule, plan: dict[fx.Node, str], x: torch.Tensor,
         reference: dict[fx.Node, Any] | None) -> tuple[torch.Tensor, dict[fx.Node, Any]]:
    """Evaluate the graph on ``x``; given ``reference`` (every node's value at x0), with
    DeepLIFT's rules in the backward pass.  Returns the output and every node's value."""
    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x if plan.get(node) == "input" else (node.args[0] if node.args else None)
        elif node.op == "get_attr":
            value = gm
            for atom in node.target.split("."):
                value = getattr(value, atom)
            env[node] = value
        elif node.op == "output":
            return env[node.args[0]], env
        else:
            rule = plan.get(node)
            if reference is not None and rule == "pass":
                z = _activation_input(node, plan)

                def fn(t, node=node, z=z):
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: t if n is z else env[n])
                    return call_node(node, gm, args, kwargs)

                slope = _relu_secant if _is_relu(node, gm) else _secant
                env[node] = _RescaleActivation.apply(env[z], reference[z], reference[node], fn, slope)
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
                env[node] = call_node(node, gm, args, kwargs)
    raise ValueError("deeplift: the traced model has no output")


@register
class DeepLift(Explainer):
    """DeepLIFT-Rescale against a baseline (default black). Signed.

    baseline: a constant in model-input space (one reference forward for the whole
        batch), "zeros", or "mean" (each image's channel means: one reference per image).

    One forward on the reference, one on the images, one backward. The map sums to
    f(x) - f(baseline) for the target logit, up to what max pooling moves where x and the
    reference have different winners; ``convergence_delta`` records
    the gap.  The model must be traceable by torch.fx (see elrp); anything else is refused
    before any work (UnsupportedModel, naming the layers). LayerNorm mixes a position's
    channels nonlinearly and has no Rescale multiplier, so ConvNeXt and transformers are refused
    (intg explains them, with the same summation to f(x) - f(baseline)).
    """

    name = "deeplift"
    extras = {"convergence_delta": "float32"}
    autocast = compiles = False  # its rules rerun the model's FX graph: float32, eager

    def __init__(self, model, baseline: float | str = 0.0):
        super().__init__(model)
        check_model(model, "deeplift")
        make_baseline(baseline, torch.zeros(1, 1, 1, 1))  # reject a bad spec at setup
        self.baseline = baseline
        self.graph = TracedGraphs(model, "deeplift")

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        x = check_batch(images, targets)
        gm, plan = self.graph(x)
        shared = not isinstance(self.baseline, str) or self.baseline == "zeros"
        x0 = make_baseline(self.baseline, x[:1] if shared else x).detach()
        with torch.no_grad():
            ref_logits, reference = _run(gm, plan, x0, None)
        with torch.enable_grad():
            logits, _ = _run(gm, plan, x, reference)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise UnsupportedModel("deeplift", "it needs a model that returns one logits tensor [B,K]")
            index = targets.to(logits.device).long().unsqueeze(1)
            chosen = logits.gather(1, index).squeeze(1)
            (grad,) = torch.autograd.grad(chosen.sum(), x)
        attributions = (x.detach() - x0) * grad
        expected = chosen.detach() - ref_logits.expand_as(logits).gather(1, index).squeeze(1)
        delta = attributions.flatten(1).sum(1) - expected
        return Explanation(sum_channels(attributions), {"convergence_delta": delta.float()})
