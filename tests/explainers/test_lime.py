"""lime: finds the region a hand-built model looks at; reproducible per image and seed."""
import numpy as np
import pytest
import torch
from conftest import RegionModel, region_superpixels, scene
from scipy.stats import spearmanr
from skimage import data, transform
from sklearn.linear_model import Ridge

from saliency_audit.explainers import get_explainer, list_methods
from saliency_audit.explainers.blackbox.lime import lime_kernel, weighted_ridge
from saliency_audit.explainers.core.scores import target_scores

PATCH = 4


class PatchDetector(torch.nn.Module):
    """Class 1 iff some 4x4 window is bright (mean > 0.75): the planted feature, hand-built."""

    def forward(self, x):
        window = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), PATCH, stride=1)
        evidence = 20 * (window.amax(dim=(1, 2, 3)) - 0.75)
        return torch.stack([torch.zeros_like(evidence), evidence], 1)


class Scaled(torch.nn.Module):
    """A model's logits times a factor: same decisions, softmax saturated to exactly 1."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


def planted_on_smooth(n, seed, aligned=False):
    """[n,1,28,28]: a flat grey level in [0.1,0.4] with faint noise, and a 4x4 patch of 1.0 at a
    random place (aligned: on the 4x4 cells of a 7x7 grid)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.3 * torch.rand(n, 1, 1, 1, generator=g) + 0.05 * torch.rand(n, 1, 28, 28, generator=g)
    corners = torch.randint(0, 28 - PATCH + 1, (n, 2), generator=g)
    if aligned:
        corners = corners // PATCH * PATCH
    for i, (r, c) in enumerate(corners.tolist()):
        x[i, 0, r:r + PATCH, c:c + PATCH] = 1.0
    return x, corners


def points_at_patch(maps, corners):
    """Per image: the map's strict maximum (not a flat map) lies on the patch."""
    return [bool(m[r:r + PATCH, c:c + PATCH].max() >= m.max() > m.min()) for m, (r, c) in zip(maps, corners.tolist())]


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
    with pytest.raises(ValueError, match="score must be one of"):
        get_explainer("lime", RegionModel(), score="softmax")
    with pytest.raises(ValueError, match="images"):
        get_explainer("lime", RegionModel()).explain(torch.zeros(28, 28), torch.tensor([1]))


@pytest.mark.parametrize("options", [{}, {"segmentation": "grid", "segmentation_options": {"n_segments": 49}}],
                         ids=["default segmentation", "patch is its own superpixel"])
def test_defaults_point_at_a_planted_patch(options):
    # With a patch that is a superpixel of its own, a superpixel's own mean (lime_image's
    # hide_color=None, the old default fill) is the patch itself: it could never be switched
    # off and got no weight. The default fill must hide it whatever the segmentation.
    x, corners = planted_on_smooth(12, seed=0, aligned=True)
    targets = torch.ones(len(x), dtype=torch.long)
    assert (PatchDetector()(x).argmax(1) == 1).all()
    result = get_explainer("lime", PatchDetector(), **options).explain(x, targets, torch.arange(len(x)))
    hits = points_at_patch(result.maps, corners)
    assert sum(hits) >= 0.9 * len(hits), hits


def test_not_flat_on_an_over_confident_model(demo_model, demo_images):
    # Logits x50: p(target) rounds to 1.0 in float32 for almost every mask, so a regression on
    # it is flat (the old default gave maps of 1e-29 on some digits) or a step function.
    # Same segments and masks (same seeds): the superpixel ranking must survive the scaling.
    images = demo_images[0][:6]
    targets = demo_model(images).argmax(1)
    seeds = torch.arange(len(images))
    plain = get_explainer("lime", demo_model, n_samples=500).explain(images, targets, seeds)
    confident = get_explainer("lime", Scaled(demo_model, 50.0), n_samples=500).explain(images, targets, seeds)
    assert (confident.maps.flatten(1).abs().amax(1) > 1e-3).all()
    rho = [spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(plain.extras["weights"], confident.extras["weights"])]
    assert np.mean(rho) > 0.9, rho  # 0.97 with the log-odds, 0.76 with the probability


def test_log_odds_from_logits():
    logits = torch.tensor([[2.0, 0.5, -1.0], [900.0, 0.0, 1.0]])
    targets = torch.tensor([0, 0])
    p = torch.softmax(logits.double(), 1)[0, 0]
    value = target_scores(logits, targets, "log_odds", torch.float64)
    assert torch.isclose(value[0], torch.log(p) - torch.log1p(-p))
    assert torch.isclose(value[1], torch.tensor(900.0 - np.logaddexp(0.0, 1.0), dtype=torch.float64))
    single = target_scores(torch.tensor([[3.0]]), torch.tensor([0]), "log_odds", torch.float64)
    assert torch.equal(single, torch.tensor([3.0], dtype=torch.float64))  # one output: a binary logit


def test_given_slic_options_keep_limes_own_segment_count():
    from saliency_audit.explainers.blackbox.lime import SLIC_OPTIONS
    lime = get_explainer("lime", RegionModel(), segmentation_options={"compactness": 5.0})
    assert lime.segmentation_options == {**SLIC_OPTIONS, "compactness": 5.0}
    assert get_explainer("lime", RegionModel(), segmentation_options={}).segmentation_options == SLIC_OPTIONS
