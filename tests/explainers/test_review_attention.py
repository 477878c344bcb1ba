"""Review of 866edb9 (rollout and attention_grad refuse attention to pooled or reduced keys)."""
import torch

from saliency_audit.explainers import get_explainer


def test_volo_s_outlook_attention_is_no_attention_to_another_set_of_keys(timm):
    # VOLO's outlookers weigh each token's k x k neighbours, a softmax over [B,heads,HW,k*k,k*k]: local
    # mixing before its transformer stage, as a hybrid ViT's convolutions; the stage's 4x4 tokens
    # compose as before, yet the five dimensions counted as a rectangular attention and refused the model
    torch.manual_seed(0)
    model = timm.models.volo.VOLO(img_size=64, layers=(1, 1), embed_dims=(32, 64), num_heads=(1, 2),
                                  num_classes=4).eval()
    for method in ("rollout", "attention_grad"):
        explainer = get_explainer(method, model)
        explainer.explain(torch.rand(1, 3, 64, 64), torch.zeros(1, dtype=torch.long))
        assert explainer.captured["grid"] == [4, 4]
