"""Epsilon-LRP (Bach et al. 2015) over a torch.fx graph of the model.

Layer-wise relevance propagation starts from the target logit and moves it down the
network layer by layer, so that (up to biases and epsilon) the relevance of the
input pixels sums to the logit.  Captum's ``LRP`` attaches rules to a fixed list of
module types through hooks, so functional calls (``out += identity``, ``F.relu``,
``x.view(...)``) and layers outside that list break it.  Here the model is traced
into a graph once per input shape and every node gets one of four rules:

``eps``    ops that are affine in their activation inputs (Conv*, Linear, BatchNorm
           not folded, average and adaptive average pooling, additions, subtraction,
           scaling by a constant, mean/sum): the epsilon rule
           R_i = sum_j x_i * dz_j/dx_i * R_j / (z_j + eps * sign(z_j)),
           i.e. z_ij / z_j for linear layers and each summand's share for additions.
``move``   ops that only move values (reshape, flatten, permute, getitem, cat, Dropout
           and Identity in eval) and max pooling (winner takes all): relevance goes
           where the value came from (the vector-Jacobian product with R).
``pass``   elementwise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid,
           ...): relevance passes unchanged.  In relevance terms this is DeepExplain's
           ratio rule output / (input + eps*sign(input)) applied to the gradient.
``shape``  ops on sizes (``x.size(0)``, ``x.shape``): no relevance.

BatchNorm that directly follows a Conv/Linear is folded into it (on a copy), which
leaves the outputs unchanged and makes the pair one linear layer, as LRP assumes.

For ReLU networks, epsilon-LRP equals gradient x input as epsilon -> 0 (Ancona et al.
2018); with other activations and with a larger epsilon it differs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from explainers._base import Explainer, Explanation, check_batch
from explainers._graph import TracedGraphs, call_node, check_model, input_nodes, trace_model
from explainers._registry import register
from explainers.gradient import sum_channels


def lrp_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The traced graph elrp propagates over (see :func:`explainers._graph.trace_model`)."""
    return trace_model(model, example, "elrp")


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    # z + eps * sign(z), with sign(+0) = +1 so that no denominator is exactly 0; copysign
    # and an in-place add take two passes over z where where(z >= 0, ...) takes four
    denominator = torch.copysign(torch.tensor(eps, dtype=z.dtype, device=z.device), z)
    return denominator.add_(z)


def propagate(gm: fx.GraphModule, plan: dict[fx.Node, str], x: torch.Tensor, targets: torch.Tensor,
              epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one relevance pass over ``gm``: relevance [B,C,H,W] and target logits [B]."""
    env: dict[fx.Node, Any] = {}
    local: dict[fx.Node, tuple[list[fx.Node], list[torch.Tensor], torch.Tensor]] = {}
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x if plan.get(node) == "input" else (node.args[0] if node.args else None)
            continue
        if node.op == "get_attr":
            value = gm
            for atom in node.target.split("."):
                value = getattr(value, atom)
            env[node] = value
            continue
        if node.op == "output":
            output = node.args[0]
            break
        rule = plan.get(node)
        if rule in ("eps", "move"):
            # Each node gets leaf copies of its activation inputs, so its local
            # vector-Jacobian product can be taken on its own in the relevance pass.
            inputs = [n for n in dict.fromkeys(input_nodes(node))
                      if plan.get(n) not in (None, "shape") and isinstance(env[n], torch.Tensor)
                      and env[n].is_floating_point()]
            leaves = {n: env[n].detach().requires_grad_(True) for n in inputs}
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: leaves.get(n, env[n]))
            with torch.enable_grad():
                out = call_node(node, gm, args, kwargs)
            local[node] = (inputs, [leaves[n] for n in inputs], out)
            env[node] = out.detach()
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            with torch.no_grad():
                env[node] = call_node(node, gm, args, kwargs)
    if not isinstance(output, fx.Node) or not isinstance(env.get(output), torch.Tensor) \
            or env[output].dim() != 2 or plan.get(output) in (None, "shape"):
        raise ValueError("elrp needs a model that returns one logits tensor [B,K] computed from its input")
    logits = env[output]
    index = targets.to(logits.device).long().unsqueeze(1)
    target_logits = logits.gather(1, index)
    relevance = {output: torch.zeros_like(logits).scatter_(1, index, target_logits)}
    del env

    for node in reversed(list(gm.graph.nodes)):
        r = relevance.pop(node, None)
        if r is None:
            continue
        rule = plan[node]
        if rule == "input":
            return r, target_logits.squeeze(1)
        if rule == "pass":
            incoming = [(n, r) for n in input_nodes(node) if plan.get(n) not in (None, "shape")][:1]
        else:
            inputs, leaves, out = local.pop(node)
            if not inputs:
                continue
            if rule == "eps":
                grads = torch.autograd.grad(out, leaves, r / _stabilise(out.detach(), epsilon), allow_unused=True)
                incoming = [(n, leaf.detach() * g) for n, leaf, g in zip(inputs, leaves, grads) if g is not None]
            else:
                grads = torch.autograd.grad(out, leaves, r, allow_unused=True)
                incoming = [(n, g) for n, g in zip(inputs, grads) if g is not None]
        for n, rn in incoming:
            relevance[n] = relevance[n] + rn if n in relevance else rn
    raise ValueError("elrp: no relevance reached the input (the target logit does not depend on it)")


@register
class EpsilonLRP(Explainer):
    """Epsilon-LRP over the model's fx graph. Signed, 1 forward + 1 relevance (backward) pass.

    epsilon: stabiliser added to every pre-activation z as eps * sign(z) (default 1e-6,
        as in Zennit; DeepExplain uses 1e-4).  It absorbs relevance of weak units: the
        closer to 0, the closer the sum of the map is to the logit (exactly, for
        bias-free ReLU networks) and the closer the map is to gradient x input.

    The model must be traceable by torch.fx (Python code, not TorchScript; no branches on
    tensor values) and built from supported ops; anything else raises ValueError naming
    the layer.  The graph is traced once per input shape (C,H,W), on a copy in eval mode,
    with the batch's first image: branches on shapes are resolved for that example, so a
    forward() that branches on the batch size would keep the one-image branch.

    Extras: ``relevance_sum``, the sum of the map; compare it with the target logit to
    see how much relevance biases and epsilon absorbed (conservation).
    """

    name = "elrp"
    extras = {"relevance_sum": "float32"}

    def __init__(self, model, epsilon: float = 1e-6):
        super().__init__(model)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
        check_model(model, "elrp")  # fail at setup, not on the first batch
        self.epsilon = float(epsilon)
        self.graph = TracedGraphs(model, "elrp")

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        gm, plan = self.graph(images)
        relevance, _ = propagate(gm, plan, images.detach(), targets, self.epsilon)
        maps = sum_channels(relevance)
        return Explanation(maps, {"relevance_sum": maps.sum(dim=(1, 2)).float()})
