"""A binary classifier with one output logit z (a sigmoid head), through the Python API.

Its class is the positive one, with probability sigmoid(z): a softmax over its one column is 1 for
every image, which made every probability-driven score constant (the deletion/insertion curves at 1,
RISE's weights and occlusion's probability drops all equal, so their maps ignored the model). The reference is the same
model written with two centred logits (-z/2, z/2), whose softmax gives class 1 exactly sigmoid(z):
explaining the single logit must score as explaining that class.
"""
from __future__ import annotations

import torch
from conftest import REGION, scene

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.metrics.causal import deletion_curve, insertion_curve


class OneLogit(torch.nn.Module):
    """The logit grows with the brightness of REGION (0 at mean brightness 0.5)."""

    def forward(self, x):
        return 8 * (x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)) - 0.5).unsqueeze(1)


class TwoCentred(torch.nn.Module):
    def forward(self, x):
        z = OneLogit()(x)
        return torch.cat([-z, z], 1) / 2


def _images():
    dim = scene(0) * 0.6  # the region below 0.5: the model calls it negative
    return torch.cat([scene(0), dim, scene(1)])


def test_deletion_and_insertion_follow_the_single_logits_sigmoid():
    images = _images()
    maps = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    for curve in (deletion_curve, insertion_curve):
        one = curve(OneLogit(), images, maps, torch.zeros(3, dtype=torch.long), steps=8, seeds=[0, 1, 2])
        two = curve(TwoCentred(), images, maps, torch.ones(3, dtype=torch.long), steps=8, seeds=[0, 1, 2])
        assert torch.allclose(one, two, atol=1e-6)
        assert float(one.std()) > 0.01  # not the constant 1 of a softmax over one column


def test_probability_weighted_methods_see_the_single_logit():
    images, seeds = _images(), torch.arange(3)
    for name, options in (("rise", {"n_masks": 64}), ("occlusion", {"score": "probability"})):
        one = get_explainer(name, OneLogit(), **options).explain(images, torch.zeros(3, dtype=torch.long), seeds)
        two = get_explainer(name, TwoCentred(), **options).explain(images, torch.ones(3, dtype=torch.long), seeds)
        assert torch.allclose(one.maps, two.maps, rtol=1e-4, atol=1e-6), name
