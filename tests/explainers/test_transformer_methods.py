"""rollout, attention_grad and attnlrp (explainers/transformer/): known answers on hand-built attention,
equality with references computed from Hugging Face's own attention weights (output_attentions)
and their gradients, AttnLRP against LXT's explicit rules on the same weights and its
conservation, fused attention and nn.MultiheadAttention against eager attention, the refusals
on models without global attention (and preflight's record), and a planted patch in a trained ViT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import FAMILIES, hf_model, logits_model
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.base import UnsupportedModel
from saliency_audit.explainers.transformer.trace import token_grid

PATCH, SIZE = 8, 32  # the tiny HF ViT and DeiT: 4x4 patches of 8 px
ATTENTION_METHODS = ("rollout", "attention_grad")


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def per_patch(maps: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B,H,W] -> [B,h,w], asserting the map is constant on each patch (nearest upsampling)."""
    grid = maps[:, ::patch, ::patch]
    assert torch.equal(maps, grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2))
    return grid


# --- rollout: known answers on fixed attention -------------------------------------------------

class FixedAttention(nn.Module):
    """A class token and 2x2 patches of 16 px through layers whose attention is ``tables`` [L,5,5]
    (scores of +-1e4: exact one-hot or uniform rows), made input-dependent by adding 0 * tokens so
    the trace sees a softmax of the forward."""

    def __init__(self, tables):
        super().__init__()
        self.tables = tables
        self.embed = nn.Conv2d(3, 4, 16, 16)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)
        for table in self.tables:
            scores = table.expand(len(x), 1, 5, 5) + 0 * t.sum(dim=(1, 2))[:, None, None, None]
            t = (scores.softmax(dim=-1) @ t[:, None])[:, 0]
        return self.head(t[:, 0])


def table(rows: dict[int, list[int]]) -> torch.Tensor:
    """Attention scores: row i attends uniformly to rows[i] (default: itself)."""
    scores = torch.full((5, 5), -1e4)
    for i in range(5):
        scores[i, rows.get(i, [i])] = 0.0
    return scores


def test_rollout_known_answers_on_fixed_attention():
    x = images(1)
    # one layer, the class token attending to all 5 tokens: 0.5 * 1/5 + 0.5 * 0 on every patch
    uniform = get_explainer("rollout", FixedAttention([table({0: [0, 1, 2, 3, 4]})]))
    torch.testing.assert_close(per_patch(uniform.explain(x, torch.tensor([0])).maps, 16),
                               torch.full((1, 2, 2), 0.1))
    # one layer, the class token attending to patch 3 only (bottom right): 0.5 there, 0 elsewhere
    one_hot = get_explainer("rollout", FixedAttention([table({0: [4]})]))
    torch.testing.assert_close(per_patch(one_hot.explain(x, torch.tensor([0])).maps, 16),
                               torch.tensor([[[0.0, 0.0], [0.0, 0.5]]]))
    # two layers: patch 1 reads patch 0, then the class token reads patch 1. Rollout follows the
    # flow: 0.5 (class row, layer 2) * 0.5 (patch 1's own row, layer 1) on each of patches 0 and 1
    flow = get_explainer("rollout", FixedAttention([table({2: [1]}), table({0: [2]})]))
    torch.testing.assert_close(per_patch(flow.explain(x, torch.tensor([0])).maps, 16),
                               torch.tensor([[[0.25, 0.25], [0.0, 0.0]]]))
    assert flow.captured == {"attention_layers": 2, "tokens": 5, "grid": [2, 2], "prefix_tokens_dropped": 1,
                             "row": "class token (first)", "fused_attention_computed": 0, "upsampling": "nearest"}


# --- rollout and attention_grad against Hugging Face's own attention weights --------------------------

def hf_attentions(family: str, x: torch.Tensor):
    """The raw HF model's logits and attention weights (output_attentions=True, eager), weights
    retaining their gradients."""
    model = hf_model(family)
    model.set_attn_implementation("eager")
    out = model(pixel_values=x, output_attentions=True)
    for a in out.attentions:
        a.retain_grad()
    return out.logits, out.attentions


@pytest.mark.parametrize("family,prefix", [("vit", 1), ("deit", 2)])
def test_rollout_equals_the_paper_formula_on_hf_attentions(family, prefix):
    x = images()
    _, attentions = hf_attentions(family, x)
    eye = torch.eye(attentions[0].shape[-1])
    flow = eye.expand(len(x), -1, -1)
    for a in attentions:  # Abnar & Zuidema: 0.5 A + 0.5 I, rows normalised, product over layers, head mean
        a = 0.5 * a.detach().mean(dim=1) + 0.5 * eye
        flow = (a / a.sum(dim=-1, keepdim=True)) @ flow
    # the rows of the tokens the head reads: ViT's class token; DeiT's logits are the mean of its class
    # and distillation tokens' heads, so the mean of their rows
    reference = flow[:, :prefix, prefix:].mean(dim=1).reshape(len(x), 4, 4)
    explainer = get_explainer("rollout", logits_model(family))
    maps = explainer.explain(x, torch.tensor([0, 1])).maps
    torch.testing.assert_close(per_patch(maps), reference)
    assert explainer.captured["prefix_tokens_dropped"] == prefix and explainer.captured["grid"] == [4, 4]
    assert explainer.captured["attention_layers"] == len(attentions) == 2


@pytest.mark.parametrize("family,prefix", [("vit", 1), ("deit", 2)])
def test_attngrad_equals_chefer_rule_on_hf_attentions_and_gradients(family, prefix):
    x, targets = images(), torch.tensor([3, 7])
    logits, attentions = hf_attentions(family, x)
    logits[torch.arange(len(x)), targets].sum().backward()
    relevance = torch.eye(attentions[0].shape[-1]).expand(len(x), -1, -1)
    for a in attentions:  # Chefer et al. 2021, Eqs. 5-6: A_bar = E_h[(grad * A)^+], R += A_bar R
        relevance = relevance + (a.grad * a.detach()).clamp(min=0).mean(dim=1) @ relevance
    reference = relevance[:, :prefix, prefix:].mean(dim=1).reshape(len(x), 4, 4)  # the rows the head reads
    maps = get_explainer("attention_grad", logits_model(family)).explain(x, targets).maps
    torch.testing.assert_close(per_patch(maps), reference)
    other = get_explainer("attention_grad", logits_model(family)).explain(x, torch.tensor([4, 4])).maps
    assert not torch.allclose(maps, other)  # class-specific, unlike rollout


def test_rollout_head_fusion_variants():
    x = images(1)
    _, attentions = hf_attentions("vit", x)
    explainer = get_explainer("rollout", logits_model("vit"), head_fusion="max")
    eye = torch.eye(17)
    flow = eye[None]
    for a in attentions:
        a = 0.5 * a.detach().amax(dim=1) + 0.5 * eye
        flow = (a / a.sum(dim=-1, keepdim=True)) @ flow
    torch.testing.assert_close(per_patch(explainer.explain(x, torch.tensor([0])).maps), flow[:, 0, 1:].reshape(1, 4, 4))
    with pytest.raises(ValueError, match="head_fusion must be one of mean, max, min"):
        get_explainer("rollout", logits_model("vit"), head_fusion="median")


@pytest.mark.parametrize("tokens,convs,size,grid", [
    (17, [], (32, 32), (4, 4, 1)),  # no convolution: the image's aspect ratio with the fewest prefix tokens
    (197, [(14, 14)], (224, 224), (14, 14, 1)),  # ViT-B/16
    (201, [(14, 14)], (224, 224), (14, 14, 5)),  # a class token and 4 registers
    (18, [(16, 16), (4, 4)], (32, 32), (4, 4, 2)),  # a convolutional stem, then the patch embedding
    (34, [], (32, 64), (4, 8, 2)),
    (7, [], (32, 64), None),
])
def test_token_grid(tokens, convs, size, grid):
    assert token_grid(tokens, convs, *size) == grid


def test_tokens_without_a_prefix_read_the_mean_row():
    explainer = get_explainer("rollout", ToyViT(bias=False))  # mean-pooled, no class token
    explainer.explain(images(1), torch.tensor([0]))
    assert explainer.captured["prefix_tokens_dropped"] == 0 and explainer.captured["row"] == "mean of all tokens"


# --- fused attention -----------------------------------------------------------------------------

class Logits(nn.Module):
    """An HF classifier as forward(x) -> logits, keeping the attention implementation it was given
    (LogitsOnly switches to eager)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


@pytest.mark.parametrize("method", ["rollout", "attention_grad", "attnlrp"])
def test_fused_attention_gives_the_same_maps_as_its_eager_twin(method):
    """HF's sdpa calls F.scaled_dot_product_attention, which never materialises the weights; the
    trace computes it explicitly, so the maps equal the eager model's."""
    x, targets = images(), torch.tensor([1, 2])
    eager, fused = hf_model("vit"), hf_model("vit")
    eager.set_attn_implementation("eager")
    fused.set_attn_implementation("sdpa")
    on_eager, on_fused = get_explainer(method, Logits(eager)), get_explainer(method, Logits(fused))
    torch.testing.assert_close(on_fused.explain(x, targets).maps, on_eager.explain(x, targets).maps,
                               rtol=1e-4, atol=1e-6)
    assert on_eager.captured["fused_attention_computed"] == 0
    assert on_fused.captured["fused_attention_computed"] == 2  # one per layer: the twin did call SDPA


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,words", [("swin", "attends within windows"), ("convnext", "no attention layers"),
                                          ("resnet50", "no attention layers")])
@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_models_without_global_attention_are_refused_in_one_line(method, family, words):
    explainer = get_explainer(method, logits_model(family))  # building never fails: preflight's explain decides
    with pytest.raises(UnsupportedModel, match=words) as caught:
        explainer.explain(images(1), torch.tensor([0]))
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    assert "use attnlrp or gradcam" in str(caught.value) or "use gradcam" in str(caught.value)


class TorchEncoder(nn.Module):
    """A class token and 4x4 patches through one nn.MultiheadAttention, as torchvision's ViT attends."""

    def __init__(self, **options):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.cls = nn.Conv2d(3, 8, PATCH, PATCH), nn.Parameter(torch.randn(1, 1, 8))
        self.attention, self.head = nn.MultiheadAttention(8, 2, batch_first=True, **options), nn.Linear(8, 3)
        self.eval()

    def tokens(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)

    def forward(self, x):
        t = self.tokens(x)
        return self.head(self.attention(t, t, t, need_weights=False)[0][:, 0])


def test_nn_multiheadattention_is_computed_from_its_parts():
    """Its one call hides projections, products and softmax; the trace computes them explicitly
    (so rollout reads the weights nn.MultiheadAttention reports, and AttnLRP's rules reach inside)."""
    model, x = TorchEncoder(), images()
    _, weights = model.attention(*[model.tokens(x)] * 3, need_weights=True, average_attn_weights=False)
    a = 0.5 * weights.detach().mean(dim=1) + 0.5 * torch.eye(17)
    reference = (a / a.sum(dim=-1, keepdim=True))[:, 0, 1:].reshape(2, 4, 4)
    explainer = get_explainer("rollout", model)
    torch.testing.assert_close(per_patch(explainer.explain(x, torch.tensor([0, 1])).maps), reference)
    assert explainer.captured["fused_attention_computed"] == 1
    relevance = get_explainer("attnlrp", model)
    assert torch.isfinite(relevance.explain(x, torch.tensor([0, 1])).maps).all()
    assert relevance.captured["rules"]["uniform"] == 2  # q k^T and A v inside the module
    with pytest.raises(UnsupportedModel, match="fused kernel that hides its weights"):
        get_explainer("attention_grad", TorchEncoder(add_zero_attn=True)).explain(x, torch.tensor([0, 1]))


# --- AttnLRP -------------------------------------------------------------------------------------

def split_heads(qkv, heads):
    """[B,T,3D] -> q, k, v, each [B,heads,T,D/heads]."""
    b, n, d3 = qkv.shape
    return qkv.reshape(b, n, 3, heads, d3 // 3 // heads).permute(2, 0, 3, 1, 4)


class Block(nn.Module):
    def __init__(self, dim, heads, bias, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.norm1, self.norm2 = nn.LayerNorm(dim, bias=bias), nn.LayerNorm(dim, bias=bias)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim, bias=bias), nn.Linear(2 * dim, dim, bias=bias)

    def forward(self, t):
        q, k, v = split_heads(self.qkv(self.norm1(t)), self.heads)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        t = t + self.proj(o.transpose(1, 2).reshape(t.shape))
        return t + self.fc2(F.gelu(self.fc1(self.norm2(t))))


class ToyViT(nn.Module):
    """A two-block ViT on 4x4 patches of 8 px. bias=False: no biases, no class token or position
    embedding (mean-pooled tokens): nothing but the softmax rule can absorb relevance."""

    def __init__(self, bias=True, fused=False, dim=16, heads=2, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, PATCH, PATCH, bias=bias)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, dim)) if bias else None
        self.pos = nn.Parameter(0.1 * torch.randn(1, 17, dim)) if bias else None
        self.blocks = nn.ModuleList(Block(dim, heads, bias, fused) for _ in range(2))
        self.norm, self.head = nn.LayerNorm(dim, bias=bias), nn.Linear(dim, classes, bias=bias)
        for p in self.parameters():  # LayerNorm's weights away from 1 and biases away from 0
            if p.dim() == 1:
                nn.init.normal_(p, std=0.5)
        self.eval()

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)
        return self.head(t[:, 0] if self.cls is not None else t.mean(dim=1))


def lxt_relevance(model: ToyViT, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ToyViT's forward composed of LXT's explicit AttnLRP functions (a backward through them
    returns relevance, not gradients), started from the target logit: [B,H,W]."""
    lf = pytest.importorskip("lxt.explicit.functional", reason="pip install --no-deps lxt==2.1")
    from lxt.explicit.rules import identity

    def norm(layer, t):
        return lf.layer_norm(t, layer.weight, layer.bias, layer.eps)

    def linear(layer, t):
        return lf.linear_epsilon(t, layer.weight, layer.bias)

    x = x.clone().requires_grad_(True)
    patches = F.unfold(x, PATCH, stride=PATCH).transpose(1, 2)  # moves values only: relevance follows
    e = model.embed
    t = lf.linear_epsilon(patches, e.weight.reshape(len(e.weight), -1), e.bias)
    t = lf.add2(torch.cat([model.cls.expand(len(t), -1, -1), t], dim=1), model.pos.expand(len(t), -1, -1))
    for b in model.blocks:
        q, k, v = split_heads(linear(b.qkv, norm(b.norm1, t)), b.heads)
        scores = lf.mul2(lf.matmul(q, k.transpose(-2, -1)), q.shape[-1] ** -0.5)
        o = lf.matmul(lf.softmax(scores, -1), v)
        t = lf.add2(t, linear(b.proj, o.transpose(1, 2).reshape(t.shape)))
        h = linear(b.fc2, identity(F.gelu, linear(b.fc1, norm(b.norm2, t))))
        t = lf.add2(t, h)
    logits = linear(model.head, norm(model.norm, t)[:, 0])
    start = torch.zeros_like(logits)
    start[torch.arange(len(x)), targets] = logits[torch.arange(len(x)), targets].detach()
    logits.backward(start)
    return x.grad.sum(dim=1)


def test_attnlrp_equals_lxt_explicit_rules_on_the_same_vit(monkeypatch):
    model, x, targets = ToyViT(), images(), torch.tensor([0, 3])
    # At the defaults the two differ only by their stabilisers (LXT adds eps to every denominator:
    # linear, LayerNorm, products, sums; we stabilise the linear layers' only, by eps * sign z).
    reference = lxt_relevance(model, x, targets)
    ours = get_explainer("attnlrp", model).explain(x, targets).maps
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3 * float(reference.abs().max()))
    assert float(reference.abs().max()) > 1e-4 and (reference.flatten(1).std(dim=1) > 0).all()
    # Without stabilisers, in float64, the rules are the same to rounding.
    lf = pytest.importorskip("lxt.explicit.functional")
    monkeypatch.setattr(lf, "_stabilize", lambda input, epsilon=0, inplace=False: input)  # lxt 2.1's one stabiliser
    model, x = model.double(), x.double()
    ours = get_explainer("attnlrp", model, epsilon=0.0).explain(x, targets).maps
    torch.testing.assert_close(ours, lxt_relevance(model, x, targets), rtol=1e-9, atol=1e-15)


def test_attnlrp_fused_toy_equals_eager_toy():
    x, targets = images(), torch.tensor([0, 3])
    eager = get_explainer("attnlrp", ToyViT()).explain(x, targets).maps
    fused_explainer = get_explainer("attnlrp", ToyViT(fused=True))
    torch.testing.assert_close(fused_explainer.explain(x, targets).maps, eager, rtol=1e-4, atol=1e-6)
    assert fused_explainer.captured["fused_attention_computed"] == 2


@pytest.mark.parametrize("attention,exact", [("cp", True), ("attnlrp", False)])
def test_attnlrp_conservation_on_a_bias_free_vit(attention, exact):
    """Without biases or constants, every rule but softmax's conserves relevance: CP-LRP (attention
    held constant) gives the logit back to the pixels in full; the paper's softmax rule gives part
    of it to the softmax's bias, so its sum differs."""
    model, x, targets = ToyViT(bias=False), images(), torch.tensor([1, 4])
    logits = model(x)[torch.arange(2), targets]
    explainer = get_explainer("attnlrp", model, attention=attention, epsilon=0.0)
    total = explainer.explain(x, targets).maps.sum(dim=(1, 2))
    if exact:
        torch.testing.assert_close(total, logits.detach(), rtol=1e-4, atol=1e-5)
    else:
        assert (total - logits).abs().max() > 1e-3
    # the stabiliser moves the sums by about epsilon / |z| of the logit only
    stabilised = get_explainer("attnlrp", model, attention=attention).explain(x, targets).maps.sum(dim=(1, 2))
    torch.testing.assert_close(stabilised, total, rtol=1e-3, atol=1e-4)
    assert explainer.captured["rules"] == {"epsilon": 10, "identity": 2, "uniform": 4 if not exact else 2, "norm": 5}


@pytest.mark.parametrize("family", FAMILIES)
def test_attnlrp_gives_finite_varied_maps_on_every_hf_family(family):
    model = logits_model(family)
    x = images()
    targets = model(x).argmax(dim=1)
    maps = get_explainer("attnlrp", model).explain(x, targets).maps
    assert maps.shape == (2, SIZE, SIZE) and torch.isfinite(maps).all()
    assert (maps.flatten(1).std(dim=1) > 0).all()


def test_attnlrp_options_are_checked():
    with pytest.raises(ValueError, match="attention must be one of attnlrp, cp"):
        get_explainer("attnlrp", ToyViT(), attention="full")
    with pytest.raises(ValueError, match="epsilon must be a number >= 0"):
        get_explainer("attnlrp", ToyViT(), epsilon=-1)


@pytest.mark.parametrize("method", ["rollout", "attention_grad", "attnlrp"])
def test_an_image_gets_the_same_map_alone_and_in_a_batch(method):
    explainer = get_explainer(method, logits_model("deit"))
    x, targets = images(3), torch.tensor([2, 5, 9])
    together = explainer.explain(x, targets).maps
    alone = torch.cat([explainer.explain(x[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-7)


# --- planted feature ------------------------------------------------------------------------------

def planted(n, seed):
    """[n,3,32,32] noise in [0,0.5]; class 1 images carry a bright 8x8 patch on one of the 16 patches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    corners = torch.randint(0, 4, (n, 2), generator=g) * PATCH
    for i in torch.nonzero(y).flatten().tolist():
        r, c = corners[i].tolist()
        x[i, :, r:r + PATCH, c:c + PATCH] = 1.0
    return x, y, corners


def test_the_methods_find_a_planted_patch_in_a_trained_vit(one_torch_thread):
    """ToyViT trained (4 epochs of 1024 images, ~2 s) to tell images with the patch from those
    without; each map's positive mass must sit on the patch far above its 1/16 share of the image.
    Measured on seeds 0-3: attnlrp 0.93-0.99, rollout 0.39-0.54, attention_grad 0.04-0.99 (0.54 on seed 0):
    gradient-weighted attention misses on one seed of four."""
    model = ToyViT(classes=2).train()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    x, y, _ = planted(1024, seed=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(4):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[order[i:i + 64]]), y[order[i:i + 64]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    x, y, corners = planted(200, seed=1)
    with torch.no_grad():
        assert (model(x).argmax(dim=1) == y).float().mean() > 0.97, "the planted-feature ViT did not learn the task"
    x, corners = x[y == 1][:16], corners[y == 1][:16]
    for method, least in (("attnlrp", 0.8), ("rollout", 0.3), ("attention_grad", 0.3)):
        maps = get_explainer(method, model).explain(x, torch.ones(len(x), dtype=torch.long)).maps.clamp(min=0)
        on_patch = torch.stack([m[r:r + PATCH, c:c + PATCH].sum() for m, (r, c) in zip(maps, corners.tolist())])
        share = on_patch / maps.sum(dim=(1, 2))
        assert share.mean() > least, f"{method}: {share.mean():.3f} of the map on the patch"


# --- the manifest's record -------------------------------------------------------------------------

@pytest.mark.slow  # two HF folders saved, loaded and preflighted: end to end
def test_preflight_records_what_was_captured_and_names_the_refused_methods(tmp_path):
    import tarfile

    import numpy as np
    from conftest import add_member, png_bytes
    from hf_models import save_folder

    from saliency_audit.pipelines.config.options import UsageError
    from saliency_audit.pipelines.job.preflight import preflight
    from saliency_audit.transforms.io.preprocess import Preprocessing
    from saliency_audit.transforms.model.handler import ExplainConfig
    from saliency_audit.transforms.model.load import ModelSpec

    with tarfile.open(tmp_path / "images.tar", "w") as tar:
        add_member(tar, "a.png", png_bytes(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
    shards, prep = [str(tmp_path / "images.tar")], Preprocessing(channels=3)
    methods = {"rollout": {}, "attention_grad": {}, "attnlrp": {}}
    vit = ExplainConfig(ModelSpec("hf:" + save_folder("vit", tmp_path / "vit")), methods, device="cpu")
    report = preflight(vit, shards, prep, {})["methods"]
    assert report["rollout"]["captured"]["grid"] == [4, 4] and report["attention_grad"]["captured"]["attention_layers"] == 2
    assert report["attnlrp"]["captured"]["rules"]["uniform"] == 4
    convnext = ExplainConfig(ModelSpec("hf:" + save_folder("convnext", tmp_path / "convnext")), methods, device="cpu")
    with pytest.raises(UsageError) as refused:
        preflight(convnext, shards, prep, {})
    assert str(refused.value).splitlines() == [
        f"method {m} cannot explain this model: the model has no attention layers (no softmax over "
        "[batch, heads, tokens, tokens]); use gradcam" for m in ATTENTION_METHODS]


def test_attnlrp_takes_an_in_place_activation_after_a_layer():
    """Squeeze-excitation as timm writes it: a 1x1 convolution, then an in-place ReLU on its output.
    attnlrp's epsilon rule handed out the convolution's output as a view, which may not be changed in
    place: RuntimeError on every image of timm's MobileNetV3, RegNetY and FastViT."""
    class SqueezeExcite(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.reduce, self.expand = (torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1),
                                                   torch.nn.Conv2d(4, 8, 1))
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            gate = self.reduce(x.mean((2, 3), keepdim=True)).relu_()
            return self.head((x * self.expand(gate).sigmoid()).mean((2, 3)))

    torch.manual_seed(0)
    maps = get_explainer("attnlrp", SqueezeExcite().eval()).explain(torch.rand(2, 3, 16, 16), torch.tensor([0, 1])).maps
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all() and maps.flatten(1).std(1).gt(0).all()
