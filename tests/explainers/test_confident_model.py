"""Methods that score the target's softmax probability on a confident model.

The demo CNN with its logits multiplied by 50 predicts the same classes, but float32 rounds
every probability to exactly 1.0: the probability and its gradient stop moving, and a
method that optimises or ranks by it has nothing to go on (issue 12)."""
import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA
from PIL import Image
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.core.scores import target_scores
from saliency_audit.explainers.metrics import deletion_auc, random_maps
from saliency_audit.explainers.perturbation.meaningful_perturbation import gaussian_blur
from saliency_audit.pipelines.training.reference_model import MnistCNN

N_DIGITS = 8
FACTOR = 50.0


class ScaledLogits(nn.Module):
    """``model`` with its logits multiplied by ``factor``: same argmax, sharper softmax."""

    def __init__(self, model: nn.Module, factor: float):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches run fastest on one thread, and the cores are shared with other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """The demo CNN, its x50 copy, the first N_DIGITS bundled test digits and their predicted classes."""
    model = MnistCNN()
    model.load_state_dict(torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True))
    model.eval()
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")][:N_DIGITS]
    images = np.stack([np.asarray(Image.open(io.BytesIO(png))) for png in pngs])
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    confident = ScaledLogits(model, FACTOR).eval()
    with torch.no_grad():
        targets = model(x).argmax(1)
    return model, confident, x, targets


def test_the_confident_model_saturates_the_softmax(digits):
    model, confident, x, targets = digits
    with torch.no_grad():
        assert torch.equal(confident(x).argmax(1), targets)
        probability = torch.softmax(confident(x), 1).gather(1, targets[:, None])
    assert (probability == 1.0).all()  # the premise of every test below


def faithfulness(model, x, maps, targets):
    """Mean deletion AUC of ``maps`` over that of random maps (zero substrate): < 1 beats random."""
    seeds = torch.arange(len(x))
    ours = deletion_auc(model, x, maps, targets, seeds=seeds).mean()
    chance = deletion_auc(model, x, random_maps(maps.shape, seeds), targets, seeds=seeds).mean()
    return (ours / chance).item()


def all_zero(maps):
    return int((maps.flatten(1).abs().amax(1) == 0).sum())


@pytest.fixture(scope="module")
def masks(digits):
    """``mask`` with its defaults on the demo CNN and on its x50 copy."""
    model, confident, x, targets = digits
    return {model: get_explainer("mask", model).explain(x, targets),
            confident: get_explainer("mask", confident).explain(x, targets)}


@pytest.mark.parametrize("name", ["mask", "occlusion"])
def test_maps_on_a_confident_model_are_not_zero_and_beat_random(digits, masks, name):
    _, confident, x, targets = digits
    if name == "mask":
        maps = masks[confident].maps
    else:
        maps = get_explainer(name, confident).explain(x, targets, torch.arange(len(x))).maps
    assert torch.isfinite(maps).all()
    assert all_zero(maps) == 0
    # On the saturated model probability-based defaults gave 0.96 (mask, every map zero)
    # and 0.73 (occlusion); the fixed defaults give about 0.35 and 0.28 on 100 digits.
    assert faithfulness(confident, x, maps, targets) < 0.6


def test_mask_is_the_same_whatever_the_logit_scale(digits, masks):
    model, confident, _, _ = digits
    plain, sharp = masks[model], masks[confident]
    assert all_zero(plain.maps) == 0
    torch.testing.assert_close(sharp.maps, plain.maps, atol=5e-3, rtol=0)
    torch.testing.assert_close(sharp.extras["deleted_score_relative"], plain.extras["deleted_score_relative"],
                               atol=5e-3, rtol=0)


def test_mask_deleted_scores_are_those_of_the_image_perturbed_with_the_map(digits, masks):
    _, confident, x, targets = digits
    result = masks[confident]
    # the map is 1 - m, so x' = (1 - map) x + map r, with the default blurred reference
    reference = gaussian_blur(x, 3.0)
    perturbed = (1 - result.maps[:, None]) * x + result.maps[:, None] * reference
    with torch.no_grad():
        logits = confident(torch.cat([x, reference, perturbed]))
    margin = target_scores(logits, targets.repeat(3), "margin").view(3, -1)
    expected = (margin[2] - margin[1]) / (margin[0] - margin[1])
    torch.testing.assert_close(result.extras["deleted_score_relative"], expected, rtol=1e-4, atol=1e-4)
    assert (expected < 0.5).all()  # each mask removes most of what the whole reference removes
    probability = target_scores(logits[2 * len(x):], targets, "probability")
    torch.testing.assert_close(result.extras["deleted_score"], probability, rtol=1e-4, atol=1e-6)


def test_mask_on_an_image_the_reference_does_not_change_has_nothing_to_delete(digits):
    _, confident, x, targets = digits
    black = torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        target = confident(black).argmax(1)
    result = get_explainer("mask", confident, reference=0.0, n_iter=5).explain(black, target)
    assert (result.maps == 0).all()
    assert torch.isnan(result.extras["deleted_score_relative"]).all()


@pytest.mark.parametrize("value, score", [(0.7, "margin"), (0.7, "probability"), (0.123, "margin")])
def test_mask_on_a_flat_image_deletes_nothing(value, score):
    """A flat image's blur is itself up to rounding: dividing by that noise once made the mask
    delete half the image (map mean 0.59)."""
    torch.manual_seed(0)  # an untrained CNN: its scores move with the faintest texture
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    flat = torch.full((1, 1, 28, 28), value)
    flat[0, 0, 3, 3] += 1e-5  # rounding-sized texture
    with torch.no_grad():
        target = model(flat).argmax(1)
    result = get_explainer("mask", model, score=score, n_iter=30).explain(flat, target)
    assert float(result.maps.abs().max()) < 1e-2, float(result.maps.abs().max())


def test_target_scores_do_not_saturate_and_margin_scales_with_the_logits():
    logits = torch.tensor([[4.0, 1.0, -2.0], [0.5, 0.2, 0.1]])
    targets = torch.tensor([0, 2])
    p = torch.softmax(logits.double(), 1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(target_scores(logits, targets, "log_odds").double(), (p / (1 - p)).log(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_scores(logits, targets, "margin"), torch.tensor([3.0, -0.4]))
    sharp = logits * 1000  # the softmax is exactly one-hot in float32 here
    assert (target_scores(sharp, targets, "probability") == torch.tensor([1.0, 0.0])).all()
    torch.testing.assert_close(target_scores(sharp, targets, "margin"), torch.tensor([3000.0, -400.0]))
    torch.testing.assert_close(target_scores(sharp, targets, "log_odds"), torch.tensor([3000.0, -400.0]),
                               rtol=1e-6, atol=1e-3)
