"""RISE against TorchRay's implementation on the same masks, expected gradients against Captum and
its known answers, VarGrad and SmoothGrad-squared known answers, the control maps (random, sobel
against scikit-image), batch independence and hostile options."""
import importlib.util
import io

import numpy as np
import pytest
import torch
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.maps import image_generators
from saliency_audit.explainers.perturbation.rise import rise_masks
from saliency_audit.pipelines.training.reference_model import MnistCNN


def small_cnn():
    torch.manual_seed(0)
    return MnistCNN(conv_channels=(4, 8), hidden=16).eval()


def batch_equals_alone(name, model, x, t, rtol=1e-4, **options):
    explainer = get_explainer(name, model, **options)
    seeds = torch.arange(100, 100 + len(x))
    batch = explainer.explain(x, t, seeds).maps
    for i in range(len(x)):
        alone = explainer.explain(x[i:i + 1], t[i:i + 1], seeds[i:i + 1]).maps
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=rtol, atol=rtol * batch.abs().max().item())
    return batch


# --- RISE ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchray_rise():
    if importlib.util.find_spec("torchray") is None:
        pytest.skip("torchray is not installed (pip install --no-deps torchray==1.0.0.2)")
    from torchray.attribution.rise import rise
    return rise


class ProbabilityLogit(nn.Module):
    """TorchRay scores masks with sigmoid(logit); RISE as published (and ours) with the softmax
    probability. The log-odds of the softmax make TorchRay's sigmoid give that probability."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        p = torch.softmax(self.model(x), dim=1).clamp(1e-12, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)


def test_rise_matches_torchray_on_the_same_masks(torchray_rise):
    model = small_cnn()
    torch.manual_seed(1)
    x, t = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    explainer = get_explainer("rise", model, n_masks=300, keep=0.5)
    seeds = torch.tensor([11, 12])
    ours = explainer.explain(x, t, seeds).maps
    for i, g in enumerate(image_generators(seeds, 2)):
        masks = rise_masks(*explainer.draw(g, 28, 28), 28, 28)
        theirs = torchray_rise(ProbabilityLogit(model), x[i:i + 1], filter_masks=masks.unsqueeze(1),
                               num_masks=300, batch_size=64)[0, t[i]]
        # TorchRay divides by the number of masks, the paper (and we) by that times E[M] = keep
        torch.testing.assert_close(ours[i] * 0.5, theirs, rtol=1e-4, atol=1e-6)


def test_rise_masks_are_smooth_shifted_grids():
    g = torch.Generator().manual_seed(0)
    explainer = get_explainer("rise", small_cnn(), n_masks=200, cells=7, keep=0.3)
    grids, shifts = explainer.draw(g, 28, 28)
    masks = rise_masks(grids, shifts, 28, 28)
    assert masks.shape == (200, 28, 28) and masks.min() >= 0 and masks.max() <= 1
    assert shifts.min() >= 0 and shifts.max() < 4  # one cell of 28 / 7 pixels
    assert abs(grids.mean().item() - 0.3) < 0.03  # keep is the probability a cell is kept
    # bilinear: values between 0 and 1 exist (smooth edges), and a kept grid cell is 1 at its centre
    assert ((masks > 0.05) & (masks < 0.95)).any()


def test_rise_finds_the_only_region_the_model_sees():
    """A model whose class-1 logit grows with the mean of the top-left 8x8 quarter: RISE's map is
    higher there than anywhere else (by about E[p | pixel kept] - E[p], measured 0.1)."""

    class TopLeft(nn.Module):
        def forward(self, x):
            s = x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 4 - 2  # a probability far from 0 and 1
            return torch.stack([torch.zeros_like(s), s], 1)

    x = torch.full((2, 1, 16, 16), 1.0)
    maps = get_explainer("rise", TopLeft(), n_masks=1000, cells=4).explain(x, torch.tensor([1, 1])).maps
    inside, outside = maps[:, :8, :8].mean((1, 2)), maps[:, 8:, 8:].mean((1, 2))
    assert (inside > outside + 0.05).all(), (inside, outside)
    assert (maps[:, :6, :6].amin((1, 2)) > maps[:, 10:, 10:].amax((1, 2))).all()


def test_rise_is_batch_independent_and_forward_only():
    model = small_cnn()
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    batch_equals_alone("rise", model, x, t, n_masks=64, max_forward_batch=48)
    explainer = get_explainer("rise", model, n_masks=64)
    assert explainer.passes() == {"forward": 64, "backward": 0} and not explainer.needs_gradients
    assert not explainer.signed


@pytest.mark.parametrize("options, message", [
    ({"n_masks": 0}, "n_masks"), ({"cells": 1.5}, "cells"), ({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"),
    ({"max_forward_batch": 0}, "max_forward_batch"),
])
def test_rise_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_explainer("rise", small_cnn(), **options)


# --- expected gradients ------------------------------------------------------------------------

def test_expected_gradients_on_a_linear_model_is_weight_times_distance_to_the_baseline():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    x, t = torch.rand(2, 2, 4, 4), torch.tensor([0, 2])
    maps = get_explainer("expected_gradients", model, n_samples=7, background="zeros").explain(x, t).maps
    w = model[1].weight.detach().view(3, 2, 4, 4)
    torch.testing.assert_close(maps, (x * w[t]).sum(1), rtol=1e-5, atol=1e-6)


def test_expected_gradients_converges_to_captums_gradientshap_and_to_ig():
    """With one background image both estimators converge to integrated gradients from it."""
    from captum.attr import GradientShap, IntegratedGradients
    model = small_cnn()
    torch.manual_seed(2)
    x, t = torch.rand(2, 1, 28, 28), torch.tensor([1, 5])
    background = torch.rand(1, 1, 28, 28) * 0.3
    buffer = io.BytesIO()
    np.save(buffer, background.numpy())
    path = pytest.importorskip("pathlib").Path(__import__("tempfile").mkdtemp()) / "background.npy"
    path.write_bytes(buffer.getvalue())
    ours = get_explainer("expected_gradients", model, n_samples=1500, background=str(path))
    result = ours.explain(x, t, torch.tensor([0, 1]))
    torch.manual_seed(0)
    theirs = GradientShap(model).attribute(x, background, target=t, n_samples=1500).sum(1)
    ig = IntegratedGradients(model).attribute(x, background.expand_as(x), target=t, n_steps=200).sum(1)
    for reference in (theirs, ig):
        error = (result.maps - reference).norm() / reference.norm()
        assert error < 0.08, error
    # completeness: with one baseline the map sums to f(x) - f(x') up to the sampling error
    assert (result.extras["convergence_delta"].abs() < 0.05 * result.maps.abs().sum((1, 2))).all()


def test_expected_gradients_is_batch_independent():
    model = small_cnn()
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    batch_equals_alone("expected_gradients", model, x, t, n_samples=9, max_expanded_batch=8, noise=0.1)


def test_expected_gradients_refuses_hostile_background_files(tmp_path):
    model = small_cnn()
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((4, 28 * 28), dtype=np.float32))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((1, 1, 28, 28), np.nan, dtype=np.float32))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"\x93NUMPY garbage")
    for path, message in ((pickled, "cannot read background"), (flat, r"must hold numeric images \[N,C,H,W\]"),
                          (nan, "NaN"), (garbage, "cannot read background"),
                          (tmp_path / "missing.npy", "cannot read background")):
        with pytest.raises(ValueError, match=message):
            get_explainer("expected_gradients", model, background=str(path))
    other_size = tmp_path / "other.npy"
    np.save(other_size, np.zeros((2, 1, 14, 14), dtype=np.float32))
    explainer = get_explainer("expected_gradients", model, background=str(other_size))
    with pytest.raises(ValueError, match=r"background images are \(1, 14, 14\)"):
        explainer.explain(torch.rand(1, 1, 28, 28), torch.tensor([0]))


@pytest.mark.parametrize("options, message", [
    ({"n_samples": 0}, "n_samples"), ({"noise": -1}, "noise"), ({"background": ""}, "background"),
    ({"background": 3}, "background"), ({"max_expanded_batch": 0}, "max_expanded_batch"),
])
def test_expected_gradients_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_explainer("expected_gradients", small_cnn(), **options)


# --- VarGrad and SmoothGrad-squared --------------------------------------------------------------

class Quadratic(nn.Module):
    """logit_k = 0.5 * sum(w_k * x^2): the gradient is w_k * x, so over x + noise of std s the
    gradient's variance per element is w_k^2 s^2 and its mean square w_k^2 (x^2 + s^2)."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        return 0.5 * (self.w.unsqueeze(0) * x.unsqueeze(1) ** 2).flatten(2).sum(2)


def test_vargrad_and_smoothgrad_squared_known_answers():
    torch.manual_seed(3)
    w = torch.rand(2, 2, 4, 4) + 0.5
    x = torch.rand(1, 2, 4, 4)
    x[0, 0, 0, 0], x[0, 1, 3, 3] = 0.0, 1.0  # range exactly 1, so the noise std is noise_level
    t = torch.tensor([1])
    s = 0.2
    model = Quadratic(w)
    variance = get_explainer("smoothgrad", model, n_samples=4000, noise_level=s, statistic="variance")
    torch.testing.assert_close(variance.explain(x, t).maps[0], (w[1] ** 2 * s ** 2).sum(0), rtol=0.1, atol=0)
    square = get_explainer("smoothgrad", model, n_samples=4000, noise_level=s, statistic="mean_square")
    torch.testing.assert_close(square.explain(x, t).maps[0], (w[1] ** 2 * (x[0] ** 2 + s ** 2)).sum(0),
                               rtol=0.1, atol=0)
    assert not variance.signed and not square.signed and get_explainer("smoothgrad", model).signed


def test_vargrad_of_a_linear_model_is_exactly_zero():
    """The gradient never varies: float32 moments left E[g^2] - E[g]^2 at 1e-2 against 1e4."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    with torch.no_grad():
        model[1].weight.mul_(100)
    maps = get_explainer("smoothgrad", model, statistic="variance", n_samples=64).explain(
        torch.rand(2, 1, 4, 4), torch.tensor([0, 1])).maps
    assert maps.abs().max() < 1e-6


def test_expected_gradients_completeness_holds_with_input_noise():
    """With noise the draws start from noisy inputs: the gap is measured against those."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    result = get_explainer("expected_gradients", model, n_samples=16, noise=0.3).explain(
        torch.rand(2, 1, 4, 4), torch.tensor([0, 2]))
    assert result.extras["convergence_delta"].abs().max() < 1e-4


def test_smoothgrad_statistic_is_checked():
    with pytest.raises(ValueError, match="statistic must be one of mean, mean_square, variance"):
        get_explainer("smoothgrad", small_cnn(), statistic="vargrad")


# --- controls -----------------------------------------------------------------------------------

def test_random_map_depends_on_the_seed_only():
    model = small_cnn()
    x, t = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    maps = batch_equals_alone("random", model, x, t, rtol=0)
    other = get_explainer("random", model).explain(torch.zeros(3, 1, 28, 28), t, torch.arange(100, 103)).maps
    assert torch.equal(maps, other)  # not the image, not the target: the seed
    assert not torch.equal(maps[0], maps[1])


def test_sobel_on_a_step_edge():
    x = torch.zeros(1, 1, 6, 6)
    x[..., 3:] = 1.0
    maps = get_explainer("sobel", small_cnn()).explain(x, torch.tensor([0])).maps[0]
    expected = torch.zeros(6, 6)
    expected[:, 2:4] = 4.0  # the kernel's column weights 1 + 2 + 1 times the step
    torch.testing.assert_close(maps, expected)


def test_sobel_equals_scikit_image_inside_the_border():
    """skimage.filters.sobel gives sqrt((Gx^2 + Gy^2) / 2) with kernels scaled by 1/4."""
    from skimage import data, filters, transform
    rgb = transform.resize(data.astronaut(), (40, 40), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    ours = get_explainer("sobel", small_cnn()).explain(x, torch.tensor([0])).maps[0].numpy()
    theirs = sum(filters.sobel(rgb[..., c]) for c in range(3)) * 4 * np.sqrt(2)
    np.testing.assert_allclose(ours[1:-1, 1:-1], theirs[1:-1, 1:-1], rtol=1e-4, atol=1e-5)


def test_controls_ask_the_model_nothing():
    class Refuses(nn.Module):
        def forward(self, x):
            raise AssertionError("a control map asked the model")

    for name in ("random", "sobel"):
        explainer = get_explainer(name, Refuses())
        assert explainer.passes() == {"forward": 0, "backward": 0} and not explainer.needs_gradients
        assert explainer.explain(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])).maps.shape == (2, 8, 8)
