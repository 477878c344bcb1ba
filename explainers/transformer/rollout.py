"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers")."""
from __future__ import annotations

import torch

from saliency_audit.explainers.core.base import Explainer, Explanation, check_batch
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.transformer.trace import ForwardTrace, token_map

HEAD_FUSIONS = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}


@register
class AttentionRollout(Explainer):
    """How much each patch token flows into the class token through every layer's attention:
    A_hat = 0.5 A + 0.5 I per layer (the residual connection), rows normalised, heads fused, and
    the product A_hat_L ... A_hat_1; the class token's row over the patches, upsampled (see
    trace.token_map). Ignores the target: the same map for every class. Unsigned. 1 forward.

    head_fusion: mean (the paper's), max or min (jacobgil/vit-explain's variants).

    Needs global attention over one token sequence (ViT, DeiT, BEiT...): a model without attention
    (ConvNeXt, ResNet) or with windowed attention (Swin) is refused on the first explain.
    ``captured`` records what was read (layers, tokens, grid, prefix tokens dropped, fused
    attention computed explicitly)."""

    name = "rollout"
    signed = False
    compiles = False  # reads the eager forward's attention
    needs_attention = True

    def __init__(self, model, head_fusion: str = "mean"):
        super().__init__(model)
        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
        self.head_fusion = head_fusion
        self.captured: dict | None = None

    def passes(self):
        return {"forward": 1, "backward": 0}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        # Grad stays on (nothing flows back): under no_grad nn.MultiheadAttention takes a fused fast
        # path the trace must recognise to refuse, and every method sees the same forward.
        with torch.enable_grad(), ForwardTrace(images) as trace:
            logits = self.model(images)
        layers = trace.attention_layers(len(images), self.name)
        read = trace.read_tokens(logits)  # which rows the flow is read at: the tokens the head reads
        with torch.no_grad():
            eye = torch.eye(layers[0].shape[-1], device=images.device)
            flow = eye.expand(len(images), -1, -1)
            for a in layers:
                a = 0.5 * HEAD_FUSIONS[self.head_fusion](a.float(), dim=1) + 0.5 * eye
                flow = (a / a.sum(dim=-1, keepdim=True)) @ flow
            maps, self.captured = token_map(flow, trace, images.shape[-2:], self.name, read)
        return Explanation(maps)
