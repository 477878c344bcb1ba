"""legrad (explainers/transformer/legrad.py): equality with LeGrad computed independently from the
raw Hugging Face model's own hidden states and attention weights (output_hidden_states,
output_attentions) with one autograd call per layer; an exact answer on a hand-built ViT with a
planted patch; fused attention; batch independence; the refusals."""
from __future__ import annotations

import pytest
import torch
from hf_models import hf_model, logits_model
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.base import UnsupportedModel

PATCH, SIZE = 8, 32  # the tiny HF models: 4x4 patches of 8 px


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def per_patch(maps: torch.Tensor) -> torch.Tensor:
    """[B,H,W] -> [B,4,4], asserting the map is constant on each patch (nearest upsampling)."""
    grid = maps[:, ::PATCH, ::PATCH]
    assert torch.equal(maps, grid.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2))
    return grid


def reference_legrad(family: str, x: torch.Tensor, targets: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """LeGrad written out from the paper on the raw HF model: for each layer l, the head applied to
    hidden_states[l + 1] gives s^l; d s^l / d attentions[l], ReLU, mean over heads and query rows;
    the layers' mean over the patch columns, min-max per image. [B,4,4]."""
    model = hf_model(family)
    model.set_attn_implementation("eager")
    out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    body, prefix = (model.vit, 1) if family == "vit" else (model.deit, 2)

    def head(h):
        t = body.layernorm(h)
        if family == "vit":
            return model.classifier(t[:, 0])
        return (model.cls_classifier(t[:, 0]) + model.distillation_classifier(t[:, 1])) / 2

    torch.testing.assert_close(head(out.hidden_states[-1]), out.logits)  # the readout is the model's
    pairs = list(zip(out.hidden_states[1:], out.attentions))[-(layers or len(out.attentions)):]
    total = 0
    for h, a in pairs:
        score = head(h)[torch.arange(len(x)), targets].sum()
        grad, = torch.autograd.grad(score, a, retain_graph=True)
        total = total + grad.clamp(min=0).mean(dim=1).mean(dim=1)[:, prefix:]
    total = total / len(pairs)
    low, high = total.amin(1, keepdim=True), total.amax(1, keepdim=True)
    return ((total - low) / (high - low)).reshape(len(x), 4, 4)


@pytest.mark.parametrize("family", ["vit", "deit"])
@pytest.mark.parametrize("layers", [None, 1])
def test_legrad_equals_the_paper_on_hf_hidden_states_and_attentions(family, layers):
    x, targets = images(), torch.tensor([3, 7])
    explainer = get_explainer("legrad", logits_model(family), layers=layers)
    maps = per_patch(explainer.explain(x, targets).maps)
    torch.testing.assert_close(maps, reference_legrad(family, x, targets, layers))
    assert explainer.captured["layers_used"] == (layers or 2) and explainer.captured["attention_layers"] == 2
    assert explainer.captured["prefix_tokens_dropped"] == (1 if family == "vit" else 2)
    assert maps.amin() == 0 and maps.amax() == 1
    other = get_explainer("legrad", logits_model(family)).explain(x, torch.tensor([4, 4])).maps
    assert not torch.allclose(per_patch(other), maps)  # class-specific


def planted_vit() -> nn.Module:
    """A one-layer HF ViT wired by hand: each patch token is [brightness, 1, 0, 0] (a convolution
    that averages the patch, a position embedding of 1 on dimension 1), the class token [0, 1, 0, 0];
    uniform attention (zero queries and keys) whose values and output keep dimension 0 of the
    normed tokens; no MLP; class 1's logit is dimension 0 of the final norm, class 0's its negative.
    The value of patch j rises with its brightness b_j and is negative for b_j < 1/3."""
    import transformers

    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=SIZE, patch_size=PATCH, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=4, num_labels=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0)
        model.vit.embeddings.patch_embeddings.projection.weight[0] = 1 / (3 * PATCH * PATCH)
        model.vit.embeddings.position_embeddings[..., 1] = 1.0
        weights = dict(model.named_parameters())  # names differ across transformers versions (v_proj, value)
        for name, p in weights.items():
            if name.endswith(("v_proj.weight", "attention.value.weight", "o_proj.weight", "attention.output.dense.weight")):
                p[0, 0] = 1.0
        model.classifier.weight[:, 0] = torch.tensor([-1.0, 1.0])
    from saliency_audit.transforms.model.hf import LogitsOnly
    return LogitsOnly(model).eval()


def test_legrad_puts_a_planted_patch_at_one_and_the_rest_at_zero():
    """In the last layer only the class token's row is read, and d s / d A[0, j] is the class's
    gradient at the class token times patch j's value: positive on the bright patch only for class
    1, so the map is exactly the patch's indicator; for class 0 the sign flips and the patch is 0."""
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.3
    where = [(0, 0), (1, 2), (3, 3)]
    expected = torch.zeros(3, 4, 4)
    for i, (r, c) in enumerate(where):
        x[i, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 1.0
        expected[i, r, c] = 1.0
    model = planted_vit()
    maps = per_patch(get_explainer("legrad", model).explain(x, torch.ones(3, dtype=torch.long)).maps)
    torch.testing.assert_close(maps, expected)
    against = per_patch(get_explainer("legrad", model).explain(x, torch.zeros(3, dtype=torch.long)).maps)
    assert (against[expected == 1] == 0).all() and (against[expected == 0] > 0).all()


class Logits(nn.Module):
    """An HF classifier as forward(x) -> logits with the attention implementation it was given
    (LogitsOnly switches to eager); ``scale`` != 1 changes the logits behind the head's back."""

    def __init__(self, model, scale=1.0):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(pixel_values=x).logits * self.scale


def test_fused_attention_gives_the_same_maps_as_eager():
    x, targets = images(), torch.tensor([1, 2])
    eager, fused = hf_model("vit"), hf_model("vit")
    eager.set_attn_implementation("eager")
    fused.set_attn_implementation("sdpa")
    on_fused = get_explainer("legrad", Logits(fused))
    torch.testing.assert_close(on_fused.explain(x, targets).maps, get_explainer("legrad", Logits(eager))
                               .explain(x, targets).maps, rtol=1e-4, atol=1e-5)
    assert on_fused.captured["fused_attention_computed"] == 2


def test_an_image_gets_the_same_map_alone_and_in_a_batch():
    explainer = get_explainer("legrad", logits_model("deit"))
    x, targets = images(3), torch.tensor([2, 5, 9])
    together = explainer.explain(x, targets).maps
    alone = torch.cat([explainer.explain(x[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


class HandWritten(nn.Module):
    """A class token and 4x4 patches through one hand-written attention layer: global attention
    over one sequence, but no Hugging Face head to read the layers with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, 8, PATCH, PATCH), nn.Parameter(torch.randn(1, 1, 8))
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        q, k, v = self.qkv(t)[:, None].chunk(3, dim=-1)
        t = t + ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v)[:, 0]
        return self.head(t[:, 0])


@pytest.mark.parametrize("model,words", [
    (lambda: logits_model("convnext"), "no attention layers"), (lambda: logits_model("resnet50"), "no attention layers"),
    (lambda: logits_model("swin"), "attends within windows"), (HandWritten, "Hugging Face ViT"),
    (lambda: Logits(hf_model("vit"), scale=2.0), "a wrapper changes them")])
def test_models_it_cannot_read_are_refused_in_one_line(model, words):
    explainer = get_explainer("legrad", model())  # building never fails: preflight's explain decides
    with pytest.raises(UnsupportedModel, match=words) as caught:
        explainer.explain(images(1), torch.tensor([0]))
    assert "\n" not in str(caught.value) and str(caught.value).startswith("legrad cannot explain this model: ")
    assert "; use " in str(caught.value)


def test_layers_option_is_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="layers must be an integer >= 1 or None"):
            get_explainer("legrad", logits_model("vit"), layers=bad)
    explainer = get_explainer("legrad", logits_model("vit"), layers=5)  # more than the model has: all of them
    explainer.explain(images(1), torch.tensor([0]))
    assert explainer.captured["layers_used"] == 2
