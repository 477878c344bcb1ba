"""The CAM family on token grids and channels-last layers (issue 25). The layer search finds, from
module outputs and gradients alone, the last representation of the image's grid that the target
reads: a ViT's and DeiT's last block's first norm (the last block's own patch tokens get no
gradient from the class token), Swin's last norm, ConvNeXt's and ResNet's last stage; it drops
class, distillation and register tokens and reads [B,h*w,K] tokens and [B,h,w,K] outputs as maps.
Checked against pytorch-grad-cam with its reshape_transform recipes at the same layers.

Models: tests/hf_models.py (tiny random-weight `transformers` models, 32 px), timm's ViT with
register tokens and Swin (channels last), and a torchvision-style ViT written here with
nn.MultiheadAttention, an implementation the search has no names for."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import torchvision_stand_in
from hf_models import FAMILIES, logits_model, save_folder
from torch import nn

from saliency_audit.explainers import get_explainer, list_methods
from saliency_audit.explainers.cam.base import CAMBase
from saliency_audit.explainers.core.registry import explainer_class

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAMS = [name for name in list_methods() if issubclass(explainer_class(name), CAMBase)]


@pytest.fixture(scope="module")
def models():
    return {family: logits_model(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def timm_models():
    """timm's ViT with 4 register tokens (class-token pooling) and Swin (channels-last stages)."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm==1.0.31)")
    with torchvision_stand_in():
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return {"vit_reg": VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                                         reg_tokens=4, num_classes=10).eval(),
            "swin": SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1),
                                    num_heads=(1, 2), num_classes=10).eval()}


@pytest.fixture(scope="module")
def grad_cam_lib():
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip("pytorch-grad-cam is not installed (pip install --no-deps grad-cam==1.5.7 ttach "
                    "opencv-python-headless)")
    with torchvision_stand_in():
        import pytorch_grad_cam
        import pytorch_grad_cam.utils.model_targets
    return pytorch_grad_cam


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


class TorchvisionStyleViT(nn.Module):
    """torchvision's ViT layout at toy size: conv patch embedding, class token, pre-norm blocks with
    nn.MultiheadAttention (whose fused kernel leaves no projection modules to hook), head on the
    class token."""

    def __init__(self, width: int = 16, depth: int = 2, patch: int = 8, size: int = 32, classes: int = 10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, width, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, width) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "ln_1": nn.LayerNorm(width), "self_attention": nn.MultiheadAttention(width, 2, batch_first=True),
            "ln_2": nn.LayerNorm(width), "mlp": nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                                              nn.Linear(2 * width, width))}) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embedding
        for block in self.blocks:
            y = block["ln_1"](x)
            x = x + block["self_attention"](y, y, y, need_weights=False)[0]
            x = x + block["mlp"](block["ln_2"](x))
        return self.head(self.ln(x)[:, 0])


class EncoderViT(nn.Module):
    """A ViT on torch's own pre-norm nn.TransformerEncoder: its blocks' first norm feeds the attention."""

    def __init__(self, width: int = 16, patch: int = 8, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0,
                                                                        batch_first=True, norm_first=True),
                                             2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1))[:, 0])


def patch_gradient(model, module, x, prefix: int) -> float:
    """The largest |d target logit / d output| over the patch tokens of ``module``'s output."""
    outputs = []
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    grad, = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), outputs[0])
    return float(grad[:, prefix:].abs().max())


# family -> the module the search must find, and how it reads its output
EXPECTED = {
    "vit": (lambda m: m.model.vit.layers[-1].layernorm_before, "tokens[1:] -> 4x4 grid"),
    "deit": (lambda m: m.model.deit.layers[-1].layernorm_before, "tokens[2:] -> 4x4 grid"),
    "swin": (lambda m: m.model.swin.layernorm, "tokens -> 8x8 grid"),
    "convnext": (lambda m: m.model.convnext.encoder.stages[-1], None),
    "resnet50": (lambda m: m.model.resnet.encoder.stages[-1], None),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_layer_is_the_last_grid_the_target_reads(models, family):
    model = models[family]
    explainer = get_explainer("gradcam", model)
    assert explainer.layer_used is None and explainer.layer_reshape is None  # settled by the first batch
    explainer.explain(images(), predicted(model, images()))
    module, reshape = EXPECTED[family]
    # before: the only Conv2d, the patch embedding, on ViT, DeiT and Swin
    assert dict(model.named_modules())[explainer.layer_used] is module(model)
    assert explainer.layer_reshape == reshape


@pytest.mark.parametrize("family, prefix", [("vit", 1), ("deit", 2)])
def test_why_the_last_blocks_first_norm(models, family, prefix):
    """The last block's output reaches the logits only through its prefix tokens: its patch tokens'
    gradient is exactly 0, so a CAM there is 0. Its first norm's tokens are read by the class token."""
    model = models[family]
    last = getattr(model.model, family).layers[-1]
    x = images()
    assert patch_gradient(model, last, x, prefix) == 0
    assert patch_gradient(model, last.layernorm_before, x, prefix) > 0


def test_implementations_without_known_names(timm_models):
    """A torchvision-style ViT, one on torch's nn.TransformerEncoder and timm's ViT with register
    tokens: the last block's first norm, the class token (and the 4 registers) dropped."""
    torch.manual_seed(0)
    torchvision_style, encoder = TorchvisionStyleViT().eval(), EncoderViT().eval()
    for model, module, reshape in (
            (torchvision_style, torchvision_style.blocks[-1]["ln_1"], "tokens[1:] -> 4x4 grid"),
            (encoder, encoder.encoder.layers[-1].norm1, "tokens[1:] -> 4x4 grid"),
            (timm_models["vit_reg"], timm_models["vit_reg"].blocks[-1].norm1, "tokens[5:] -> 4x4 grid")):
        for name in ("gradcam", "eigencam"):  # a backward, and a forward without gradients
            explainer = get_explainer(name, model)
            maps = explainer.explain(images(), predicted(model, images())).maps
            assert dict(model.named_modules())[explainer.layer_used] is module, name
            assert explainer.layer_reshape == reshape and maps.flatten(1).std(1).min() > 0, name


def test_registers_are_dropped_where_the_head_pools_the_patches():
    """HF DINOv2 with registers classifies the class token with the patches' mean: the patch tokens of
    the final norm get a gradient, so the search keeps them there, without the class and 4 registers."""
    import transformers

    from saliency_audit.transforms.model.hf import LogitsOnly
    torch.manual_seed(0)
    model = LogitsOnly(transformers.Dinov2WithRegistersForImageClassification(transformers.Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_register_tokens=4, num_labels=10))).eval()
    explainer = get_explainer("gradcam", model)
    explainer.explain(images(), predicted(model, images()))
    assert dict(model.named_modules())[explainer.layer_used] is model.model.dinov2_with_registers.layernorm
    assert explainer.layer_reshape == "tokens[5:] -> 4x4 grid"


def test_a_stepped_back_convnext_stage_is_read_at_the_norm_that_takes_it():
    """A 3-stage ConvNeXt at 32 px has grids 8x8, 4x4 and 2x2, so the search steps back to the first
    stage. Its output reaches the target only through the next stage's downsampling LayerNorm, which
    divides out each position's scale: gradient x activation there sums to 0 over channels at every
    position, and gradcam's default map was float noise. The norm's output is taken instead."""
    import transformers

    from saliency_audit.transforms.model.hf import LogitsOnly
    torch.manual_seed(0)
    model = LogitsOnly(transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_labels=10))).eval()
    x, stages = images(), model.model.convnext.encoder.stages
    maps = {}
    for name in ("gradcam", "eigencam"):
        explainer = get_explainer(name, model)
        maps[name] = explainer.explain(x, predicted(model, x)).maps
        assert dict(model.named_modules())[explainer.layer_used] is stages[1].downsampling_layer[0], name
        assert maps[name].flatten(1).std(1).min() > 0, name
    at_stage = get_explainer("gradcam", model, layer="model.convnext.encoder.stages.0").explain(x, predicted(model, x))
    assert at_stage.maps.abs().max() < 1e-4 * maps["gradcam"].abs().max()  # why: noise at the stage's output


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cam_gives_finite_maps_on_every_family(models, family):
    model = models[family]
    x = images()
    with torch.no_grad():
        ranked = model(x).argsort(1, descending=True)
    for name in CAMS:
        explainer = get_explainer(name, model)
        # random weights: a CAM can be 0 everywhere for one class (ReLU of evidence that is negative
        # everywhere), so each image is asked for its three highest classes
        maps = torch.stack([explainer.explain(x, ranked[:, j]).maps for j in range(3)], dim=1)
        assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all(), name
        assert (maps.flatten(2).std(2).amax(1) > 0).all(), name
        assert dict(model.named_modules())[explainer.layer_used] is EXPECTED[family][0](model), name


def grid_recipe(prefix: int, height: int, width: int):
    """pytorch-grad-cam's reshape_transform for ViT and Swin (its tutorials): drop the class token(s),
    tokens to the grid, channels first."""
    def reshape(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape


def channels_last_recipe(tensor):
    return tensor.permute(0, 3, 1, 2)


REFERENCE = {"hirescam": "HiResCAM", "gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "layercam": "LayerCAM",
             "xgradcam": "XGradCAM", "eigencam": "EigenCAM"}


def assert_equals_pytorch_grad_cam(lib, name, model, module_name, reshape, x, **options):
    """Our map (at ``module_name``, named) against pytorch-grad-cam's at that module with ``reshape``:
    raw, against its unnormalised map upsampled as ours, and its min-max scaled output."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    t = predicted(model, x)
    ours = get_explainer(name, model, layer=module_name, **options).explain(x, t).maps
    module = dict(model.named_modules())[module_name]
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    reference = getattr(lib, REFERENCE[name])(model, [module], reshape_transform=reshape)
    normalised = torch.from_numpy(reference(input_tensor=x, targets=targets))
    stored = reference.activations_and_grads
    grads = stored.gradients[0].numpy() if stored.gradients else None
    raw = torch.from_numpy(np.asarray(reference.get_cam_image(x, module, targets, stored.activations[0].numpy(),
                                                              grads, False)))
    stored.release()
    compared = ours.flatten(1).amax(1) > 1e-4  # its min-max scaling adds 1e-7 to the peak: not for tiny maps
    if name == "eigencam":  # its sign is whatever its SVD returned; ours: the larger extreme positive
        flip = raw.flatten(1).amin(1).abs() > raw.flatten(1).amax(1).abs()
        raw = torch.where(flip[:, None, None], -raw, raw)
        compared &= ~flip
    expected = CAMBase._upsample(torch.relu(raw), x.shape[2:])
    assert ours.amax() > 0, (name, module_name)
    assert (ours - expected).abs().amax() <= 1e-5 * ours.abs().amax(), (name, module_name)
    scaled = ours - ours.amin(dim=(1, 2), keepdim=True)
    scaled = scaled / scaled.amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    assert ((scaled - normalised).abs().amax(dim=(1, 2))[compared] < 5e-3).all(), (name, module_name)


@pytest.mark.parametrize("name, options", [("hirescam", {}), ("gradcam", {"weighting": "mean"}), ("gradcampp", {}),
                                           ("layercam", {}), ("xgradcam", {}), ("eigencam", {})])
def test_vit_equals_pytorch_grad_cam_with_its_reshape_recipe(grad_cam_lib, models, name, options):
    model = models["vit"]
    assert_equals_pytorch_grad_cam(grad_cam_lib, name, model, "model.vit.layers.1.layernorm_before",
                                   grid_recipe(1, 4, 4), images(), **options)


@pytest.mark.parametrize("case", ["deit", "swin", "swin-stage", "convnext-channels-last", "timm-swin",
                                  "timm-vit-registers"])
def test_other_layouts_equal_pytorch_grad_cam(grad_cam_lib, models, timm_models, case):
    """DeiT's 2 prefix tokens, HF Swin's [B,h*w,K] (its final norm, and a stage named by the user),
    a channels-last ConvNeXt layer named by the user, timm's BHWC Swin and its ViT with registers."""
    model, layer, reshape = {
        "deit": (models["deit"], "model.deit.layers.1.layernorm_before", grid_recipe(2, 4, 4)),
        "swin": (models["swin"], "model.swin.layernorm", grid_recipe(0, 8, 8)),
        "swin-stage": (models["swin"], "model.swin.encoder.layers.0.blocks.0.layernorm_before",
                       grid_recipe(0, 16, 16)),
        "convnext-channels-last": (models["convnext"], "model.convnext.encoder.stages.1.layers.0.pwconv2",
                                   channels_last_recipe),
        "timm-swin": (timm_models["swin"], "norm", channels_last_recipe),
        "timm-vit-registers": (timm_models["vit_reg"], "blocks.1.norm1", grid_recipe(5, 4, 4)),
    }[case]
    for name, options in (("hirescam", {}), ("gradcam", {"weighting": "mean"})):
        assert_equals_pytorch_grad_cam(grad_cam_lib, name, model, layer, reshape, images(), **options)


def test_timm_swin_default_layer_is_its_channels_last_norm(timm_models):
    model = timm_models["swin"]
    explainer = get_explainer("hirescam", model)
    explainer.explain(images(), predicted(model, images()))
    assert explainer.layer_used == "norm" and explainer.layer_reshape == "BHWC -> BCHW"


def brute_force_ablation(model, module, prefix: int, x, t) -> torch.Tensor:
    """Ablation-CAM by hand: channel k of the module's output (a tuple's first element) zeroed on the
    patch tokens, w_k = (y - y_k) / y, map ReLU(sum_k w_k A^k) upsampled."""
    def forward(k=None):
        def hook(m, i, o):
            tokens = (o[0] if isinstance(o, tuple) else o).clone()
            if k is not None:
                tokens[:, prefix:, k] = 0
            kept.append(tokens)
            return (tokens, *o[1:]) if isinstance(o, tuple) else tokens
        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(x).gather(1, t[:, None]).squeeze(1)
        finally:
            handle.remove()
    kept = []
    y = forward()
    a = kept[0][:, prefix:]
    weights = torch.stack([(y - forward(k)) / y for k in range(a.shape[2])], dim=1)
    side = int(a.shape[1] ** 0.5)
    cam = (weights[:, None, :] * a).sum(2).reshape(len(x), side, side)
    return CAMBase._upsample(torch.relu(cam), x.shape[2:])


@pytest.mark.parametrize("family, layer, prefix", [
    ("deit", None, 2),  # the default layer, class and distillation tokens kept
    ("swin", "model.swin.encoder.layers.0", 0),  # a stage named by the user, whose output is a tuple
])
def test_ablationcam_ablates_channels_of_the_patch_grid(models, family, layer, prefix):
    model = models[family]
    x = images(seed=3)
    with torch.no_grad():
        t = model(x).argsort(1)[:, -2]  # a class whose map is not 0 everywhere on these random weights
    explainer = get_explainer("ablationcam", model, layer=layer, max_forward_batch=5)  # chunks straddle images
    maps = explainer.explain(x, t).maps
    expected = brute_force_ablation(model, dict(model.named_modules())[explainer.layer_used], prefix, x, t)
    assert maps.amax() > 0
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5 * float(maps.abs().amax()))


def test_a_named_layer_without_a_grid_is_refused_in_one_line(models):
    model = models["vit"]
    explainer = get_explainer("gradcam", model, layer="model.classifier")
    with pytest.raises(ValueError, match=r"^gradcam: layer 'model.classifier' must output \[B,K,h,w\], \[B,h,w,K\] "
                                         r"or patch tokens \[B,T,K\] over the image's grid, got \(2, 10\)$"):
        explainer.explain(images(), torch.tensor([0, 1]))


@pytest.mark.slow  # a whole run (about 10 s on 2 cores)
def test_the_manifest_records_the_layer_and_its_reshape(demo_shard, tmp_path):
    from saliency_audit.pipelines import audit
    folder = save_folder("vit", tmp_path / "vit")
    assert audit.main(["--input", str(demo_shard), "--limit-per-shard", "1", "--model", f"hf:{folder}",
                       "--resize", "32,32", "--channels", "3", "--methods", "gradcam", "--device", "cpu",
                       "--output", str(tmp_path / "out")]) == 0
    recorded = json.loads((tmp_path / "out" / "manifest.json").read_text())["methods"]["gradcam"]
    assert recorded["layer_used"] == "model.vit.layers.1.layernorm_before"
    assert recorded["layer_reshape"] == "tokens[1:] -> 4x4 grid"
