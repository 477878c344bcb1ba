"""lime: finds the region a hand-built model looks at; reproducible per image and seed."""
import numpy as np
import pytest
import torch
from skimage import data, transform
from sklearn.linear_model import Ridge

from explainers import get_explainer, list_methods
from explainers.lime import lime_kernel, weighted_ridge

from conftest import REGION, RegionModel, region_superpixels, scene
def test_registered():
    assert {"lime", "anchor", "lore"} <= set(list_methods())


def test_largest_weight_on_the_region():
    result = get_explainer("lime", RegionModel(), fill=0.0, n_samples=500).explain(scene(), torch.tensor([1]))
    weights = result.extras["weights"][0]
    top = int(weights.argmax())
    assert top in region_superpixels(result.extras["segments"][0])
    assert float(result.extras["r2"][0]) > 0.9
    segments = result.extras["segments"][0].reshape(28, 28).long()
    assert torch.equal(result.maps[0], weights[segments])
    assert result.maps.shape == (1, 28, 28)
    assert 0 < int(result.extras["model_calls"][0]) <= 500


def test_same_seed_same_output_alone_or_in_any_batch():
    explainer = get_explainer("lime", RegionModel(), fill=0.0, n_samples=300, max_forward_batch=128)
    alone = explainer.explain(scene(), torch.tensor([1]), torch.tensor([7]))
    again = explainer.explain(scene(), torch.tensor([1]), torch.tensor([7]))
    batch = torch.cat([scene(1), scene(), scene(2)])
    other = get_explainer("lime", RegionModel(), fill=0.0, n_samples=300, max_forward_batch=50)
    inside = other.explain(batch, torch.tensor([0, 1, 1]), torch.tensor([3, 7, 9]))
    assert torch.equal(alone.maps[0], again.maps[0])
    assert torch.allclose(alone.maps[0], inside.maps[1], atol=1e-6)
    assert np.isclose(float(alone.extras["r2"][0]), float(inside.extras["r2"][1]), atol=1e-6)
    different = explainer.explain(scene(), torch.tensor([1]), torch.tensor([8]))
    assert not torch.equal(alone.maps[0], different.maps[0])
    negative = explainer.explain(scene(), torch.tensor([1]), torch.tensor([-8]))  # id hashes may be < 0
    assert torch.equal(negative.maps, explainer.explain(scene(), torch.tensor([1]), torch.tensor([-8])).maps)


@pytest.mark.parametrize("rgb", [False, True])
def test_photos_grey_and_rgb(rgb):
    photo = data.astronaut() / 255.0 if rgb else data.camera()[..., None] / 255.0
    image = torch.tensor(np.moveaxis(transform.resize(photo, (40, 40)), -1, 0), dtype=torch.float32)[None]
    channels = image.shape[1]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * 40 * 40, 3))
    torch.manual_seed(0)
    result = get_explainer("lime", model, n_samples=200, segmentation="slic").explain(image, torch.tensor([2]))
    n_segments = int(result.extras["segments"][0].max()) + 1
    assert n_segments >= 4 and result.extras["weights"][0].shape == (n_segments,)
    assert result.maps.shape == (1, 40, 40) and torch.isfinite(result.maps).all()


def test_tiny_image():
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    result = get_explainer("lime", model, n_samples=64).explain(image, torch.tensor([0, 1]))
    assert result.maps.shape == (2, 8, 8)
    assert all(int(s.max()) + 1 >= 4 for s in result.extras["segments"])


def test_weighted_ridge_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (2, 150, 6)).astype(float)
    x[:, 0] = 1
    y, w = rng.random((2, 150)), lime_kernel(x, np.array([6, 6]), 0.25)
    beta, intercept, r2 = weighted_ridge(x, y, w, 1.0)
    for k in range(2):
        ridge = Ridge(alpha=1.0).fit(x[k], y[k], sample_weight=w[k])
        assert np.allclose(ridge.coef_, beta[k]) and np.isclose(ridge.intercept_, intercept[k])
        assert np.isclose(ridge.score(x[k], y[k], sample_weight=w[k]), r2[k])


def test_kernel_matches_lime_example():
    # methods.md: half the superpixels off gives d ~ 0.29 and a weight ~ 0.5
    mask = np.array([[[1, 1, 0, 0] * 4]], dtype=float)
    assert np.isclose(lime_kernel(mask, np.array([16]), 0.25)[0, 0], 0.5, atol=0.02)


def test_bad_options():
    with pytest.raises(ValueError, match="n_samples"):
        get_explainer("lime", RegionModel(), n_samples=1)
    with pytest.raises(ValueError, match="unknown segmentation"):
        get_explainer("lime", RegionModel(), segmentation="watershed")
    with pytest.raises(ValueError, match="unknown fill"):
        get_explainer("lime", RegionModel(), fill="noise")
    with pytest.raises(ValueError, match="images"):
        get_explainer("lime", RegionModel()).explain(torch.zeros(28, 28), torch.tensor([1]))
