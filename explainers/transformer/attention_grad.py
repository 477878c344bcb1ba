"""Gradient-weighted attention: Chefer, Gur & Wolf (ICCV 2021), "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", self-attention case."""
from __future__ import annotations

import torch

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.transformer.trace import ForwardTrace, token_map


@register
class AttentionGradient(Explainer):
    """Each layer's attention A weighted by the target logit's gradient at it, positive part, mean
    over heads (the paper's Eq. 5: A_bar = E_h[(dy_t/dA * A)^+]), accumulated through the layers
    with the residual (Eq. 6: R = I, then R <- R + A_bar R, first layer to last); the class
    token's row over the patches, upsampled (see trace.token_map). Class-specific, unsigned.
    1 forward + 1 backward.

    Chefer et al. showed it ahead of rollout, raw attention, Grad-CAM and partial LRP on ImageNet
    perturbation and segmentation tests; their code needs their own ViT, this reads any model's
    attention. Refuses models without global attention as rollout does; ``captured`` records what
    was read."""

    name = "attention_grad"
    signed = False
    compiles = False  # reads the eager forward's attention
    needs_attention = True

    def __init__(self, model):
        super().__init__(model)
        self.captured: dict | None = None

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        with torch.enable_grad(), ForwardTrace(images) as trace:
            logits = self.model(images)
        layers = trace.attention_layers(len(images), self.name)
        read = trace.read_tokens(logits)
        score = logits.gather(1, targets.to(logits.device).long().unsqueeze(1)).sum()
        grads = torch.autograd.grad(score, layers, allow_unused=True)  # a layer after the class token's last read has none
        with torch.no_grad():
            relevance = torch.eye(layers[0].shape[-1], device=images.device).expand(len(images), -1, -1)
            for a, grad in zip(layers, grads):
                if grad is not None:
                    relevance = relevance + (grad.float() * a.float()).clamp(min=0).mean(dim=1) @ relevance
            maps, self.captured = token_map(relevance, trace, images.shape[-2:], self.name, read)
        return Explanation(maps)
