"""LRP rules for layers with weights, and the composites that assign them (Montavon et al. 2019).

A composite says which rule each Conv/Linear layer of the graph gets. The other nodes keep
elrp's roles: activations pass relevance, max pooling and reshapes move it, and other affine
ops (additions such as residual sums, average pooling, unfolded BatchNorm) take the epsilon
rule, with the plain stabiliser 1e-6 in the composites other than "epsilon" (Zennit's Norm).

Every rule computes the layer f(x; W, b) again with modified inputs and parameters and
redistributes R [output-shaped] to the layer's input in proportion to the modified
contributions; ``f`` is linear in x, so each share is x' * (W'^T applied to R / z'):

``epsilon(eps)``  z = f(x; W, b);                    R_x = x * W^T (R / (z + eps sign z))
``zplus``         z = f(x+; W+, b+) + f(x-; W-, 0)   R_x = x+ * W+^T s + x- * W-^T s,  s = R / z
``alpha_beta``    alpha times the positive part above minus beta times the negative part
                  z- = f(x+; W-, b-) + f(x-; W+, 0) (alpha - beta = 1 conserves)
``gamma(g)``      zplus-like with W + g W+ for positive outputs and W + g W- for negative ones
``zbox(l, h)``    z = f(x; W, b) - f(l; W+, b+) - f(h; W-, b-) for inputs bounded by [l, h]
``flat``          R spread evenly over the receptive field: W = 1, b = 0, x = 1

x+ = max(x, 0), W+ = max(W, 0), and so on. These follow Zennit's definitions (zennit.rules),
which the tests check against map for map.
"""
from __future__ import annotations

from typing import Callable

import torch

STABILISER = 1e-6
# A layer: (input, weight, bias or None) -> output, linear in the input for fixed parameters.
LayerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# composite -> (rule of the first layer, rule of convolutions, rule of dense layers)
COMPOSITES: dict[str, tuple[str, str, str]] = {
    "epsilon": ("epsilon", "epsilon", "epsilon"),
    "epsilon_plus": ("zplus", "zplus", "epsilon"),
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_gamma_box": ("zbox", "gamma", "epsilon"),
    "epsilon_alpha2_beta1": ("alpha_beta", "alpha_beta", "epsilon"),
    "epsilon_alpha2_beta1_flat": ("flat", "alpha_beta", "epsilon"),
}


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(+0) = +1, so that no denominator is exactly 0. copysign and
    an in-place add take two passes over z where where(z >= 0, ...) takes four."""
    return torch.copysign(torch.tensor(eps, dtype=z.dtype, device=z.device), z).add_(z)


def _redistribute(f: LayerFn, terms, relevance: torch.Tensor, biases, epsilon: float = STABILISER,
                  gate=None, times_input: bool = True) -> torch.Tensor:
    """The input relevance of one rule: terms (x', W', group, coefficient) are the modified
    contributions; z_g = the sum of group g's f(x'; W') plus biases[g]; each term's share is
    coefficient * x' * (W'^T applied to R * gate_g / z_g) (without x' when not times_input). One
    forward per term and one backward pass for all of them; terms whose x' is all zero (the
    negative part of a ReLU's output) contribute nothing and are skipped."""
    terms = [t for t in terms if t[0].any()]
    if not terms:
        return None
    leaves = [x.detach().requires_grad_(True) for x, *_ in terms]
    with torch.enable_grad():
        outputs = [f(leaf, w, None) for leaf, (_, w, _, _) in zip(leaves, terms)]
    z: dict[int, torch.Tensor] = {}
    for out, (_, _, group, _) in zip(outputs, terms):
        z[group] = z[group] + out.detach() if group in z else out.detach()
    for group, bias in enumerate(biases):
        if bias is not None and group in z:
            z[group] = z[group] + bias.view(1, -1, *([1] * (z[group].dim() - 2)))
    scaled = {g: relevance / stabilise(zg, epsilon) for g, zg in z.items()}  # stabilise leaves zg as it is
    if gate is not None:
        scaled = {g: value * gate[g] for g, value in scaled.items()}
    grads = torch.autograd.grad(outputs, leaves, [scaled[t[2]] for t in terms])
    out = 0
    for (x, _, _, coefficient), grad in zip(terms, grads):
        out = out + coefficient * (x * grad if times_input else grad)
    return out


def layer_relevance(rule: str, f: LayerFn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    relevance: torch.Tensor, *, epsilon: float = STABILISER, gamma: float = 0.25,
                    alpha: float = 2.0, beta: float = 1.0,
                    bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Relevance of the layer's input x for ``relevance`` at its output, by ``rule``."""
    pos, neg = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    bp = bn = None
    if bias is not None:
        bp, bn = bias.clamp(min=0), bias.clamp(max=0)
    if rule == "epsilon":
        out = _redistribute(f, [(x, weight, 0, 1)], relevance, [bias], epsilon)
    elif rule == "zplus":
        out = _redistribute(f, [(pos, wp, 0, 1), (neg, wn, 0, 1)], relevance, [bp])
    elif rule == "alpha_beta":
        out = _redistribute(f, [(pos, wp, 0, alpha), (neg, wn, 0, alpha), (pos, wn, 1, -beta), (neg, wp, 1, -beta)],
                            relevance, [bp, bn])
    elif rule == "gamma":
        wa, wb = weight + gamma * wp, weight + gamma * wn
        ba = bb = None
        if bias is not None:
            ba, bb = bias + gamma * bp, bias + gamma * bn
        with torch.no_grad():
            z = f(x, weight, bias)
        out = _redistribute(f, [(pos, wa, 0, 1), (neg, wb, 0, 1), (pos, wb, 1, 1), (neg, wa, 1, 1)],
                            relevance, [ba, bb], gate=[z > 0, z < 0])
    elif rule == "zbox":
        low, high = (bound.to(x).expand_as(x) for bound in bounds)
        # z = f(x; W) - f(l; W+) - f(h; W-), the biases cancelling (b - b+ - b- = 0); f is linear in
        # the weights too, so the subtracted terms are f(l; -W+) and f(h; -W-)
        out = _redistribute(f, [(x, weight, 0, 1), (low, -wp, 0, 1), (high, -wn, 0, 1)], relevance, [None])
    elif rule == "flat":
        out = _redistribute(f, [(torch.ones_like(x), torch.ones_like(weight), 0, 1)], relevance, [None],
                            times_input=False)
    else:
        raise ValueError(f"unknown LRP rule {rule!r}")
    return torch.zeros_like(x) if out is None else out
