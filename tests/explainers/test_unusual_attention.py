"""Transformers whose tokens or attention are not a ViT's: Hiera keeps its tokens out of raster order
("unrolled") until its last stage, and PVT, CvT and Hiera attend from their tokens to a pooled or
spatially reduced set of keys. A CAM must read a grid only where the tokens are in raster order,
and the methods that compose attention through the layers must refuse what cannot be composed,
rather than read a part of it."""
import pytest
import torch

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.base import UnsupportedModel

t = pytest.importorskip("transformers")


def hiera(size: int = 64):
    torch.manual_seed(0)
    return t.HieraForImageClassification(t.HieraConfig(
        image_size=[size, size], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], num_labels=4))


def pvt():
    torch.manual_seed(0)
    return t.PvtForImageClassification(t.PvtConfig(
        image_size=32, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=4))


def cvt():
    torch.manual_seed(0)  # depth[i] >= i + 1: CvtStage indexes its drop-path list by its stage number
    return t.CvtForImageClassification(t.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3],
                                                   num_labels=4))


def logits(raw):
    from saliency_audit.transforms.model.hf import LogitsOnly
    return LogitsOnly(raw.eval()).eval().requires_grad_(False)


def test_a_hiera_cam_reads_its_tokens_only_where_they_are_in_raster_order():
    """A black image with one bright quadrant: eigencam's map must peak in that quadrant. At 64 px
    Hiera's last grid is 2x2; stepping back to the 4x4 grid, as a CNN's CAM does, read the unrolled
    tokens of the stage before as rows and columns (a bright (0, 3) cell peaked at (3, 1))."""
    raw = hiera()
    with torch.no_grad():  # flat regions' tokens then agree, and the bright quadrant's differ
        for name, p in raw.named_parameters():
            if "position_embedding" in name:
                p.zero_()
    model, found = logits(raw), []
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        x = torch.zeros(1, 3, 64, 64)
        x[:, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = 3.0
        explainer = get_explainer("eigencam", model)
        maps = explainer.explain(x, model(x).argmax(1), torch.arange(1)).maps
        found.append(int(torch.nn.functional.avg_pool2d(maps[None], 32).flatten().argmax()))
    assert explainer.layer_reshape == "tokens -> 2x2 grid" and found == [0, 1, 2, 3]


def test_a_named_hiera_layer_before_its_last_stage_is_refused():
    model, x = logits(hiera()), torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="raster order only at its last stage"):
        get_explainer("gradcam", model, layer="model.hiera.encoder.stages.2.layers.0.layernorm_before").explain(
            x, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("build, size", [(pvt, 32), (cvt, 64), (hiera, 64)], ids=["pvt", "cvt", "hiera"])
@pytest.mark.parametrize("method", ["rollout", "attention_grad"])
def test_attention_that_pools_or_reduces_its_keys_is_not_composed(build, size, method):
    """PVT's first stage attends to keys reduced 2x, its last to its own tokens: rollout read the last
    stage alone (1 of 2 layers); CvT's and Hiera's were refused as having no attention at all."""
    model = logits(build())
    with pytest.raises(UnsupportedModel, match="attend from their tokens to another set") as refusal:
        get_explainer(method, model).explain(torch.rand(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    assert "\n" not in str(refusal.value)


def test_a_cvt_cam_reads_the_tokens_of_its_last_attention_not_its_strided_keys():
    """CvT's attention projects its keys and values through convolutions of stride 2: at 224 px the
    last stage's 14x14 tokens give 7x7 values, and the search took that value projection, the last
    layer with weights on a grid, for the final resolution. The tokens its last attention reads are
    the last block's first norm, class token dropped, as for a ViT."""
    model = logits(cvt())
    explainer = get_explainer("gradcam", model)
    explainer.explain(torch.rand(1, 3, 224, 224), torch.zeros(1, dtype=torch.long))
    assert (explainer.layer_used, explainer.layer_reshape) == (
        "model.cvt.encoder.stages.2.layers.2.layernorm_before", "tokens[1:] -> 14x14 grid")


def test_a_levit_cam_steps_back_to_its_first_stage_s_last_block_not_its_stem():
    """At 64 px LeViT's grids are 4x4, 2x2, 1x1: the CAM steps back to the 4x4 grid, whose stage runs
    its blocks and then its downsampling as one module. Every layer inside a module that takes the
    grid and returns a coarser one was passed over there (a bottleneck's 1x1 reduction must be), so
    the search fell back to the patch embedding, the stem; a residual block is the stage's own."""
    torch.manual_seed(0)
    model = logits(t.LevitForImageClassification(t.LevitConfig(
        image_size=64, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
        num_labels=4)))
    explainer = get_explainer("gradcam", model)
    explainer.explain(torch.rand(1, 3, 64, 64), torch.zeros(1, dtype=torch.long))
    assert (explainer.layer_used, explainer.layer_reshape) == ("model.levit.encoder.stages.0.layers.1",
                                                               "tokens -> 4x4 grid")


@pytest.mark.parametrize("name, size, layer", [("mobilenetv3_small_100", 112, "blocks"),
                                               ("efficientnet_b0", 112, "bn2")])
def test_squeeze_excitation_does_not_count_as_the_grid_collapsing(timm, name, size, layer):
    """At 112 px these end on a 4x4 grid, enough for a CAM; the 1x1 convolutions of their
    squeeze-excitation gates, on pooled 1x1 features, counted as the grid shrinking under 4x4, and
    the search stepped back into the next stage's first block (its expansion's norm)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    explainer = get_explainer("gradcam", model)
    explainer.explain(torch.rand(1, 3, size, size), torch.zeros(1, dtype=torch.long))
    assert explainer.layer_used == layer


def test_attention_weights_are_not_taken_for_a_feature_map():
    """CoAtNet's and MaxViT's 4x4 windows give attention [B,heads,16,16]; at 128 px 16x16 is one of
    the image's grids, and the CAMs took the attention dropout's output for a feature map."""
    from saliency_audit.explainers.cam.base import attention_weights
    scores = torch.randn(2, 3, 16, 16)
    assert attention_weights(scores.softmax(-1)) and not attention_weights(scores)
    assert not attention_weights(scores.relu()) and not attention_weights(torch.rand(2, 3, 16, 8).softmax(-1))


@pytest.mark.parametrize("mean_pooling, row", [(True, "mean of the patch tokens"), (False, "class token (first)")])
def test_rollout_is_read_at_the_tokens_the_head_reads(mean_pooling, row):
    """BEiT (as timm's gap models) may average its patch tokens for the head: rollout read row 0, the
    class token's, which that head never reads (in timm's reg_gap models, a register). The reference:
    Abnar & Zuidema's product of HF's own attentions, read at the rows the head reads."""
    torch.manual_seed(0)
    raw = t.BeitForImageClassification(t.BeitConfig(
        use_mean_pooling=mean_pooling, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=4, image_size=32)).eval()
    raw.set_attn_implementation("eager")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        attentions = raw(pixel_values=x, output_attentions=True).attentions
    eye = torch.eye(17)
    flow = eye.expand(2, -1, -1)
    for a in attentions:
        a = 0.5 * a.mean(dim=1) + 0.5 * eye
        flow = (a / a.sum(dim=-1, keepdim=True)) @ flow
    reference = flow[:, 1:].mean(dim=1) if mean_pooling else flow[:, 0]
    explainer = get_explainer("rollout", logits(raw))
    maps = explainer.explain(x, torch.tensor([0, 1])).maps
    torch.testing.assert_close(maps[:, ::8, ::8], reference[:, 1:].reshape(2, 4, 4))
    assert explainer.captured["row"] == row
