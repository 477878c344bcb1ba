"""Layer-wise relevance propagation (Bach et al. 2015) over a torch.fx graph of the model:
epsilon-LRP and the composites LRP users run on real networks (Montavon et al. 2019; Zennit).

LRP starts from the target logit and moves it down the network layer by layer, so that (up to
biases and stabilisers) the relevance of the input pixels sums to the logit.  Captum's ``LRP``
attaches rules to a fixed list of module types through hooks, so functional calls
(``out += identity``, ``F.relu``, ``x.view(...)``) and layers outside that list break it.  Here
the model is traced into a graph once per input shape and every node gets one of four roles:

``eps``    ops that are affine in their activation inputs (Conv*, Linear, BatchNorm not
           folded, average and adaptive average pooling, additions, subtraction, scaling by
           a constant, mean/sum): the epsilon rule
           R_i = sum_j x_i * dz_j/dx_i * R_j / (z_j + eps * sign(z_j)),
           i.e. z_ij / z_j for linear layers and each summand's share for additions.
``move``   ops that only move values (reshape, flatten, permute, getitem, cat, Dropout
           and Identity in eval) and max pooling (winner takes all): relevance goes
           where the value came from (the vector-Jacobian product with R).
``pass``   elementwise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid,
           ...): relevance passes unchanged.  In relevance terms this is DeepExplain's
           ratio rule output / (input + eps*sign(input)) applied to the gradient.
``shape``  ops on sizes (``x.size(0)``, ``x.shape``): no relevance.

A composite (:mod:`saliency_audit.explainers.relevance.rules`) then gives Conv and Linear layers their own rules:
z+ for convolutions and flat for the first layer in ``epsilon_plus_flat``, and so on.  Residual
sums need no canonizer: an addition is a node of the graph and splits relevance between its
summands by their shares, as Zennit's ResNet canonizer arranges with its Sum module.

BatchNorm that directly follows a Conv/Linear is folded into it (on a copy), which
leaves the outputs unchanged and makes the pair one linear layer, as LRP assumes.

For ReLU networks, epsilon-LRP equals gradient x input as epsilon -> 0 (Ancona et al.
2018); with other activations and with a larger epsilon it differs.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from saliency_audit.explainers.core.base import Explainer, Explanation, UnsupportedModel, check_batch
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.relevance.graph import TracedGraphs, call_node, check_model, input_nodes, trace_model
from saliency_audit.explainers.relevance.rules import COMPOSITES, STABILISER, layer_relevance, stabilise

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def lrp_graph(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The traced graph elrp propagates over (see :func:`saliency_audit.explainers.relevance.graph.trace_model`)."""
    return trace_model(model, example, "elrp")


def layer_kind(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """"conv" or "dense" for the layers a composite gives their own rule, else None. Transposed
    convolutions keep the epsilon rule."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _CONV_MODULES:
            return "conv"
        return "dense" if type(module) is nn.Linear else None
    if node.op == "call_function":
        return "conv" if node.target in _CONV_FUNCTIONS else "dense" if node.target is F.linear else None
    return None


def layer_call(node: fx.Node, gm: fx.GraphModule, args, kwargs):
    """(f(x, weight, bias), x, weight, bias) of a conv or dense node, from its resolved arguments."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        f = module._conv_forward if isinstance(module, _CONV_MODULES) else F.linear
        return f, args[0], module.weight, module.bias
    named = dict(zip(_CONV_ARGS, args))
    named.update(kwargs)
    x, weight, bias = named.pop("input"), named.pop("weight"), named.pop("bias", None)
    return (lambda x, w, b: node.target(x, w, b, **named)), x, weight, bias


def layer_rules(gm: fx.GraphModule, plan: dict[fx.Node, str], composite: str) -> dict[fx.Node, str]:
    """The composite's rule for each conv and dense node (the first layer in graph order gets the
    first-layer rule); layers whose weight depends on the input keep the epsilon rule."""
    first, conv, dense = COMPOSITES[composite]
    rules: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        kind = layer_kind(node, gm) if plan.get(node) == "eps" else None
        if kind is None or any(plan.get(n) not in (None, "shape") for n in input_nodes(node)[1:]):
            continue
        rules[node] = first if not rules else conv if kind == "conv" else dense
    return {node: rule for node, rule in rules.items() if rule != "epsilon"}


_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
                torch.add, torch.sub, torch.mul, torch.div, torch.neg, "add", "sub", "mul", "div", "truediv", "neg"}


def composite_plan(gm: fx.GraphModule, plan: dict[fx.Node, str]) -> dict[fx.Node, str]:
    """The roles under a composite other than "epsilon": arithmetic with a constant on one activation
    (an input normalisation x / s - m inside the model, a constant shift) passes relevance on
    element for element, as if the model took its input already normalised (Zennit's hooks never
    see such an op). Under "epsilon" the constant absorbs its share like a bias, which keeps
    epsilon-LRP equal to gradient x input of the model's own input."""
    out = dict(plan)
    for node, role in plan.items():
        if role == "eps" and node.op in ("call_function", "call_method") and node.target in _ELEMENTWISE:
            live = {n for n in input_nodes(node) if plan.get(n) not in (None, "shape")}
            if len(live) == 1:
                out[node] = "pass"
    return out


def first_layer_bounds(gm: fx.GraphModule, rules: dict[fx.Node, str], low: torch.Tensor,
                       high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The lowest and highest values the first layer's input can take, for model inputs between
    ``low`` and ``high`` [1,C,H,W]: the graph up to that layer run on both (exact for elementwise
    monotone preprocessing such as a normalisation inside the model). None without a zbox layer."""
    node = next((n for n, rule in rules.items() if rule == "zbox"), None)
    if node is None:
        return None
    seen = {}

    class Prefix(fx.Interpreter):
        def run_node(self, n):
            if n is node:
                seen["x"] = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
                raise StopIteration
            return super().run_node(n)

    values = []
    for bound in (low, high):
        try:
            with torch.no_grad():
                Prefix(gm).run(bound)
        except StopIteration:
            values.append(seen["x"])
    return torch.minimum(*values), torch.maximum(*values)


def propagate(gm: fx.GraphModule, plan: dict[fx.Node, str], x: torch.Tensor, targets: torch.Tensor,
              epsilon: float, rules: dict[fx.Node, str] | None = None, norm: float | None = None,
              bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
              gamma: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and one relevance pass over ``gm``: relevance [B,C,H,W] and target logits [B].

    rules: the composite's rule per conv/dense node (the others take epsilon); norm: the
    stabiliser of the other affine nodes (additions, pooling), ``epsilon`` when None."""
    rules = rules or {}
    env: dict[fx.Node, Any] = {}
    local: dict[fx.Node, tuple] = {}
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
        if node in rules:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            with torch.no_grad():
                env[node] = call_node(node, gm, args, kwargs)
            local[node] = (node.args[0], layer_call(node, gm, args, kwargs))
        elif rule in ("eps", "move"):
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
        raise UnsupportedModel("elrp", "it needs a model that returns one logits tensor [B,K] computed from its input")
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
        if node in rules:
            source, (f, a, weight, bias) = local.pop(node)
            incoming = [(source, layer_relevance(rules[node], f, a, weight, bias, r, gamma=gamma, bounds=bounds))]
        elif rule == "pass":
            incoming = [(n, r) for n in input_nodes(node) if plan.get(n) not in (None, "shape")][:1]
        else:
            inputs, leaves, out = local.pop(node)
            if not inputs:
                continue
            if rule == "eps":
                eps = epsilon if norm is None or layer_kind(node, gm) else norm
                grads = torch.autograd.grad(out, leaves, r / stabilise(out.detach(), eps), allow_unused=True)
                incoming = [(n, leaf.detach() * g) for n, leaf, g in zip(inputs, leaves, grads) if g is not None]
            else:
                grads = torch.autograd.grad(out, leaves, r, allow_unused=True)
                incoming = [(n, g) for n, g in zip(inputs, grads) if g is not None]
        for n, rn in incoming:
            relevance[n] = relevance[n] + rn if n in relevance else rn
    raise ValueError("elrp: no relevance reached the input (the target logit does not depend on it)")


def check_bounds(value) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """input_bounds as (low per channel, high per channel); a number applies to every channel."""
    def side(v):
        items = v if isinstance(v, (list, tuple)) else [v]
        if not items or not all(isinstance(i, (int, float)) and not isinstance(i, bool) and math.isfinite(i)
                                for i in items):
            raise ValueError
        return tuple(float(i) for i in items)
    try:
        low, high = value
        low, high = side(low), side(high)
    except (TypeError, ValueError):
        raise ValueError(f"input_bounds must be [low, high], each a number or one number per channel, "
                         f"got {value!r}") from None
    if len(low) != len(high) or any(lo >= hi for lo, hi in zip(low, high)):
        raise ValueError(f"input_bounds: low must be below high in every channel, got {value!r}")
    return low, high


@register
class EpsilonLRP(Explainer):
    """LRP over the model's fx graph. Signed, 1 forward + 1 relevance (backward) pass.

    composite: which rules the Conv and Linear layers get (see saliency_audit.explainers.relevance.rules):
        "epsilon" (default: the epsilon rule everywhere), "epsilon_plus" (z+ on convolutions),
        "epsilon_plus_flat" (and flat on the first layer: Zennit's recommendation for
        classifiers), "epsilon_gamma_box" (gamma on convolutions, z-box on the first layer),
        "epsilon_alpha2_beta1" and "epsilon_alpha2_beta1_flat".  Dense layers keep epsilon.
    epsilon: stabiliser added to every pre-activation z as eps * sign(z) (default 1e-6,
        as in Zennit; DeepExplain uses 1e-4); in the other composites it applies to the
        dense layers, and additions and pooling use 1e-6.  It absorbs relevance of weak
        units: the closer to 0, the closer the sum of the map is to the logit (exactly, for
        bias-free ReLU networks) and, with "epsilon", the closer the map is to gradient x input.
    gamma: the gamma rule's weight on positive contributions (default 0.25).
    input_bounds: [low, high], the range of the model's input (a number, or one per channel),
        for the z-box rule; default [0, 1]. The pipeline sets it from --mean and --std.

    The model must be traceable by torch.fx (Python code, not TorchScript; no branches on
    tensor values) and built from supported ops; anything else (LayerNorm, attention) is
    refused before any work with UnsupportedModel, naming the layers.  The graph is traced once per input shape (C,H,W), on a copy in eval mode,
    with the batch's first image: branches on shapes are resolved for that example, so a
    forward() that branches on the batch size would keep the one-image branch.

    Extras: ``relevance_sum``, the sum of the map; compare it with the target logit to
    see how much relevance biases and epsilon absorbed (conservation).
    """

    name = "elrp"
    extras = {"relevance_sum": "float32"}
    autocast = compiles = False  # its rules rerun the model's FX graph: float32, eager
    default_composite = "epsilon"

    def __init__(self, model, epsilon: float = 1e-6, composite: str | None = None, gamma: float = 0.25,
                 input_bounds=(0.0, 1.0)):
        super().__init__(model)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
        composite = self.default_composite if composite is None else composite
        if composite not in COMPOSITES:
            raise ValueError(f"composite must be one of {', '.join(COMPOSITES)}, got {composite!r}")
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
            raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
        low, high = check_bounds(input_bounds)
        check_model(model, self.name)  # fail at setup, not on the first batch
        self.epsilon = float(epsilon)
        self.composite = composite
        self.gamma = float(gamma)
        self.input_bounds = [list(low), list(high)]
        self.graph = TracedGraphs(model, self.name)
        self._rules: dict[tuple, tuple] = {}

    def passes(self):
        return {"forward": 1, "backward": 1}

    def _rules_for(self, gm, plan, images):
        key = (id(gm), images.shape[1])
        if key not in self._rules:
            if self.composite != "epsilon":
                plan = composite_plan(gm, plan)
            rules = layer_rules(gm, plan, self.composite)
            low, high = (torch.tensor(side, dtype=images.dtype) for side in self.input_bounds)
            channels = images.shape[1]
            if len(low) not in (1, channels):
                raise ValueError(f"{self.name}: input_bounds has {len(low)} values per side for "
                                 f"{channels}-channel images")
            shape = (1, channels, *images.shape[2:])
            low, high = (v.to(images.device).view(1, -1, *([1] * (images.dim() - 2))).expand(shape)
                         for v in (low, high))
            self._rules[key] = (plan, rules, first_layer_bounds(gm, rules, low.contiguous(), high.contiguous()))
        return self._rules[key]

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        gm, plan = self.graph(images)
        plan, rules, bounds = self._rules_for(gm, plan, images)
        norm = None if self.composite == "epsilon" else STABILISER
        relevance, _ = propagate(gm, plan, images.detach(), targets, self.epsilon, rules, norm, bounds, self.gamma)
        maps = sum_channels(relevance)
        return Explanation(maps, {"relevance_sum": maps.sum(dim=(1, 2)).float()})


@register
class LRP(EpsilonLRP):
    """LRP with the composite Zennit recommends for image classifiers: epsilon_plus_flat by
    default (z+ on convolutions, epsilon on dense layers, flat on the first layer). The same
    method as elrp, with another default; see elrp for the options."""

    name = "lrp"
    default_composite = "epsilon_plus_flat"
