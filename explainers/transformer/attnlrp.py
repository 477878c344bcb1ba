"""AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers"): LRP through attention, normalisation and nonlinearities, in one backward pass.

Implemented from the paper's rules (LRP is patented; LXT, the authors' package, is free for
personal and scientific use only and serves the tests as a reference, never the code). Each rule
is written as a change to one operation's backward, so that relevance is gradient x input at
every tensor and one autograd pass carries it (the paper's Sec. 3.4); ForwardTrace applies the
changes to whichever torch calls the model makes, with no knowledge of its architecture:

- linear and convolution: epsilon-LRP (Eq. 8), the output gradient times z / (z + eps sign z);
- addition (residuals, biases, position embeddings): epsilon-LRP with eps 0, i.e. the gradient;
  constants (biases, class token, position embeddings) absorb their share;
- elementwise nonlinearities (GELU, SiLU, Mish, ELU, tanh, ...: f(0) = 0): the identity rule
  (Eq. 9), gradient f(x) / x;
- LayerNorm, GroupNorm, RMSNorm, F.normalize and any square root, variance, standard deviation
  or norm of an activation (hand-written norms): the standard deviation held constant, the
  paper's identity rule on 1/std (Prop. 3.4); the centring left is linear;
- a product of two activations (q k^T, attention times values, gated units): the uniform rule
  (Prop. 3.2 / 3.3), half of the relevance to each factor, i.e. half of each gradient;
- softmax: the paper's rule (Prop. 3.1), R_in = x (R_out - s sum R_out), which in gradient x
  input form is softmax's own gradient: nothing to change.

Relevance is not conserved exactly: biases and constants absorb theirs, and the softmax rule
gives the part x s sum(R) to the softmax's bias. With ``attention="cp"`` (CP-LRP, Ali et al.
2022) attention weights are held constant, relevance reaches the input through the values only,
and a model without biases conserves it exactly (the tests check both).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.maps import sum_channels
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.transformer.trace import ForwardTrace, arg

ATTENTION_RULES = ("attnlrp", "cp")
LINEAR = (F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
          torch.conv_transpose3d)
# f(0) = 0, so f(x) / x is bounded and the identity rule moves relevance where the value came from.
IDENTITY = (F.gelu, F.silu, F.mish, F.hardswish, F.elu, F.selu, F.celu, torch.tanh, torch.Tensor.tanh, F.tanh)
PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm, torch.mul, torch.Tensor.mul,
            torch.einsum)
# Hand-written normalisations: their standard deviation is what the paper holds constant.
SPREADS = (torch.sqrt, torch.Tensor.sqrt, torch.rsqrt, torch.Tensor.rsqrt, torch.var, torch.Tensor.var, torch.std,
           torch.Tensor.std, torch.norm, torch.Tensor.norm, torch.linalg.vector_norm)


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient multiplied by ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        # a copy, not a view: a view made in a Function may not be changed in place, and squeeze-
        # excitation blocks apply an in-place ReLU right after their 1x1 convolution (timm's MobileNetV3)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class RelevanceTrace(ForwardTrace):
    """ForwardTrace with AttnLRP's rules on the live calls (see the module's docstring)."""

    HANDLERS: ClassVar[dict] = {**ForwardTrace.HANDLERS, **dict.fromkeys(LINEAR, "_linear"), **dict.fromkeys(IDENTITY, "_identity"),
                **dict.fromkeys(PRODUCTS, "_product"), **dict.fromkeys(SPREADS, "_constant"),
                F.layer_norm: "_layer_norm", torch.layer_norm: "_layer_norm", F.group_norm: "_group_norm",
                F.rms_norm: "_rms_norm", F.normalize: "_normalize"}

    def __init__(self, source: torch.Tensor, attention: str, epsilon: float):
        super().__init__(source)
        self.cp, self.epsilon = attention == "cp", epsilon
        self.rules = dict.fromkeys(("epsilon", "identity", "uniform", "norm"), 0)

    def weights(self, softmax):
        return softmax.detach() if self.cp else softmax

    def _linear(self, func, args, kwargs, live):
        out = func(*args, **kwargs)
        self.rules["epsilon"] += 1
        if not self.epsilon:
            return out
        with torch.no_grad():  # z / (z + eps sign z) = |z| / (|z| + eps), in three passes over z instead of five
            size = out.abs()
            factor = size.div_(size + self.epsilon)
        return _ScaleGradient.apply(out, factor)

    def _identity(self, func, args, kwargs, live):
        x = arg(args, kwargs, 0, "input")
        if kwargs.get("inplace"):  # the rule needs the input after the call
            kwargs = {**kwargs, "inplace": False}
        with torch.no_grad():
            ratio = func(*args, **kwargs) / torch.where(x == 0, 1.0, x)
        self.rules["identity"] += 1
        return x * ratio

    def _product(self, func, args, kwargs, live):
        out = func(*args, **kwargs)
        if live < 2:  # a constant factor (weight, scale): linear, the gradient is the rule
            return out
        self.rules["uniform"] += 1
        return _ScaleGradient.apply(out, 1 / live)

    def _constant(self, func, args, kwargs, live):
        return func(*args, **kwargs).detach()

    def _normalised(self, x, dims, eps, centre=True):
        """(x - mean) / std over ``dims`` with std a constant (RMSNorm: no centring)."""
        self.rules["norm"] += 1
        x = x - x.mean(dims, keepdim=True) if centre else x
        return x / (x.detach().pow(2).mean(dims, keepdim=True) + eps).sqrt()

    def _layer_norm(self, func, args, kwargs, live):
        x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
        weight, bias, eps = (arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"),
                             arg(args, kwargs, 4, "eps", 1e-5))
        y = self._normalised(x, tuple(range(-len(shape), 0)), eps)
        y = y * weight if weight is not None else y
        return y + bias if bias is not None else y

    def _rms_norm(self, func, args, kwargs, live):
        x, shape, weight, eps = (arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape"),
                                 arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps"))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = self._normalised(x, tuple(range(-len(shape), 0)), eps, centre=False)
        return y * weight if weight is not None else y

    def _group_norm(self, func, args, kwargs, live):
        x, groups = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
        weight, bias, eps = (arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"),
                             arg(args, kwargs, 4, "eps", 1e-5))
        y = self._normalised(x.reshape(x.shape[0], groups, -1), (-1,), eps).reshape(x.shape)
        channel = (1, -1) + (1,) * (x.dim() - 2)
        y = y * weight.reshape(channel) if weight is not None else y
        return y + bias.reshape(channel) if bias is not None else y

    def _normalize(self, func, args, kwargs, live):
        x, p, dim, eps = (arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "p", 2.0), arg(args, kwargs, 2, "dim", 1),
                          arg(args, kwargs, 3, "eps", 1e-12))
        self.rules["norm"] += 1
        return x / x.detach().norm(p, dim, keepdim=True).clamp_min(eps)


@register
class AttnLRP(Explainer):
    """AttnLRP's relevance of each pixel for the target logit, summed over channels: signed, and
    summing to the logit less what biases, constants and the softmax rule absorb. 1 forward +
    1 backward; works on any PyTorch model whose layers it has rules for (ViT, DeiT, Swin,
    ConvNeXt, ResNets: on a ReLU CNN it is epsilon-LRP).

    attention: "attnlrp" (default, the paper's rules through softmax and both attention products:
        relevance also reaches the input through queries and keys, which decide where a token
        looks) or "cp" (CP-LRP, Ali et al. 2022: attention weights held constant, so relevance
        flows through the values only; LXT recommends it for ViTs, with Gamma rules we do not
        have, for less noisy maps; it ignores what made the model attend where it did).
    epsilon: the stabiliser of the epsilon rule on linear and convolution layers (LXT's 1e-6);
        0 gives LRP-0, the plain gradient there.

    ``captured`` records how many operations each rule changed and how many fused attention calls
    were computed explicitly. A model whose attention runs inside nn.MultiheadAttention is refused:
    its products and softmax are hidden in one call."""

    name = "attnlrp"
    autocast = compiles = False  # its rules rewrite the eager forward's operations, in float32

    def __init__(self, model, attention: str = "attnlrp", epsilon: float = 1e-6):
        super().__init__(model)
        if attention not in ATTENTION_RULES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_RULES)}, got {attention!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
        self.attention, self.epsilon = attention, float(epsilon)
        self.captured: dict | None = None

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        with torch.enable_grad():
            with RelevanceTrace(images, self.attention, self.epsilon) as trace:
                logits = self.model(images)
            trace.refuse_hidden(self.name)
            score = logits.gather(1, targets.to(logits.device).long().unsqueeze(1)).sum()
            grads, = torch.autograd.grad(score, images)
        self.captured = {"rules": dict(trace.rules), "attention_layers": len(trace.attention),
                         "fused_attention_computed": trace.fused}
        return Explanation(sum_channels((images * grads).detach()))
