"""The model as a torch.fx graph, with each node's role for relevance-style backward rules.

elrp and deeplift both replace the backward pass of some ops with their own rule, which
needs to see every op, functional calls (``F.relu``, ``out += identity``, ``x.view``)
included; module hooks see only modules.  The model is traced once per input shape into
a graph and every node gets a role:

``eps``    ops that are affine in their activation inputs (Conv*, Linear, BatchNorm not
           folded, average and adaptive average pooling, additions, subtraction, scaling by
           a constant, mean/sum);
``move``   ops that only move values (reshape, flatten, permute, getitem, cat, Dropout
           and Identity in eval) and max pooling (which selects values);
``pass``   elementwise activations (ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, Sigmoid, ...);
``shape``  ops on sizes (``x.size(0)``, ``x.shape``): no relevance;
``input``  the model's input.

BatchNorm that directly follows a Conv/Linear is folded into it (on a copy), which leaves
the outputs unchanged and makes the pair one linear layer.  A model with anything else
(LayerNorm, attention, a product of two activations, a forward torch.fx cannot trace) is
refused before any work with :class:`UnsupportedModel`, which names what the rules do not
cover and what to use instead.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from saliency_audit.explainers.core.base import UnsupportedModel
from saliency_audit.explainers.core.registry import list_methods

# --- what each op does to relevance -----------------------------------------------

_EPS_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_MOVE_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
)
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign,
)

_EPS_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.neg,
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.batch_norm,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    torch.mean, torch.sum,
}
# Linear only while at most one factor is an activation (scaling by a constant).
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_MOVE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.cat, torch.concat, torch.stack, operator.getitem,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
}
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.softplus, F.softsign,
}
_SHAPE_FUNCTIONS = {builtins.len}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}  # x.shape etc. (traced as getattr)

_EPS_METHODS = {"add", "sub", "neg", "mean", "sum"}
_SCALE_METHODS = {"mul", "div", "truediv"}
_MOVE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "view_as", "reshape_as", "expand", "expand_as", "clone"}
_PASS_METHODS = {"relu", "sigmoid", "tanh"}
_SHAPE_METHODS = {"size", "dim", "numel"}

# In-place ops are rewritten to their out-of-place forms: relevance needs every
# intermediate value as it was when it was used.
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      torch.relu_: torch.relu, F.relu_: F.relu}


# --- tracing ------------------------------------------------------------------------

class _ConcreteTracer(fx.Tracer):
    """fx symbolic tracing that also runs the ops on an example input.

    Plain ``symbolic_trace`` stops at any ``if`` on a traced value, which rules out the
    common input check ``if x.dim() != 4: raise ...``.  Knowing the example's values,
    this tracer can answer such a condition, but only when it depends on shapes alone
    (it raises for conditions on tensor values, whose branch could differ per image).
    """

    def __init__(self, example: torch.Tensor, method: str) -> None:
        super().__init__()
        self.example = example
        self.method = method
        self.values: dict[fx.Node, Any] = {}
        self.shape_only: set[fx.Node] = set()
        self._concrete = False
        self._forward = None
        self._placeholders = 0

    def call_module(self, m, forward, args, kwargs):
        if self._concrete:  # a leaf module running on real tensors: no graph nodes
            return forward(*args, **kwargs)
        self._forward = forward
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._concrete:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        inputs = [a.node for a in _flatten((args, kwargs)) if isinstance(a, fx.Proxy)]
        real = fx.node.map_aggregate((args, kwargs), lambda a: self.values[a.node] if isinstance(a, fx.Proxy) else a)
        self._concrete = True
        try:
            self.values[node] = self._run(kind, target, *real)
        finally:
            self._concrete = False
        if _is_shape_op(node) or (inputs and all(n in self.shape_only for n in inputs)):
            self.shape_only.add(node)
        return proxy

    def _run(self, kind, target, args, kwargs):
        if kind == "placeholder":
            self._placeholders += 1
            if self._placeholders == 1:
                return self.example
            if args:
                return args[0]
            raise UnsupportedModel(self.method, f"it explains models with one tensor input, and forward() also "
                                                f"requires {target!r}: {instead(self.method)}")
        if kind == "get_attr":
            value = self.root
            for atom in target.split("."):
                value = getattr(value, atom)
            return value
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self._forward(*args, **kwargs)
        return None

    def to_bool(self, obj):
        if obj.node in self.shape_only:
            return bool(self.values[obj.node])
        raise UnsupportedModel(self.method, f"its forward branches on tensor values (node {obj.node.name!r}), so "
                                            f"torch.fx cannot trace one graph for every image (only conditions on "
                                            f"shapes can be traced): {instead(self.method)}")


def _is_shape_op(node: fx.Node) -> bool:
    """Ops whose result is a size, not data: x.size(0), x.dim(), x.shape, len(x)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in _SHAPE_FUNCTIONS or (
            node.target is builtins.getattr and len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES)
    return False


def _flatten(tree) -> list:
    out: list = []
    fx.node.map_aggregate(tree, lambda a: out.append(a))
    return out


def input_nodes(node: fx.Node) -> list[fx.Node]:
    return [a for a in _flatten((node.args, node.kwargs)) if isinstance(a, fx.Node)]


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fold_batchnorm(gm: fx.GraphModule) -> None:
    """Fold eval-mode BatchNorm into the Conv/Linear node right before it.

    y = gamma * (Wx + b - mean) / sqrt(var + eps) + beta is again a linear layer with
    W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps) per output
    channel; the outputs do not change (up to float rounding).
    """
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1 \
                or uses[prev.target] != 1:
            continue
        layer = gm.get_submodule(prev.target)
        if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
            continue
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            folded = copy.deepcopy(layer)
            folded.weight.mul_(scale.reshape(-1, *([1] * (layer.weight.dim() - 1))))
            bias = shift if layer.bias is None else layer.bias * scale + shift
            folded.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        _set_module(gm, prev.target, folded)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)


def _remove_inplace(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if getattr(module, "inplace", False):
                module = copy.copy(module)
                module.inplace = False
                _set_module(gm, node.target, module)
        elif node.op == "call_function":
            if node.target in _INPLACE_FUNCTIONS:
                node.target = _INPLACE_FUNCTIONS[node.target]
            _drop_inplace_flag(node)
        elif node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
                and not node.target.startswith("_"):
            node.target = node.target[:-1]


COVERED = "its rules cover convolutions, linear layers, batch norm, pooling, sums and elementwise activations"


def attention_layer(model: nn.Module) -> str | None:
    """The class of the model's first attention layer, or None. softmax(QK^T)V multiplies two
    activations and normalises across tokens, which no rule here covers."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention"):
            return type(module).__name__
    return None


def instead(method: str) -> str:
    """What to run instead of ``method``: the last words of a refusal."""
    if method == "deeplift":
        return "use intg, whose map also sums to f(x) - f(baseline)"
    if "attnlrp" in list_methods():  # registered with explainers.transformer
        return "use attnlrp (LRP with rules for LayerNorm and attention) or intg"
    return "use intg (integrated gradients) or grad"


def check_model(model, method: str) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModel(method, "it needs the model's Python code to trace its graph, and a TorchScript "
                                       "model cannot be traced: load the model as module:Callable with --weights")
    if not isinstance(model, nn.Module):
        raise UnsupportedModel(method, f"it needs a torch.nn.Module, got {type(model).__name__}")


def _drop_inplace_flag(node: fx.Node) -> None:
    """F.relu(x, inplace=True), F.dropout(x, 0.5, False, True), ...: make inplace False."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a Python signature take no inplace flag
        return
    if bound.arguments.get("inplace") is True:
        bound.arguments["inplace"] = False
        node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)


def _trace_root_hooks(tracer: fx.Tracer, graph: fx.Graph, model: nn.Module) -> None:
    """The root module's forward hooks, into the graph: fx traces the root's forward, not its __call__,
    so a hook that changes the output (the job's reading of a single logit as two classes) would be
    lost, and the graph answer other outputs than the model does."""
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    if not model._forward_hooks or not isinstance(output.args[0], fx.Node):
        return
    inputs = tuple(fx.Proxy(node, tracer) for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_before(output):
        result = fx.Proxy(output.args[0], tracer)
        for key, hook in list(model._forward_hooks.items()):
            changed = (hook(model, inputs, {}, result) if model._forward_hooks_with_kwargs.get(key)
                       else hook(model, inputs, result))
            result = result if changed is None else changed
    output.args = (result.node,)


def trace_model(model: nn.Module, example: torch.Tensor, method: str) -> fx.GraphModule:
    """Trace ``model`` on ``example`` [B,C,H,W] into the graph that ``method`` propagates over.

    Works on a deep copy in eval mode, with frozen parameters, BatchNorm folded into the
    layer before it and in-place ops made out-of-place; ``model`` is left untouched.
    Raises UnsupportedModel for TorchScript models and for forward()s that cannot be traced.
    """
    check_model(model, method)
    model = copy.deepcopy(model).eval().requires_grad_(False)
    tracer = _ConcreteTracer(example.detach().clone(), method)  # a copy: tracing runs the forward, which may
    # change its input in place (the caller's images)
    try:
        with torch.no_grad():
            graph = tracer.trace(model)
            _trace_root_hooks(tracer, graph, model)
    except Exception as e:  # noqa: BLE001 - torch.fx fails in many ways on code written for eager mode
        layer = attention_layer(model)
        if layer:  # transformers fail to trace (or branch on a value: EVA's is_causal) before the rules would
            # refuse their attention, which is what the user must hear
            reason = f"{COVERED}; this model uses attention ({layer}), which they do not"
        elif isinstance(e, UnsupportedModel):
            raise
        else:
            reason = (f"it needs the model's torch.fx graph, and tracing fails ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})")
        raise UnsupportedModel(method, f"{reason}: {instead(method)}") from None
    gm = fx.GraphModule(model, graph)
    _remove_inplace(gm)
    _fold_batchnorm(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _op_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"layer {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    kind = "method" if node.op == "call_method" else "operation"
    # the innermost module that computes it (squeeze-excitation's gating product, a GRN's norm), which
    # the user can look up; a bare 'mul' says nothing
    inside = list((node.meta.get("nn_module_stack") or {}).items())[-1:]  # key -> (path, class), by torch version
    where = "".join(f" in {value[0]!r} ({getattr(value[-1], '__name__', value[-1])})" if isinstance(value, tuple)
                    else f" in {key!r}" for key, value in inside)
    return f"{kind} {name!r}{where} (node {node.name!r})"


def _op_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


SHOWN_KINDS = 3  # unsupported ops a refusal names, one node of each kind


def plan_rules(gm: fx.GraphModule, method: str) -> dict[fx.Node, str]:
    """The rule of every node that carries relevance; UnsupportedModel naming the ops of the
    kinds no rule covers (the first node of each kind), if there are any."""
    plan: dict[fx.Node, str] = {}
    live: set[fx.Node] = set()
    unsupported: dict[str, str] = {}  # kind -> the first such node's label
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise UnsupportedModel(method, f"the traced model has no input: {instead(method)}")
    live.add(placeholders[0])
    plan[placeholders[0]] = "input"
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        inputs = [n for n in input_nodes(node) if n in live]
        if node.op == "output":
            continue
        if not inputs:
            continue  # depends on constants only: computed, carries no relevance
        live.add(node)
        rule = _rule(node, gm, inputs, plan)
        if rule is None:
            unsupported.setdefault(_op_kind(node, gm), _op_label(node, gm))
        else:
            plan[node] = rule
    if unsupported:
        shown = list(unsupported.values())
        more = f" and {len(shown) - SHOWN_KINDS} more kinds" if len(shown) > SHOWN_KINDS else ""
        raise UnsupportedModel(method, f"{COVERED}; this model uses {', '.join(shown[:SHOWN_KINDS])}{more}, "
                                       f"which they do not: {instead(method)}")
    return plan


def _rule(node: fx.Node, gm: fx.GraphModule, live_inputs: list[fx.Node], plan) -> str | None:
    if all(plan.get(n) == "shape" for n in live_inputs):
        return "shape"  # arithmetic on sizes, e.g. x.size(0) * 2
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _PASS_MODULES):
            return "pass"
        if isinstance(module, _MOVE_MODULES):
            return "move"
        if isinstance(module, _EPS_MODULES):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
                return None  # batch statistics even in eval: not a per-image linear map
            return "eps"
        return None
    target = node.target
    if _is_shape_op(node):
        return "shape"
    if node.op == "call_function":
        if target is operator.getitem and plan.get(node.args[0]) == "shape":
            return "shape"
        if target in _PASS_FUNCTIONS:
            return "pass"
        if target in _MOVE_FUNCTIONS:
            return "move"
        if target in _EPS_FUNCTIONS:
            return "eps"
        if target in _SCALE_FUNCTIONS:
            activations = [n for n in live_inputs if plan.get(n) != "shape"]
            # a / b is linear only in a; a * b only with one activation factor
            if len(set(activations)) == 1 and not (target in (operator.truediv, torch.div)
                                                    and node.args[0] is not activations[0]):
                return "eps"
        return None
    if node.op == "call_method":
        if target in _PASS_METHODS:
            return "pass"
        if target in _MOVE_METHODS:
            return "move"
        if target in _EPS_METHODS:
            return "eps"
        if target in _SCALE_METHODS:
            activations = [n for n in live_inputs if plan.get(n) != "shape"]
            if len(set(activations)) == 1 and (target == "mul" or node.args[0] is activations[0]):
                return "eps"
        return None
    return None


def call_node(node: fx.Node, gm: fx.GraphModule, args, kwargs):
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


class TracedGraphs:
    """``method``'s traced graph of ``model`` and its rule plan, traced once per input shape,
    dtype and device: ``graphs(images) -> (GraphModule, plan)``."""

    def __init__(self, model: nn.Module, method: str):
        self.model, self.method = model, method
        self._graphs: dict[tuple, tuple[fx.GraphModule, dict[fx.Node, str]]] = {}

    def __call__(self, images: torch.Tensor) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
        key = (tuple(images.shape[1:]), images.dtype, images.device)
        if key not in self._graphs:
            gm = trace_model(self.model, images[:1].detach(), self.method)
            self._graphs[key] = (gm, plan_rules(gm, self.method))
        return self._graphs[key]
