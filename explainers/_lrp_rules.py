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


def _shares(f: LayerFn, terms, relevance_over_z: list[torch.Tensor], times_input: bool = True) -> torch.Tensor:
    """The sum over terms (x', W', k) of x' * (W'^T applied to relevance_over_z[k]) (without the
    factor x' when not times_input): each term's input share, by autograd through f."""
    out = 0
    for x, w, k in terms:
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = f(leaf, w, None)  # the bias does not change a vector-Jacobian product in x
        grad, = torch.autograd.grad(z, leaf, relevance_over_z[k])
        out = out + (x * grad if times_input else grad)
    return out


def _z(f: LayerFn, terms) -> torch.Tensor:
    with torch.no_grad():
        return sum(f(x, w, b) for x, w, b in terms)


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
        z = _z(f, [(x, weight, bias)])
        return _shares(f, [(x, weight, 0)], [relevance / stabilise(z, epsilon)])
    if rule == "zplus":
        s = relevance / stabilise(_z(f, [(pos, wp, bp), (neg, wn, None)]), STABILISER)
        return _shares(f, [(pos, wp, 0), (neg, wn, 0)], [s])
    if rule == "alpha_beta":
        sp = relevance / stabilise(_z(f, [(pos, wp, bp), (neg, wn, None)]), STABILISER)
        sn = relevance / stabilise(_z(f, [(pos, wn, bn), (neg, wp, None)]), STABILISER)
        return (alpha * _shares(f, [(pos, wp, 0), (neg, wn, 0)], [sp])
                - beta * _shares(f, [(pos, wn, 0), (neg, wp, 0)], [sn]))
    if rule == "gamma":
        wa, wb = weight + gamma * wp, weight + gamma * wn
        ba = bb = None
        if bias is not None:
            ba, bb = bias + gamma * bp, bias + gamma * bn
        z = _z(f, [(x, weight, bias)])
        up = relevance * (z > 0) / stabilise(_z(f, [(pos, wa, ba), (neg, wb, None)]), STABILISER)
        down = relevance * (z < 0) / stabilise(_z(f, [(pos, wb, bb), (neg, wa, None)]), STABILISER)
        return _shares(f, [(pos, wa, 0), (neg, wb, 0), (pos, wb, 1), (neg, wa, 1)],
                       [up, down])
    if rule == "zbox":
        low, high = (bound.to(x).expand_as(x) for bound in bounds)
        with torch.no_grad():
            z = f(x, weight, bias) - f(low, wp, bp) - f(high, wn, bn)
        s = relevance / stabilise(z, STABILISER)
        return (_shares(f, [(x, weight, 0)], [s]) - _shares(f, [(low, wp, 0)], [s])
                - _shares(f, [(high, wn, 0)], [s]))
    if rule == "flat":
        ones, wones = torch.ones_like(x), torch.ones_like(weight)
        s = relevance / stabilise(_z(f, [(ones, wones, None)]), STABILISER)
        return _shares(f, [(ones, wones, 0)], [s], times_input=False)
    raise ValueError(f"unknown LRP rule {rule!r}")
