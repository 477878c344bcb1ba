"""Control maps: the levels an explanation has to beat, run like any method so every report shows them.

``random``  uniform noise, seeded per image: what a map that knows nothing scores.
``sobel``   the image's edge strength: what a map that knows the image but not the model scores.
            A method that does no better than edges is an edge detector (Adebayo et al. 2018
            found several gradient methods close to one).
Neither asks the model anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.maps import image_generators
from saliency_audit.explainers.core.registry import register


class Control(Explainer):
    """A map made without the model: unsigned, no passes, marked control."""

    signed = False
    needs_gradients = False
    control = True
    autocast = False  # no model: the same map at every precision

    def passes(self):
        return {"forward": 0, "backward": 0}


@register
class RandomMap(Control):
    """Uniform noise in [0, 1) per pixel, drawn from the image's seed."""

    name = "random"

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        _, _, height, width = images.shape
        maps = torch.stack([torch.rand(height, width, generator=g) for g in image_generators(seeds, len(images))])
        return Explanation(maps.to(images.device))


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


@register
class SobelMap(Control):
    """Sobel gradient magnitude sqrt(Gx^2 + Gy^2) of each channel (replicated borders), summed over
    channels."""

    name = "sobel"

    def explain(self, images, targets, seeds=None):
        check_batch(images, targets)
        images = images.detach().float()
        batch, channels, height, width = images.shape
        kernels = torch.stack([_SOBEL, _SOBEL.t()]).unsqueeze(1).to(images.device)  # [2,1,3,3]: x, y
        flat = F.pad(images.reshape(batch * channels, 1, height, width), (1, 1, 1, 1), mode="replicate")
        edges = F.conv2d(flat, kernels)  # [B*C, 2, H, W]
        magnitude = edges.pow(2).sum(1).sqrt().reshape(batch, channels, height, width)
        return Explanation(magnitude.sum(1))
