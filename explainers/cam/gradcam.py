"""Grad-CAM (Selvaraju et al. 2017) and HiResCAM (Draelos & Carin 2020), and the layer machinery
every CAM shares (CAMBase, GradientCAM; the other CAMs are in explainers/cam/variants.py)."""
from __future__ import annotations

from saliency_audit.explainers.cam.base import WEIGHTINGS, GradientCAM
from saliency_audit.explainers.core.registry import register


@register
class GradCAM(GradientCAM):
    """ReLU(sum_k w_k A^k) at one layer's output A [B,K,h,w], upsampled to the input. Unsigned.

    layer: name of the module whose output is A (as in ``model.named_modules()``); a transformer's
        tokens or a channels-last output are read as maps (CAMBase). Default None: the last
        representation of the grid that the target reads (see choose_layer: a CNN's last conv
        block's activated output, a ViT's last block's first norm; ``layer_used`` and
        ``layer_reshape`` name it and its reshape after a call). The old default, the last
        Conv2d's own output, is its pre-activation: its negative values, which the model's ReLU
        discards, entered the sum, so on a Keras-style MNIST CNN (three conv+ReLU+pool blocks,
        two dense layers, 10 epochs on 5,000 digits; first 100 test digits, deletion AUC with a
        zero substrate) Grad-CAM was at 0.84 of a random map's AUC with 28 all-zero maps, and
        at 0.66 with none on the activated output; on the demo CNN 0.62 (20 all-zero) -> 0.35 (2).
    weighting: "elementwise" (default): w_k = d logit_target / d A^k at each position (HiResCAM,
        Draelos & Carin 2020), i.e. gradient x activation at the layer summed over channels;
        "mean": w_k = its spatial mean (Grad-CAM as published). The two are equal for networks
        that global-average-pool A straight into a linear head (ResNets); with a dense head the
        gradient differs per position and its mean throws that away: on the same Keras-style
        CNN "mean" was at 0.66 of random and "elementwise" 0.42; on four briefly trained copies
        (2 epochs, seeds 0-3) 0.60-0.97 against 0.35-0.54; on the demo CNN 0.35 against 0.25.
        Elementwise is also the same on a layer's pre- and post-ReLU output.

    Values are raw: no per-image min-max scaling (pytorch-grad-cam's default), so maps
    stay comparable across images and models.  The map is upsampled bilinearly from h x w
    to the input size.  Cost: 1 forward + 1 backward (down to the layer only) per image.
    """

    name = "gradcam"
    # rank correlation with float32's maps 0.9996 or more at the default weighting (docs/performance.md)
    agrees_at = ("bf16",)

    def __init__(self, model, layer: str | None = None, weighting: str = "elementwise"):
        super().__init__(model, layer)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"gradcam: weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting

    def _cam(self, a, grads):
        weights = grads.mean(dim=(2, 3), keepdim=True) if self.weighting == "mean" else grads
        return (weights * a).sum(dim=1)
