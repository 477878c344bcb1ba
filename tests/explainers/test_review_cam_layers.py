"""Review of 866edb9 (Hiera's unrolled tokens): which models count as unrolled."""
import torch

from saliency_audit.explainers import get_explainer


def test_sam2_s_hieradet_keeps_its_tokens_in_raster_order_so_an_earlier_layer_may_be_named(timm):
    # timm's HieraDet (SAM 2's image encoder) lays its tokens out [B,H,W,C] at every stage and
    # never unrolls them; its class name begins with "Hiera" all the same
    torch.manual_seed(0)
    model = timm.create_model("hieradet_small", pretrained=False, num_classes=4).eval()
    explainer = get_explainer("gradcam", model, layer="blocks.3")
    explainer.explain(torch.rand(1, 3, 128, 128), torch.zeros(1, dtype=torch.long))
    assert (explainer.layer_used, explainer.layer_reshape) == ("blocks.3", "BHWC -> BCHW")
