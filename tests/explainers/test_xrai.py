"""XRAI against PAIR's reference implementation (saliency.core.xrai, framework-free NumPy).

The reference is optional: pip install --no-deps saliency==0.2.1 (it imports only numpy,
scipy and scikit-image at runtime; no tensorflow)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy import ndimage

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.gradient.xrai import XRAI, xrai_greedy, xrai_segments
from saliency_audit.pipelines.training.reference_model import MnistCNN

SALIENCY_INSTALL = "pip install --no-deps saliency==0.2.1"


# small models and many small forwards: one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair():
    if importlib.util.find_spec("saliency") is None:
        pytest.skip(f"saliency is not installed ({SALIENCY_INSTALL})")
    from saliency.core import xrai
    return xrai


def smooth_image(channels: int, height: int, width: int, seed: int) -> np.ndarray:
    """[C,H,W] blurred noise: large blobs, so Felzenszwalb finds regions at every scale."""
    noise = np.random.default_rng(seed).random((channels, height, width))
    return ndimage.gaussian_filter(noise, (0, 3, 3)).astype(np.float32)


def pair_map(pair, attribution, segments=None, x_value=None, min_pixel_diff=50, area_threshold=1.0):
    """PAIR's XRAI map through its public API, IG replaced by ``attribution``."""
    params = pair.XRAIParameters(area_threshold=area_threshold, return_xrai_segments=True)
    params.experimental_params["min_pixel_diff"] = min_pixel_diff
    x_value = attribution if x_value is None else x_value
    out = pair.XRAI().GetMaskWithDetails(x_value, call_model_function=None, base_attribution=attribution,
                                         segments=None if segments is None else list(segments),
                                         extra_parameters=params)
    return out.attribution_mask, out.segments


@pytest.mark.parametrize("channels, height, width", [(1, 36, 36), (3, 40, 52)])
def test_segments_equal_pairs(pair, channels, height, width):
    """Same masks in the same order as PAIR's _get_segments_felzenszwalb (resize to 224,
    six scales, nearest-neighbour back, disk(5) dilation)."""
    image = smooth_image(channels, height, width, seed=channels)
    ours = xrai_segments(image, dilation_radius=5)
    theirs = np.stack(pair._get_segments_felzenszwalb(np.moveaxis(image, 0, -1)))
    assert ours.shape == theirs.shape and ours.shape[0] > 6
    assert np.array_equal(ours, theirs)


def random_case(seed: int):
    """Signed attributions [24,30] and overlapping masks: dilated Felzenszwalb segments at two
    scales plus random rectangles."""
    rng = np.random.default_rng(seed)
    image = smooth_image(1, 24, 30, seed)
    masks = [xrai_segments(image, scales=(20, 200), min_size=10, size=None, dilation_radius=1)]
    for _ in range(15):
        r, c = rng.integers(0, 20), rng.integers(0, 26)
        box = np.zeros((1, 24, 30), dtype=bool)
        box[0, r:r + rng.integers(2, 10), c:c + rng.integers(2, 12)] = True
        masks.append(box)
    return rng.normal(size=(24, 30)) + 0.5 * image[0], np.concatenate(masks)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_pixel_diff, area_threshold", [(1, 1.0), (10, 1.0), (1, 0.3)])
def test_greedy_equals_pair(pair, seed, min_pixel_diff, area_threshold):
    attribution, masks = random_case(seed)
    ours, regions = xrai_greedy(attribution, masks, min_pixel_diff, area_threshold)
    theirs, ranks = pair_map(pair, attribution, masks, min_pixel_diff=min_pixel_diff,
                             area_threshold=area_threshold)
    np.testing.assert_array_equal(ours, theirs)  # bit for bit: each region's value is computed as PAIR does
    assert ranks.max() - regions in (0, 1)  # PAIR ranks the added regions, then the uncovered rest
    assert ours.sum() == pytest.approx(attribution.sum(), rel=1e-9, abs=1e-9)  # completeness


def test_non_finite_attributions_give_a_nan_map():
    """Not a crash, and not a ranking half made of NaN: the pipeline turns the NaN map into an
    error row for that image."""
    attribution, masks = random_case(0)
    attribution[3, 4] = np.inf
    out, regions = xrai_greedy(attribution, masks, 1, 1.0)
    assert out.shape == attribution.shape and np.isnan(out).all() and regions == 0


def test_a_nan_image_costs_only_its_own_map():
    images = torch.from_numpy(np.stack([smooth_image(1, 28, 28, seed) for seed in range(2)]))
    images[0, 0, 5, 5] = float("nan")
    explainer = get_explainer("xrai", digit_model(), n_steps=4, segment_size=None, min_size=5, scales=[20])
    maps = explainer.explain(images, torch.tensor([0, 1])).maps
    assert torch.isnan(maps[0]).all() and torch.isfinite(maps[1]).all()
    torch.testing.assert_close(maps[1], explainer.explain(images[1:], torch.tensor([1])).maps[0])


def digit_model(seed: int = 0) -> MnistCNN:
    torch.manual_seed(seed)
    return MnistCNN(conv_channels=(4, 8), hidden=16, dropout=0.0).eval()


def test_whole_map_equals_pair_given_our_attributions(pair):
    """Our IG attributions into PAIR's XRAI (its own segmentation and greedy pass) give our map,
    with PAIR's absolute pixel settings (dilation 5, min_pixel_diff 50)."""
    image = torch.from_numpy(smooth_image(1, 28, 28, seed=5))
    explainer = get_explainer("xrai", digit_model(), n_steps=8, dilation_radius=5, min_pixel_diff=50)
    target = torch.tensor([3])
    ours = explainer.explain(image[None], target).maps[0].double().numpy()
    attribution = explainer.attributions(image[None], target)[0][0].double().numpy()
    theirs, _ = pair_map(pair, attribution[..., None], x_value=image.permute(1, 2, 0).double().numpy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)  # ours is float32


def test_attributions_are_pairs_integrated_gradients(pair):
    """The averaged attribution is PAIR's: IG from the image's min and max, averaged (PAIR's
    quadrature is a Riemann sum over linspace(0, 1, n); ours Gauss-Legendre: close, not equal)."""
    from saliency.core.base import INPUT_OUTPUT_GRADIENTS
    model = digit_model(1)
    image = torch.from_numpy(smooth_image(1, 28, 28, seed=6)) * 3 - 1  # range not [0, 1]
    target = 7

    def call_model(batch, call_model_args=None, expected_keys=None):
        x = torch.from_numpy(np.moveaxis(batch, -1, 1)).float().requires_grad_(True)
        grad, = torch.autograd.grad(model(x)[:, target].sum(), x)
        return {INPUT_OUTPUT_GRADIENTS: np.moveaxis(grad.numpy(), 1, -1)}

    out = pair.XRAI().GetMaskWithDetails(image.permute(1, 2, 0).numpy(), call_model, batch_size=100,
                                         extra_parameters=pair.XRAIParameters(steps=400, return_ig_attributions=True))
    theirs = np.mean(out.ig_attribution, axis=0)[..., 0]
    ours = XRAI(model, n_steps=64).attributions(image[None], torch.tensor([target]))[0][0].numpy()
    assert np.abs(ours - theirs).max() < 0.01 * np.abs(theirs).max()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999


def test_batch_independence():
    """Each image's map and extras alone equal its row in a batch (images with different
    minima and maxima, so the IG batches split by baseline value). Segmented at their own size
    to keep the test fast: the per-image part does not see the batch either way."""
    model = digit_model(2)
    images = torch.from_numpy(np.stack([smooth_image(1, 28, 28, seed) for seed in range(3)]))
    images[1] = images[1] * 2 - 0.5
    targets = torch.tensor([1, 4, 9])
    explainer = get_explainer("xrai", model, n_steps=8, segment_size=None, min_size=5, scales=[10, 50, 200])
    batch = explainer.explain(images, targets)
    for i in range(len(images)):
        one = explainer.explain(images[i:i + 1], targets[i:i + 1])
        torch.testing.assert_close(one.maps[0], batch.maps[i], rtol=1e-5, atol=1e-7)
        assert one.extras["n_regions"][0] == batch.extras["n_regions"][i]
    assert batch.maps.shape == (3, 28, 28) and torch.isfinite(batch.maps).all()
    torch.testing.assert_close(batch.maps.sum((1, 2)),
                               explainer.attributions(images, targets)[0].sum((1, 2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option, value", [
    ("n_steps", 0), ("n_steps", 2.5), ("method", "simpson"), ("baselines", "min"), ("baselines", []),
    ("baselines", ["min", "median"]), ("baselines", [float("nan")]), ("scales", []), ("scales", [50, -1]),
    ("sigma", -0.1), ("min_size", None), ("min_size", -1), ("segment_size", 1), ("dilation_radius", -1),
    ("dilation_radius", 1.5), ("min_pixel_diff", 0), ("area_threshold", 0), ("area_threshold", 1.5),
    ("max_expanded_batch", 0)])
def test_bad_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        get_explainer("xrai", digit_model(), **{option: value})


def test_defaults_and_passes():
    explainer = get_explainer("xrai", digit_model())
    assert explainer.options()["n_steps"] == 100 and explainer.options()["scales"] == (50, 100, 150, 250, 500, 1200)
    assert explainer.passes() == {"forward": 200, "backward": 200}
    assert explainer.resolved(224, 224) == (5, 50)  # PAIR's pixel settings at its size
    assert explainer.resolved(28, 28) == (1, 1)
    assert get_explainer("xrai", digit_model(), dilation_radius=0, min_pixel_diff=7).resolved(28, 28) == (0, 7)


def test_segment_dilation_on_its_bounding_box_equals_the_whole_image_dilation():
    from scipy import ndimage
    from skimage.morphology import disk

    from saliency_audit.explainers.gradient.xrai import _dilate
    rng = np.random.default_rng(0)
    for radius in (1, 3, 6):
        footprint = disk(radius).astype(bool)
        for _ in range(20):
            mask = np.zeros((40, 50), dtype=bool)
            r, c = rng.integers(0, 40), rng.integers(0, 50)
            mask[r:r + rng.integers(1, 12), c:c + rng.integers(1, 12)] = rng.random() > 0.1
            np.testing.assert_array_equal(_dilate(mask, footprint, radius), ndimage.binary_dilation(mask, footprint))
