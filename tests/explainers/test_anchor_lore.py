"""anchor and lore: rules that name the region a hand-built model looks at; reproducibility."""
import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, RegionModel, region_superpixels, scene
from skimage import data, transform

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.blackbox.anchor import kl_bernoulli, kl_lower, kl_upper

FAST = {"anchor": {"fill": 0.0, "coverage_samples": 2000},
        "lore": {"fill": 0.0, "population_size": 200, "generations": 5}}


def test_anchor_is_the_region():
    result = get_explainer("anchor", RegionModel(), **FAST["anchor"]).explain(scene(), torch.tensor([1]))
    anchor = set(result.extras["anchor"][0].tolist())
    assert anchor and anchor <= region_superpixels(result.extras["segments"][0])
    assert float(result.extras["precision"][0]) >= 0.95
    assert 0 < float(result.extras["coverage"][0]) < 1
    rule = result.extras["rule"][0]
    assert rule.startswith("superpixels {") and "-> class 1" in rule and "precision" in rule
    segments = result.extras["segments"][0].reshape(28, 28)
    assert torch.equal(result.maps[0] == 1, torch.isin(segments, torch.tensor(sorted(anchor))))


def test_anchor_empty_when_the_image_does_not_matter():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 5.0]]).expand(len(x), 2)

    result = get_explainer("anchor", Constant(), coverage_samples=100).explain(scene(), torch.tensor([1]))
    assert result.extras["anchor"][0].numel() == 0 and "empty anchor" in result.extras["rule"][0]
    assert float(result.extras["coverage"][0]) == 1.0 and not result.maps.any()


def test_lore_rule_names_the_region():
    result = get_explainer("lore", RegionModel(), **FAST["lore"]).explain(scene(), torch.tensor([1]))
    named = set(result.extras["rule_superpixels"][0].tolist())
    region = region_superpixels(result.extras["segments"][0])
    assert named and named <= region
    assert result.extras["rule"][0].endswith("on -> class 1")
    assert "off -> class 0" in result.extras["counterfactuals"][0]
    assert set(result.extras["counterfactual_superpixels"][0].tolist()) <= region
    assert float(result.extras["fidelity"][0]) > 0.9
    assert set(result.maps[0].unique().tolist()) <= {0.0, 1.0} and result.maps[0].max() == 1


@pytest.mark.parametrize("method", ["anchor", "lore"])
def test_same_seed_same_output_alone_or_in_any_batch(method):
    alone = get_explainer(method, RegionModel(), **FAST[method]).explain(
        scene(), torch.tensor([1]), torch.tensor([5]))
    again = get_explainer(method, RegionModel(), **FAST[method]).explain(
        scene(), torch.tensor([1]), torch.tensor([5]))
    batch = torch.cat([scene(1), scene(2), scene()])
    inside = get_explainer(method, RegionModel(), max_forward_batch=37, **FAST[method]).explain(
        batch, torch.tensor([1, 1, 1]), torch.tensor([11, 12, 5]))
    for name, value in alone.extras.items():
        if name != "model_calls":
            assert str(value[0]) == str(again.extras[name][0]) == str(inside.extras[name][2]), name
    assert torch.equal(alone.maps[0], inside.maps[2])
    assert int(alone.extras["model_calls"][0]) == int(inside.extras["model_calls"][2])


@pytest.mark.parametrize("method", ["anchor", "lore"])
@pytest.mark.parametrize("rgb", [False, True])
def test_photos_and_tiny_images(method, rgb):
    photo = data.astronaut() / 255.0 if rgb else data.camera()[..., None] / 255.0
    big = torch.tensor(np.moveaxis(transform.resize(photo, (32, 32)), -1, 0), dtype=torch.float32)
    tiny = torch.nn.functional.interpolate(big[None], size=(8, 8), mode="area")[0]
    for image in (big, tiny):
        c, h, w = image.shape
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, 3))
        torch.nn.init.normal_(model[1].weight, std=0.5)
        target = model(image[None]).argmax(1)
        options = {"anchor": {"coverage_samples": 500, "max_anchor_size": 3},
                   "lore": {"population_size": 100, "generations": 3}}[method]
        result = get_explainer(method, model, **options).explain(image[None], target)
        assert result.maps.shape == (1, h, w) and torch.isfinite(result.maps).all()
        assert int(result.extras["segments"][0].max()) + 1 >= 4
        assert isinstance(result.extras["rule"][0], str) and result.extras["rule"][0]


def test_kl_bounds():
    p, level = np.array([0.0, 0.5, 0.9, 1.0]), np.array([0.1, 0.1, 0.05, 0.2])
    upper, lower = kl_upper(p, level), kl_lower(p, level)
    assert np.all(lower <= p) and np.all(p <= upper) and upper[-1] == 1.0 and lower[0] == 0.0
    assert np.allclose(kl_bernoulli(p[1:3], upper[1:3]), level[1:3], atol=1e-4)
    assert np.allclose(kl_bernoulli(p[1:], lower[1:]), level[1:], atol=1e-4)


def test_bad_options():
    with pytest.raises(ValueError, match="threshold"):
        get_explainer("anchor", RegionModel(), threshold=1.5)
    with pytest.raises(ValueError, match="cxpb"):
        get_explainer("lore", RegionModel(), cxpb=2.0)
    with pytest.raises(ValueError, match="does not take"):
        get_explainer("lore", RegionModel(), n_samples=10)


@pytest.fixture(scope="module")
def held_out_digits():
    """The demo CNN and 30 bundled test digits that the demo (the first 100) does not explain,
    with the model's predicted classes."""
    from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    model = load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt")))
    prep = Preprocessing(channels=1)
    records = [r for k, r in zip(range(130), read_shard(str(DEMO_DATA / "mnist-test-sample.tar"))) if k >= 100]
    images = torch.from_numpy(np.stack([preprocess(decode(r, prep.max_pixels), prep) for r in records]))
    with torch.no_grad():
        targets = model(images).argmax(1)
    return model, images, targets


@pytest.mark.slow
@pytest.mark.parametrize("method", ["anchor", "lore"])
def test_defaults_explain_almost_every_digit(held_out_digits, method):
    """With quickshift (~8 superpixels a digit) and each superpixel hidden under its own mean,
    hiding changed nothing the model cared about and 27% of anchors and lore rules were empty
    on 200 test digits; at most 5% may be. lore breeds a smaller neighbourhood here to stay
    fast: an empty rule comes from the segmentation and the fill, not from the GA's size."""
    torch.set_num_threads(2)
    model, images, targets = held_out_digits
    options = {"population_size": 200, "generations": 5} if method == "lore" else {}
    result = get_explainer(method, model, **options).explain(images, targets, torch.arange(100, 130))
    empty = (result.maps.flatten(1).abs().amax(1) == 0).float().mean().item()
    assert empty <= 0.05, f"{empty:.0%} of {method}'s explanations are empty"
    if method == "anchor":
        assert float(result.extras["precision"].min()) >= 0.95


def test_lore_map_answers_for_the_class_asked_about():
    """Asked about class 0 on an image the model calls 1, lore's map is the tree's path to class 0:
    the region switched off (-1), not x's own rule for class 1 (before: the same map whatever the
    class, so the demo's random logit test flagged lore at rank correlation 0.86)."""
    explainer = get_explainer("lore", RegionModel(), **FAST["lore"])
    own = explainer.explain(scene(), torch.tensor([1]))
    other = explainer.explain(scene(), torch.tensor([0]))
    region = torch.isin(own.extras["segments"][0].reshape(28, 28), torch.tensor(sorted(region_superpixels(
        own.extras["segments"][0]))))
    assert (own.maps[0][region] == 1).any() and (own.maps[0] >= 0).all()
    assert (other.maps[0][region] == -1).any() and (other.maps[0] <= 0).all()
    assert other.extras["rule"][0].endswith("-> class 1")  # the rule stays x's own


def test_lore_map_is_empty_for_a_class_its_neighbourhood_never_met():
    """RegionModel has two classes; a third one appears in no neighbour, so the tree has no path
    to it and there is nothing to show."""
    class ThreeClasses(torch.nn.Module):
        def forward(self, x):
            logits = RegionModel()(x)
            return torch.cat([logits, torch.full_like(logits[:, :1], -100.0)], 1)

    result = get_explainer("lore", ThreeClasses(), **FAST["lore"]).explain(scene(), torch.tensor([2]))
    assert not result.maps.any()
