"""The CAM family (explainers/cam/variants.py) against pytorch-grad-cam, the independent reference: raw maps
equal its unnormalised maps at the layer (upsampled as ours are), and its normalised output equals
ours after its min-max scaling; batch independence, raw values, options."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import torchvision_stand_in
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.cam.base import CAMBase
from saliency_audit.explainers.core.base import UnsupportedModel
from saliency_audit.pipelines.training.reference_model import MnistCNN, ResNet18

GRAD_CAM_INSTALL = "pip install --no-deps grad-cam==1.5.7 ttach opencv-python-headless"
METHODS = ["hirescam", "gradcampp", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam"]
FORWARD_ONLY = ["scorecam", "ablationcam", "eigencam"]


# small models and many small forwards: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def grad_cam_lib():
    """pytorch_grad_cam, imported with torchvision stand-ins (see conftest.torchvision_stand_in)."""
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        pytest.skip(f"pytorch-grad-cam is not installed ({GRAD_CAM_INSTALL})")
    with torchvision_stand_in():
        import pytorch_grad_cam
        import pytorch_grad_cam.utils.model_targets
    return pytorch_grad_cam


class LogProbability:
    """A pytorch-grad-cam target: the log softmax probability. Its ScoreCAM weighs channels by the
    softmax over channels of the target, which of log p is p / sum(p): ours (p) up to a factor."""

    def __init__(self, category: int):
        self.category = category

    def __call__(self, output):
        return torch.log_softmax(output, dim=-1)[..., self.category]


def cases():
    """(model, images, layer): a plain CNN at its last ReLU (14 px of 28) and at its first (28 px,
    no interpolation anywhere), and a ResNet-18 shape at layer2 (4 px of 32)."""
    torch.manual_seed(0)
    cnn = MnistCNN(conv_channels=(4, 8), hidden=16).eval()
    resnet = ResNet18(width=4, in_channels=3).eval()
    g = torch.Generator().manual_seed(1)
    return [(cnn, torch.rand(4, 1, 28, 28, generator=g), "relu2"),
            (cnn, torch.rand(4, 1, 28, 28, generator=g), "relu1"),
            (resnet, torch.rand(4, 3, 32, 32, generator=g), "layer2")]


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image, per image."""
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / (1e-7 + maps.amax(dim=(1, 2), keepdim=True))


REFERENCE = {"hirescam": "HiResCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
             "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "eigencam": "EigenCAM"}


@pytest.mark.parametrize("name", METHODS)
def test_maps_equal_pytorch_grad_cams(grad_cam_lib, name):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    for model, x, layer in cases():
        with torch.no_grad():
            t = model(x).argmax(1)
        ours = get_explainer(name, model, layer=layer).explain(x, t).maps
        assert all(not m._forward_hooks for m in model.modules())
        module = dict(model.named_modules())[layer]
        targets = [(LogProbability if name == "scorecam" else ClassifierOutputTarget)(int(c)) for c in t]
        reference = getattr(grad_cam_lib, REFERENCE[name])(model, [module])
        normalised = torch.from_numpy(reference(input_tensor=x, targets=targets))
        # its raw map at the layer, from the activations and gradients of the same call
        stored = reference.activations_and_grads
        grads = stored.gradients[0].numpy() if stored.gradients else None
        raw = torch.from_numpy(np.asarray(reference.get_cam_image(x, module, targets, stored.activations[0].numpy(),
                                                                  grads, False)))
        if name == "eigencam":  # its sign is whatever its SVD returned; ours: the larger extreme positive
            flip = raw.flatten(1).amin(1).abs() > raw.flatten(1).amax(1).abs()
            raw = torch.where(flip[:, None, None], -raw, raw)
        expected = CAMBase._upsample(torch.relu(raw), x.shape[2:])
        if name == "scorecam":  # its weights are ours over their sum per image
            expected = expected * (ours.sum((1, 2)) / expected.sum((1, 2)))[:, None, None]
        # ScoreCAM's masks: it aligns corners when it upsamples them, we align pixel centres (as the maps)
        rtol = 5e-3 if name == "scorecam" and x.shape[2:] != stored.activations[0].shape[2:] else 1e-5
        assert ours.amax() > 0, (name, layer)
        assert (ours - expected).abs().amax() <= rtol * ours.abs().amax(), (name, layer)
        # the normalised maps, resized by cv2 there; 5e-3: its 1e-7 guard against maps of ~1e-4 (xgradcam)
        same_sign = ~flip if name == "eigencam" else torch.ones(len(x), dtype=torch.bool)
        assert ((min_max(ours) - normalised).abs().amax(dim=(1, 2))[same_sign] < 5e-3).all(), (name, layer)
        stored.release()


@pytest.mark.parametrize("name", METHODS)
def test_an_images_map_does_not_depend_on_the_batch(demo_model, demo_images, name):
    x, _ = demo_images
    x = x[:5]
    with torch.no_grad():
        t = demo_model(x).argmax(1)
    options = {"max_forward_batch": 7} if name in ("scorecam", "ablationcam") else {}  # chunks straddle images
    explainer = get_explainer(name, demo_model, **options)
    batched = explainer.explain(x, t).maps
    assert explainer.layer_used == "relu2"
    alone = torch.cat([explainer.explain(x[i:i + 1], t[i:i + 1]).maps for i in range(len(x))])
    assert batched.amax() > 0
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5 * float(batched.abs().amax()))


def scaled(model: MnistCNN, conv2: float = 1.0, fc1: float = 1.0, fc2: float = 1.0) -> MnistCNN:
    """A copy with conv2 (weight and bias), fc1's weight and fc2 (weight and bias) scaled."""
    copy = MnistCNN(conv_channels=(4, 8), hidden=16).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for module, factor, parts in ((copy.conv2, conv2, ("weight", "bias")), (copy.fc1, fc1, ("weight",)),
                                      (copy.fc2, fc2, ("weight", "bias"))):
            for part in parts:
                getattr(module, part).mul_(factor)
    return copy


@pytest.mark.parametrize("name, factors", [
    ("hirescam", {"fc2": 2.0}), ("xgradcam", {"fc2": 2.0}), ("layercam", {"fc2": 2.0}),
    # the first principal component of twice the activations
    ("eigencam", {"conv2": 2.0}),
    # the layer doubles and fc1 halves: the same model, the same weights on twice the activations
    ("scorecam", {"conv2": 2.0, "fc1": 0.5}),
    ("ablationcam", {"conv2": 2.0, "fc1": 0.5}),
])
def test_maps_are_raw_values_that_scale_with_the_model(name, factors):
    model, x, _ = cases()[0]
    t = torch.tensor([0, 1, 2, 3])
    maps = get_explainer(name, model, layer="relu2").explain(x, t).maps
    doubled = get_explainer(name, scaled(model, **factors), layer="relu2").explain(x, t).maps
    assert maps.amax() > 0
    torch.testing.assert_close(doubled, 2 * maps, rtol=1e-4, atol=1e-6 * float(maps.abs().amax()))


def test_hirescam_is_gradcams_default():
    model, x, _ = cases()[0]
    t = torch.tensor([0, 1, 2, 3])
    hirescam = get_explainer("hirescam", model)
    assert hirescam.options() == {"layer": None}
    torch.testing.assert_close(hirescam.explain(x, t).maps, get_explainer("gradcam", model).explain(x, t).maps,
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", METHODS)
def test_bad_options_and_models_are_refused(name):
    model = cases()[0][0]
    with pytest.raises(ValueError, match=f"{name}: the model has no module named 'nope'"):
        get_explainer(name, model, layer="nope")
    # an MLP keeps no spatial grid: refused in one line on its first batch (preflight's sample image)
    mlp = get_explainer(name, nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedModel, match=f"^{name} cannot explain this model: no layer's output keeps the "
                       "image's spatial grid .*; pass layer= a module name, or use a method that needs no layer"):
        mlp.explain(torch.rand(1, 1, 2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="TorchScript"):
        get_explainer(name, torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())))
    explainer = get_explainer(name, model, layer="fc1")
    with pytest.raises(ValueError, match=r"layer 'fc1' must output \[B,K,h,w\]"):
        explainer.explain(torch.rand(1, 1, 28, 28), torch.tensor([0]))
    assert all(not m._forward_hooks for m in model.modules())
    # no black box: every CAM hooks a module, which an ONNX file or an endpoint does not have
    assert explainer.needs_gradients


@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_perturbation_cams_options_and_passes(name):
    model = cases()[0][0]
    with pytest.raises(ValueError, match="max_forward_batch must be an integer >= 1"):
        get_explainer(name, model, max_forward_batch=0)
    explainer = get_explainer(name, model, layer="relu1")
    assert explainer.passes() == {"forward": 1 + 8, "backward": 0}  # the last conv's channels before a batch
    explainer.explain(torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert explainer.passes() == {"forward": 1 + 4, "backward": 0}  # relu1's channels


def test_scorecam_score_option():
    model, x, _ = cases()[0]
    with pytest.raises(ValueError, match="score must be one of"):
        get_explainer("scorecam", model, score="softmax")
    t = torch.tensor([0, 1, 2, 3])
    probability = get_explainer("scorecam", model, layer="relu2").explain(x, t).maps
    logit = get_explainer("scorecam", model, layer="relu2", score="logit").explain(x, t).maps
    assert not torch.allclose(probability, logit)
    assert get_explainer("eigencam", model).passes() == {"forward": 1, "backward": 0}
    assert get_explainer("gradcampp", model).passes() == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("channels, stride", [(64, 8), (4, 2)])  # more channels than positions, and fewer
def test_eigencam_is_the_first_principal_component_from_either_scatter_matrix(channels, stride):
    """EigenCAM projects on the first right singular vector of the centred positions x channels
    matrix; it takes it from the smaller scatter matrix (ResNet-50 at 224 px: 49 positions, 2,048
    channels), and both ways give the SVD's projection."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, channels, stride, stride=stride), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(channels, 5)).eval()
    x = torch.rand(3, 3, 32, 32)
    maps = get_explainer("eigencam", model, layer="1").explain(x, torch.zeros(3, dtype=torch.long)).maps
    a = model[:2](x).flatten(2).transpose(1, 2)
    a = a - a.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    projection = (a @ vh[:, 0, :, None]).squeeze(2)
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    side = 32 // stride
    expected = torch.relu(torch.where(flip[:, None], -projection, projection)).reshape(3, side, side)
    expected = CAMBase._upsample(expected, (32, 32))
    assert torch.allclose(maps, expected, atol=1e-4 * float(expected.abs().max()))
