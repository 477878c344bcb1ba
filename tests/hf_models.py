"""Tiny `transformers` classifiers of each production family, random weights, for the
architecture tests: ViT, DeiT (class and distillation tokens), Swin (windows, BHWC), ConvNeXt
(LayerNorm, depthwise convolutions) and a ResNet-50-shaped bottleneck network. Each is small
enough for a 2-core CI run but keeps the structure that trips explainers: token sequences,
prefix tokens, patch merging, channels-last LayerNorm."""
from __future__ import annotations

import torch

SIZE = 32  # pixels; divisible by every patch size and window below
CLASSES = 10


def _build(family: str):
    import transformers as t

    if family == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=CLASSES))
    if family == "deit":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(
            image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=CLASSES))
    if family == "swin":
        return t.SwinForImageClassification(t.SwinConfig(
            image_size=SIZE, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
            num_labels=CLASSES))
    if family == "convnext":
        return t.ConvNextForImageClassification(t.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=CLASSES))
    if family == "resnet50":  # bottleneck blocks, as ResNet-50, at a fraction of the width and depth
        return t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=CLASSES))
    raise ValueError(family)


FAMILIES = ("vit", "deit", "swin", "convnext", "resnet50")


def hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The raw `transformers` model (output objects, pixel_values=), in eval mode."""
    torch.manual_seed(seed)
    return _build(family).eval()


def logits_model(family: str, seed: int = 0) -> torch.nn.Module:
    """The same model as the explainers see it: forward(x) -> logits, eager attention."""
    from saliency_audit.transforms.model.hf import LogitsOnly

    return LogitsOnly(hf_model(family, seed)).eval()


def save_folder(family: str, directory, seed: int = 0) -> str:
    """A Hugging Face model folder (config.json, model.safetensors, preprocessor_config.json) as
    save_pretrained writes it, for the loading tests."""
    import json
    import os

    hf_model(family, seed).save_pretrained(str(directory))
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    with open(os.path.join(str(directory), "preprocessor_config.json"), "w") as f:
        json.dump(processor, f)
    return str(directory)


# Zero-argument factories, for the pipeline's --model hf_models:tiny_vit (tests/ is on sys.path).
def tiny_vit() -> torch.nn.Module:
    return logits_model("vit")


def tiny_deit() -> torch.nn.Module:
    return logits_model("deit")


def tiny_swin() -> torch.nn.Module:
    return logits_model("swin")


def tiny_convnext() -> torch.nn.Module:
    return logits_model("convnext")


def tiny_resnet50() -> torch.nn.Module:
    return logits_model("resnet50")
