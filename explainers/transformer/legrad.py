"""LeGrad: Bousselham, Boggust, Chaybouti, Strobelt & Kuehne (2024; ICCV 2025), "LeGrad: An
Explainability Method for Vision Transformers via Feature Formation Sensitivity"."""
from __future__ import annotations

import sys
import threading

import torch

from saliency_audit.explainers.core.base import Explainer, Explanation, UnsupportedModel, check_batch
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.transformer.trace import ForwardTrace, patch_map

SUPPORTED = "Hugging Face ViTForImageClassification, DeiTForImageClassification(WithTeacher)"


def encoder_layers(body: torch.nn.Module) -> torch.nn.ModuleList:
    """A ViTModel's or DeiTModel's blocks: ``layers`` from transformers 5, ``encoder.layer`` before."""
    return body.layers if hasattr(body, "layers") else body.encoder.layer


def hf_classifier(model: torch.nn.Module):
    """(encoder layers, readout: tokens [B,T,D] -> logits, its description) of the first Hugging
    Face ViT or DeiT classifier inside ``model`` (a wrapper such as LogitsOnly), or None. The
    readout is the model's own final LayerNorm and head, as its forward applies them to the last
    layer's tokens."""
    transformers = sys.modules.get("transformers")  # a model of its classes has imported it; never import it here
    if transformers is None:
        return None
    teacher = transformers.DeiTForImageClassificationWithTeacher
    kinds = (transformers.ViTForImageClassification, transformers.DeiTForImageClassification, teacher)
    found = next((m for m in model.modules() if isinstance(m, kinds)), None)
    if found is None:
        return None
    body = found.vit if isinstance(found, transformers.ViTForImageClassification) else found.deit
    norm = body.layernorm
    if isinstance(found, teacher):
        def readout(t):
            return (found.cls_classifier(norm(t)[:, 0]) + found.distillation_classifier(norm(t)[:, 1])) / 2
        return encoder_layers(body), readout, "mean of the class and distillation heads on the final norm of tokens 0, 1"
    return encoder_layers(body), lambda t: found.classifier(norm(t)[:, 0]), "classifier on the final norm of the class token"


@register
class LeGrad(Explainer):
    """For each layer l, the class token after layer l goes through the model's final norm and head
    (as if the model ended there), giving the target's score s^l; the gradient of s^l with respect
    to layer l's own attention weights A^l (after softmax), positive part, mean over heads and over
    all query rows (class token and patches, as the authors' code), is layer l's map over the key
    tokens. The layers' maps are averaged, prefix tokens dropped, min-max scaled to [0, 1] per image
    (a constant map stays 0) and upsampled by nearest neighbour (see trace.token_map).
    Class-specific, unsigned. 1 forward + a backward from each layer's score to its own attention
    only (together about one backward).

    layers: how many of the last layers to average; None (default) is every layer, the paper's
        aggregation. The authors' OpenCLIP wrapper defaults to the last two (layer_index=-2).

    Differences from the authors' code (LeWrapper.compute_legrad_clip), which serves CLIP models:
    there the intermediate feature is the mean of all tokens, projected and compared with a text
    embedding; here it is what the classifier reads (the class token; DeiT's distillation head also
    reads token 1), scored by the target logit. Their per-layer maps are bilinearly upsampled and
    summed; here nearest and averaged (the min-max scaling cancels the factor). Their min-max
    divides by zero on a constant map.

    The gradient alone says how much attending more to a token would raise the score, whether the
    token is attended or not: on the issue-25 MNIST ViT blank patches got 0.62 of the strokes' mean
    map and deletion rated the maps 0.72 of a random map's AUC (attention_grad, which weights the same
    kind of gradient by the attention: 0.30; tests/explainers/test_transformer_quality.py).

    Needs the final norm and head, found in Hugging Face ViT and DeiT classifiers only
    (ViTForImageClassification, DeiTForImageClassification and ...WithTeacher, or a wrapper that
    passes their logits on): another model with attention over one token sequence (timm,
    torchvision, hand-written) is refused, as a model without global attention is (rollout's
    refusals), on the first explain. The readout of the last layer is checked against the model's
    logits. ``captured`` records what was read."""

    name = "legrad"
    signed = False
    compiles = False  # reads the eager forward's attention and the encoder layers' outputs
    needs_attention = True

    def __init__(self, model, layers: int | None = None):
        super().__init__(model)
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"layers must be an integer >= 1 or None, got {layers!r}")
        self.layers = layers
        self.captured: dict | None = None

    def passes(self):
        return {"forward": 1, "backward": 1}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets)
        found = hf_classifier(self.model)
        outputs: list[torch.Tensor] = []
        owner = threading.get_ident()  # the hooks sit on a model other threads may run: keep this call's outputs only

        def keep(module, args, output):
            if threading.get_ident() == owner:
                outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

        hooks = [layer.register_forward_hook(keep) for layer in found[0]] if found else []
        try:
            with torch.enable_grad(), ForwardTrace(images) as trace:
                logits = self.model(images)
        finally:
            for hook in hooks:
                hook.remove()
        attention = trace.attention_layers(len(images), self.name)  # refuses CNNs and windows first, as rollout
        if found is None:
            raise UnsupportedModel(self.name, "it reads each layer's class token through the model's final norm and "
                                              f"head, which it finds in {SUPPORTED} only; use attention_grad or attnlrp")
        _, readout, described = found
        tokens, height, width = attention[0].shape[-1], *images.shape[-2:]
        if len(outputs) != len(attention) or any(h.shape[:2] != (len(images), tokens) for h in outputs):
            raise UnsupportedModel(self.name, f"its {len(outputs)} encoder layers do not match its {len(attention)} "
                                              "attention matrices one to one; use attention_grad or attnlrp")
        index = targets.to(logits.device).long().unsqueeze(1)
        with torch.enable_grad():
            last = readout(outputs[-1])
        if last.shape != logits.shape or not torch.allclose(last.float(), logits.float(), rtol=1e-3, atol=1e-4):
            raise UnsupportedModel(self.name, "its logits are not its Hugging Face head's on the last layer (a wrapper "
                                              "changes them); use attention_grad or attnlrp")
        used = len(attention) if self.layers is None else min(self.layers, len(attention))
        total = torch.zeros(len(images), tokens, device=images.device)
        for h, a in zip(outputs[-used:], attention[-used:]):
            with torch.enable_grad():
                score = readout(h).gather(1, index).sum()  # the images are independent: one backward serves all
            grad, = torch.autograd.grad(score, a, retain_graph=True)
            total += grad.float().clamp(min=0).mean(dim=(1, 2))  # heads, then query rows: [B, key tokens]
        with torch.no_grad():
            maps, record = patch_map(total / used, trace, (height, width), self.name, "use attnlrp")
            # min-max per image: the upsampled map holds every patch's value, so its extremes are the patches'
            flat = maps.flatten(1)
            low, high = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
            maps = (maps - low) / torch.where(high > low, high - low, 1.0)
        self.captured = {**record, "attention_layers": len(attention), "layers_used": used,
                         "rows": "mean of all tokens", "readout": described}
        return Explanation(maps)
