"""The relevance methods trace the model by running its forward on an example batch: a forward that
changes its input in place (x.sub_(mean)) rewrote the caller's images there, so the maps and every
later method explained other images than those given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from saliency_audit.explainers import get_explainer


class CentresInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.net(x.sub_(0.5))


@pytest.mark.parametrize("method", ["lrp", "elrp"])
def test_tracing_the_model_leaves_the_callers_images_alone(method):
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    given = images.clone()
    get_explainer(method, CentresInPlace().eval()).explain(images, torch.tensor([0, 1]))
    assert torch.equal(images, given)
