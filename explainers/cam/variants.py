"""The CAM family beside gradcam: Grad-CAM++, HiResCAM, XGradCAM, LayerCAM (gradient-weighted),
ScoreCAM and AblationCAM (forward passes with the layer's channels masked or ablated) and EigenCAM
(the activations' first principal component). Each shares gradcam's layer option, default layer
(choose_layer), reading of token and channels-last outputs as maps, hooked forward and upsampling
(explainers/cam/base.py: CAMBase), and each stores the raw map: pytorch-grad-cam min-max scales
every map to [0,1]; ours equal its maps after that scaling (tests/explainers/test_cam_family.py,
tests/explainers/test_cam_tokens.py)."""
from __future__ import annotations

import torch
from torch import nn

from saliency_audit.explainers.cam.base import CAMBase, GradientCAM
from saliency_audit.explainers.cam.gradcam import GradCAM
from saliency_audit.explainers.core.base import (
    Explanation,
    check_batch,
    check_chunk,
    chunk_within_budget,
    forward_chunk,
)
from saliency_audit.explainers.core.registry import register
from saliency_audit.explainers.core.scores import check_score, target_scores

# Denominators' guards, as pytorch-grad-cam 1.5.7 has them, so maps agree where they bite.
PLUSPLUS_EPS, XGRAD_EPS, MASK_EPS = 1e-6, 1e-7, 1e-8


@register
class HiResCAM(GradCAM):
    """HiResCAM (Draelos & Carin 2020): ReLU(sum_k dy/dA^k * A^k), the gradient times the
    activation at each position, summed over channels. This is exactly ``gradcam`` at its default
    weighting="elementwise" (the same class, registered under the paper's name with the weighting
    fixed), so the two give identical maps. Options: ``layer`` as gradcam's."""

    name = "hirescam"

    def __init__(self, model, layer: str | None = None):
        super().__init__(model, layer, weighting="elementwise")


@register
class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with exp(score) approximated as in the paper and
    pytorch-grad-cam): w_k = sum_ij alpha_ij^k ReLU(g_ij^k), alpha = g^2 / (2 g^2 + sum_ab A_ab^k g^3),
    zero where g is 0; map ReLU(sum_k w_k A^k). g: the target logit's gradient at the layer."""

    name = "gradcampp"
    caveats = {"cascading": (
        "Expected for Grad-CAM++: its channel weights are never negative, so its map is close to the layer's "
        "summed activations, which still outline the object in a network with random weights (reference MNIST "
        "CNN: 0.87, the same with pytorch-grad-cam). Use gradcam or hirescam to check that the map depends on "
        "the trained weights.")}
    agrees_at = ("bf16",)  # rank correlation with float32's maps 0.999 or more (docs/performance.md)

    def _cam(self, a, grads):
        g2 = grads ** 2
        alpha = g2 / (2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g2 * grads + PLUSPLUS_EPS)
        alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
        weights = (torch.relu(grads) * alpha).sum(dim=(2, 3), keepdim=True)
        return (weights * a).sum(dim=1)


@register
class XGradCAM(GradientCAM):
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij g_ij^k A_ij^k / sum_ij A_ij^k; map ReLU(sum_k w_k A^k)."""

    name = "xgradcam"

    def _cam(self, a, grads):
        weights = (grads * a).sum(dim=(2, 3), keepdim=True) / (a.sum(dim=(2, 3), keepdim=True) + XGRAD_EPS)
        return (weights * a).sum(dim=1)


@register
class LayerCAM(GradientCAM):
    """LayerCAM (Jiang et al. 2021): ReLU(sum_k ReLU(g^k) * A^k), positive gradients only, per position."""

    name = "layercam"
    caveats = {"cascading": (
        "Expected for LayerCAM: it keeps only the positive gradients, so its map is a positively weighted sum of "
        "the layer's activations, and those still outline the object in a network with random weights "
        "(reference MNIST CNN: 0.59, the same with pytorch-grad-cam). Use gradcam or hirescam to check that the "
        "map depends on the trained weights.")}

    def _cam(self, a, grads):
        return (torch.relu(grads) * a).sum(dim=1)


class ChannelCAM(CAMBase):
    """A CAM whose channel weights come from forward passes, one per (image, channel) row: the layer's
    output A [B,K,h,w] (as maps: see CAMBase) from one forward, then ``_row_scores`` over the B*K rows
    in chunks of at most ``max_forward_batch`` (default None: 32 on CPU, 1024 on an accelerator; fewer
    for large images), which bounds memory whatever the batch, image size and channel count; map
    ReLU(sum_k w_k A^k).
    Rows of several images share a chunk, so a map equals its image's map alone up to float rounding
    (the model is run with a layer's output replaced, no decision is taken on it).

    Cost: 1 + K forwards per image (K: the layer's channels, 512 at a ResNet-18's last stage), no
    backward. passes() reports the K of the last batch; before the first it assumes the model's last
    Conv2d's out_channels. These methods need no gradient but hook a module, so ``needs_gradients``
    stays True: an ONNX file or an endpoint has no modules to hook and is refused in preflight."""

    def __init__(self, model, layer: str | None = None, max_forward_batch: int | None = None):
        super().__init__(model, layer)
        check_chunk("max_forward_batch", max_forward_batch)
        self.max_forward_batch = max_forward_batch
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self._channels = convs[-1].out_channels if convs else 1

    def passes(self):
        return {"forward": 1 + self._channels, "backward": 0}

    def _row_scores(self, images, targets, a, raw, logits, rows):
        """Per row (image b = rows // K, channel k = rows % K) the number the weight is made of; ``a``:
        the layer's output as maps [B,K,h,w], ``raw``: as the layer gives it."""
        raise NotImplementedError

    def _weights(self, scores, logits, targets):
        """Channel weights [B,K] from the rows' scores [B,K]."""
        raise NotImplementedError

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets).detach()
        targets = targets.to(images.device).long()
        logits, raw, grid = self._forward(images, targets, grad=False)
        a = self._wide(grid.maps(raw))
        batch, self._channels = a.shape[:2]
        chunk = chunk_within_budget(forward_chunk(self.max_forward_batch, images.device), images.shape[1:],
                                    images.device)
        rows = torch.arange(batch * self._channels, device=images.device)
        scores = torch.cat([self._row_scores(images, targets, a, raw, logits, rows[i:i + chunk])
                            for i in range(0, len(rows), chunk)])
        weights = self._weights(scores.reshape(batch, self._channels), logits, targets)
        cam = torch.relu((weights[:, :, None, None] * a).sum(dim=1))
        return Explanation(self._upsample(cam, images.shape[2:]))


@register
class ScoreCAM(ChannelCAM):
    """Score-CAM (Wang et al. 2020): each channel's map, upsampled to the input and min-max scaled to
    [0,1], masks the image (image x mask); w_k = the target's ``score`` for that masked image.

    score: "probability" (default: the softmax probability, as the paper's reference code) or
        "log_odds", "margin", "logit" (saliency_audit.explainers.core.scores). pytorch-grad-cam weighs by the
        softmax over channels of its target's value: with the log-probability as that target,
        its weights are ours divided by their sum per image, the same map up to scale. The
        probability saturates on a confident model (every masked image at 1.0 weighs all
        channels alike); "log_odds" does not.
    max_forward_batch: see ChannelCAM. pytorch-grad-cam has no option that caps ScoreCAM's K
        forwards per image, and neither has this.

    Masks are upsampled as the maps are (bilinear, pixel centres aligned, as the reference code);
    pytorch-grad-cam aligns the corners instead, so at a layer smaller than the input its masks, and
    its maps, differ slightly from these. A constant channel masks with 0 (1e-8 guard, as there).
    """

    name = "scorecam"
    caveats = {"cascading": (
        "Expected for Score-CAM: every channel's weight is a probability, never negative, and a model with random "
        "weights gives nearly the same probability for every channel, so the map becomes the layer's summed "
        "activations, which still outline the object (reference MNIST CNN: 0.88, the same with pytorch-grad-cam). "
        "Use gradcam or ablationcam to check that the map depends on the trained weights.")}

    def __init__(self, model, layer: str | None = None, score: str = "probability",
                 max_forward_batch: int | None = None):
        super().__init__(model, layer, max_forward_batch)
        check_score(score)
        self.score = score

    def _row_scores(self, images, targets, a, raw, logits, rows):
        b, k = rows // a.shape[1], rows % a.shape[1]
        masks = self._upsample(a[b, k], images.shape[2:])
        low, high = masks.amin(dim=(1, 2), keepdim=True), masks.amax(dim=(1, 2), keepdim=True)
        masks = (masks - low) / (high - low + MASK_EPS)
        with torch.no_grad():
            return target_scores(self.model(images[b] * masks[:, None]), targets[b], self.score)

    def _weights(self, scores, logits, targets):
        return scores


@register
class AblationCAM(ChannelCAM):
    """Ablation-CAM (Desai & Ramaswamy 2020): channel k of the layer's output set to 0, the rest of the
    network run on; w_k = (y - y_k) / y with y the target logit and y_k the same with channel k ablated
    (as pytorch-grad-cam). A target logit of exactly 0 gives non-finite weights (the formula's).

    Ablation is zeroing, as in the paper; pytorch-grad-cam zeroes too where the layer's minimum is 0
    (every post-ReLU layer in practice) and otherwise writes min - 1e7, which this does not follow.
    pytorch-grad-cam's ratio_channels_to_ablate (an experimental cap: it ablates only channels an
    EigenCAM mask ranks high or low, giving the others weight 0; default 1.0, all channels) is not
    offered: the cost is 1 + K forwards per image. max_forward_batch: see ChannelCAM.

    On a transformer's tokens the channel is ablated on the patch grid, the map it weighs; the class,
    distillation and register tokens keep theirs. pytorch-grad-cam's AblationLayerVit ablates the
    channel on every token, the class token's included, and at min - 1e7 (a LayerNorm's output is
    negative somewhere), which removes more than the map."""

    name = "ablationcam"

    def _row_scores(self, images, targets, a, raw, logits, rows):
        b, k = rows // a.shape[1], rows % a.shape[1]
        ablated = a[b].clone()
        ablated[torch.arange(len(rows), device=a.device), k] = 0
        return self._forward_replacing(images[b], ablated, raw[b]).gather(1, targets[b, None]).squeeze(1).float()

    def _weights(self, scores, logits, targets):
        y = logits.gather(1, targets[:, None]).float()
        return (y - scores) / y


@register
class EigenCAM(CAMBase):
    """Eigen-CAM (Muhammad & Yeasin 2020): the layer's output, positions x channels, centred per
    channel (as pytorch-grad-cam), projected on its first principal component; map ReLU of that.

    It ignores the target: the same map for every class. An SVD leaves the component's sign open;
    pytorch-grad-cam 1.5.7's EigenCAM keeps whatever sign its SVD returns, so its map is that of the
    projection or of its negative. Here the sign is fixed as pytorch-grad-cam's Seg-Eigen-CAM fixes
    it (Chung & Ying 2025, eq. 13): flipped where |min| > |max|, so the larger extreme is positive.
    Cost: 1 forward, no backward; the module hook still rules out black boxes (needs_gradients)."""

    name = "eigencam"
    caveats = {"cascading": (
        "Expected for EigenCAM: it uses neither gradients nor the class, only the dominant pattern of the layer's "
        "activations, and in a network with random weights that pattern still outlines the object, with the "
        "background at 0 in both maps. Use gradcam or hirescam to check that the map depends on the trained "
        "weights.")}
    agrees_at = ("bf16",)  # rank correlation with float32's maps 0.99999 or more (docs/performance.md)

    def passes(self):
        return {"forward": 1, "backward": 0}

    def explain(self, images, targets, seeds=None):
        images = check_batch(images, targets).detach()
        _, raw, grid = self._forward(images, targets, grad=False)
        a = grid.maps(raw)
        batch, _, h, w = a.shape
        positions = a.float().flatten(2).transpose(1, 2)  # [B, h*w, K]
        positions = positions - positions.mean(dim=1, keepdim=True)
        # the projection on the first principal direction, X v = sigma u (up to its sign, set below),
        # from the smaller of the two scatter matrices, at a fraction of the SVD's cost: the K x K one
        # (v) on a fine grid, the positions' Gram matrix (u) where channels outnumber positions, as
        # ResNet-50's 2,048 channels do its 7 x 7 positions at 224 px (0.001 s instead of 1.2 s an image)
        if positions.shape[1] < positions.shape[2]:
            values, vectors = torch.linalg.eigh(positions @ positions.transpose(1, 2))
            projection = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()  # [B, h*w]
        else:
            _, vectors = torch.linalg.eigh(positions.transpose(1, 2) @ positions)
            projection = (positions @ vectors[:, :, -1:]).squeeze(2)  # [B, h*w]
        flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
        projection = torch.where(flip[:, None], -projection, projection)
        cam = torch.relu(projection).reshape(batch, h, w)
        return Explanation(self._upsample(cam, images.shape[2:]))
