"""ROAD and the localisation metrics: agreement with Quantus 0.6.0, known answers, batch
independence and hostile input."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from conftest import torchvision_stand_in
from torch import nn

from saliency_audit.explainers.metrics._utils import generator
from saliency_audit.explainers.metrics.localisation import (
    BAD_MAP,
    EMPTY_MASK,
    NO_RELEVANCE,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from saliency_audit.explainers.metrics.road import linear_imputation, noisy_linear_imputation, removal_counts, road

QUANTUS_INSTALL = ("pip install --no-deps quantus==0.6.0 && pip install pandas opencv-python-headless cachetools")
LOCALISATION = (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy)


@pytest.fixture(scope="module")
def quantus():
    """Quantus, imported with torchvision stand-ins while it loads (it imports zennit, whose
    __init__ needs torchvision.models.resnet)."""
    if importlib.util.find_spec("quantus") is None:
        pytest.skip(f"quantus is not installed ({QUANTUS_INSTALL})")
    try:
        with torchvision_stand_in():
            import quantus
            import quantus.functions.perturb_func
    except ImportError as error:
        pytest.skip(f"quantus does not import ({error}); {QUANTUS_INSTALL}")
    return quantus


def top_indices(maps: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-maps.reshape(len(maps), -1), axis=1)[:, :k]


def removed_mask(maps: np.ndarray, k: int) -> torch.Tensor:
    mask = np.zeros(maps.reshape(len(maps), -1).shape, dtype=bool)
    np.put_along_axis(mask, top_indices(maps, k), True, axis=1)
    return torch.from_numpy(mask.reshape(maps.shape))


# ---------------------------------------------------------------- ROAD: imputation

@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (2, 3, 9, 11), (2, 2, 6, 70)])  # 70 wide: the sparse-LU path
def test_imputation_equals_quantus(quantus, shape):
    rng = np.random.default_rng(1)
    images = rng.random(shape).astype(np.float32)
    maps = rng.random((shape[0], *shape[2:]))
    impute = quantus.functions.perturb_func.noisy_linear_imputation
    for p in (1, 37, 80, 99):
        k = removal_counts([p], shape[2] * shape[3])[0]
        ref = np.stack([impute(arr=images[i], indices=top_indices(maps, k)[i], noise=0.0)
                        for i in range(shape[0])])
        ours = linear_imputation(torch.from_numpy(images), removed_mask(maps, k)).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_imputation_known_answers():
    # A linear ramp is harmonic for the symmetric stencil: imputing interior pixels gives it back.
    ramp = (torch.arange(8.0).view(1, 1, 1, 8) + 2 * torch.arange(8.0).view(1, 1, 8, 1)).double()
    removed = torch.zeros(1, 8, 8, dtype=torch.bool)
    removed[0, 2:6, 1:7] = True
    torch.testing.assert_close(linear_imputation(ramp, removed), ramp)
    # One removed pixel amid a constant image takes that constant; kept pixels are untouched.
    image = torch.full((1, 2, 5, 5), 0.25)
    image[0, :, 2, 2] = 9.0
    removed = torch.zeros(1, 5, 5, dtype=torch.bool)
    removed[0, 2, 2] = True
    assert torch.equal(linear_imputation(image, removed), torch.full((1, 2, 5, 5), 0.25))
    # A removed corner pixel averages its 3 neighbours with weights 1/6, 1/6, 1/12 (renormalised).
    image = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    image[0, 0, 0, 1], image[0, 0, 1, 0], image[0, 0, 1, 1] = 1.0, 2.0, 4.0
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, 0, 0] = True
    expected = (1 / 6 * 1 + 1 / 6 * 2 + 1 / 12 * 4) / (1 / 6 + 1 / 6 + 1 / 12)
    assert linear_imputation(image, removed)[0, 0, 0, 0].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="every pixel"):
        linear_imputation(image, torch.ones(1, 3, 3, dtype=torch.bool))


def test_noise_is_seeded_per_image_and_only_on_removed_pixels():
    images = torch.rand(3, 2, 10, 10, generator=torch.Generator().manual_seed(0))
    removed = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    noisy = noisy_linear_imputation(images, removed, 0.05, [generator(s, 7) for s in (4, 5, 6)])
    plain = linear_imputation(images, removed)
    kept = ~removed.unsqueeze(1).expand_as(images)
    assert torch.equal(noisy[kept], images[kept])
    assert 0.03 < (noisy - plain)[~kept].std().item() < 0.07
    alone = noisy_linear_imputation(images[1:2], removed[1:2], 0.05, [generator(5, 7)])
    torch.testing.assert_close(alone, noisy[1:2])


# ---------------------------------------------------------------- ROAD: curves

def test_road_correct_flags_equal_quantus(quantus, demo_model, demo_images):
    images, labels = demo_images[0][:4], demo_images[1][:4]
    maps = torch.rand(4, 28, 28, generator=torch.Generator().manual_seed(3))
    percentages = [1, 10, 30, 50, 70, 90, 99]
    ours = road(demo_model, images, maps, labels, percentages=percentages, noise=0.0, orders=("morf",))
    metric = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True, display_progressbar=False)
    for i in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = metric(model=demo_model, x_batch=images[i:i + 1].numpy(), y_batch=labels[i:i + 1].numpy(),
                         a_batch=maps[i:i + 1, None].numpy(), channel_first=True, device="cpu")
        assert ours.morf_correct[i].tolist() == [bool(ref[p]) for p in percentages]
    # The flags move: the intact-ish image is right, most of it removed is not always right.
    assert ours.morf_correct[:, 0].all() and not ours.morf_correct[:, -1].all()


class LeftHalfModel(nn.Module):
    """Class 1's logit is 20 * (the mean of the left half of the image - 0.5); class 0's is 0."""

    def forward(self, x):
        m = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 20 * (m - 0.5)], 1)


def test_road_known_answer_morf_below_lerf():
    # A bright left half is the evidence: removing it first (MoRF by the true map) imputes from
    # the dark right half and kills the score; removing the right half first (LeRF) keeps it.
    images = torch.zeros(2, 1, 12, 12)
    images[:, :, :, :6] = 1.0
    truth = torch.zeros(2, 12, 12)
    truth[:, :, :6] = 1.0
    truth += 0.01 * torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(0))
    curves = road(LeftHalfModel(), images, truth, torch.ones(2, dtype=torch.long),
                  percentages=[10, 30, 50], noise=0.0)
    # At 50% the whole left half is gone (MoRF: imputed from the black right half) or kept
    # (LeRF: the right half is imputed from the white left half).
    assert (curves.morf[:, -1] < 0.01).all() and (curves.lerf > 0.99).all()
    assert (curves.gap > 0.2).all()
    assert curves.lerf_correct.all() and not curves.morf_correct[:, -1].any()
    reversed_curves = road(LeftHalfModel(), images, -truth, torch.ones(2, dtype=torch.long),
                           percentages=[10, 30, 50], noise=0.0)
    torch.testing.assert_close(reversed_curves.morf, curves.lerf)


def test_road_batch_independent_with_noise(demo_model, demo_images):
    images, labels = demo_images[0][:5], demo_images[1][:5]
    maps = torch.randn(5, 28, 28, generator=torch.Generator().manual_seed(4))
    maps[2] = 0.0                                             # constant map: seeded random order
    seeds = torch.tensor([11, 12, 13, 14, 15])
    kwargs = dict(percentages=[5, 40, 80], max_forward_batch=3)
    batch = road(demo_model, images, maps, labels, seeds=seeds, **kwargs)
    for i in (0, 2, 4):
        one = road(demo_model, images[i:i + 1], maps[i:i + 1], labels[i:i + 1], seeds=seeds[i:i + 1], **kwargs)
        torch.testing.assert_close(one.morf[0], batch.morf[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(one.lerf_auc[0], batch.lerf_auc[i], atol=1e-5, rtol=0)
        assert torch.equal(one.morf_correct[0], batch.morf_correct[i])
    other = road(demo_model, images[:1], maps[:1], labels[:1], seeds=[99], **kwargs)
    assert not torch.equal(other.morf, batch.morf[:1])        # the seed drives the noise


def test_road_hostile_inputs(demo_model, demo_images):
    images, labels = demo_images[0][:3], demo_images[1][:3]
    maps = torch.rand(3, 28, 28)
    maps[1, 4, 4] = float("nan")
    curves = road(demo_model, images, maps, labels, percentages=[20, 60], noise=0.0)
    assert curves.reasons == (None, "map has NaN or infinite values", None)
    assert curves.morf[1].isnan().all() and curves.lerf_auc[1].isnan()
    assert not curves.morf_correct[1].any()
    assert torch.isfinite(curves.morf[[0, 2]]).all()
    for bad, name in [(dict(percentages=[100]), "percentages"), (dict(percentages=[]), "percentages"),
                      (dict(noise=-1.0), "noise"), (dict(orders=("up",)), "orders"),
                      (dict(max_forward_batch=0), "max_forward_batch")]:
        with pytest.raises(ValueError, match=name):
            road(demo_model, images, maps, labels, **bad)
    with pytest.raises(ValueError, match="maps"):
        road(demo_model, images, maps[:, :10], labels)
    with pytest.raises(ValueError, match="targets"):
        road(demo_model, images, maps, labels.float())


# ---------------------------------------------------------------- localisation

def test_localisation_equals_quantus(quantus):
    rng = np.random.default_rng(5)
    maps = rng.normal(size=(6, 1, 14, 14)).astype(np.float32)
    masks = (rng.random((6, 1, 14, 14)) < 0.3).astype(np.float32)
    masks[3] = 0.0
    x, y = rng.random((6, 1, 14, 14)).astype(np.float32), np.zeros(6, dtype=int)
    pairs = [(quantus.PointingGame, pointing_game, maps),
             (quantus.RelevanceRankAccuracy, relevance_rank_accuracy, maps),
             (quantus.RelevanceMassAccuracy, lambda a, s: relevance_mass_accuracy(a, s, positive_only=False), maps),
             (quantus.RelevanceMassAccuracy, relevance_mass_accuracy, np.abs(maps))]
    for metric, ours, a in pairs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = metric(disable_warnings=True, display_progressbar=False)(
                model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=masks, channel_first=True)
        ref = np.asarray(ref, dtype=np.float64)
        got = ours(torch.from_numpy(a[:, 0]), torch.from_numpy(masks[:, 0]))
        keep = np.arange(6) != 3          # Quantus's pointing game returns True on the empty mask
        np.testing.assert_allclose(got.values.numpy()[keep], ref[keep], rtol=1e-5)
        assert np.isnan(got.values[3].item()) and got.reasons[3] == EMPTY_MASK


def test_localisation_known_answers():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, :] = torch.tensor([4.0, 3.0, -5.0, 1.0])
    maps[0, 3, 3] = 2.0
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0:3] = True                                   # holds 4, 3, -5
    assert pointing_game(maps, mask).values.item() == 1.0
    assert pointing_game(maps, mask, absolute=True).values.item() == 1.0     # |-5| is the max, inside
    assert relevance_mass_accuracy(maps, mask).values.item() == pytest.approx(7 / 10)
    assert relevance_mass_accuracy(maps, mask, positive_only=False).values.item() == pytest.approx(2 / 5)
    assert relevance_rank_accuracy(maps, mask).values.item() == pytest.approx(2 / 3)   # top 3: 4, 3, 2
    assert relevance_rank_accuracy(maps, mask, absolute=True).values.item() == pytest.approx(1.0)
    # Tolerance: the max two pixels right of the mask hits with tolerance 2, not 1.
    far = torch.zeros(1, 7, 7)
    far[0, 3, 5] = 1.0
    square = torch.zeros(1, 7, 7)
    square[0, 2:5, 1:4] = 1
    assert pointing_game(far, square, tolerance=1).values.item() == 0.0
    assert pointing_game(far, square, tolerance=2).values.item() == 1.0
    # Ties: expectation over a random pick among the tied pixels.
    tied = torch.tensor([[[1.0, 1.0, 0.0, 1.0]]])
    one = torch.tensor([[[1, 0, 0, 0]]])
    assert pointing_game(tied, one).values.item() == pytest.approx(1 / 3)
    assert relevance_rank_accuracy(tied, one).values.item() == pytest.approx(1 / 3)


def test_localisation_hostile_inputs():
    maps = torch.rand(4, 6, 6)
    maps[1] = 0.5                                            # constant: chance level
    maps[2, 0, 0] = float("inf")
    masks = torch.zeros(4, 6, 6, dtype=torch.uint8)
    masks[:, :3] = 255                                       # nonzero = inside, as Quantus
    masks[3] = 0                                             # empty
    for metric in LOCALISATION:
        scores = metric(maps, masks)
        assert scores.reasons[2] == BAD_MAP and scores.reasons[3] == EMPTY_MASK
        assert scores.values[2:].isnan().all() and not scores.values[:2].isnan().any()
        assert scores.values[1].item() == pytest.approx(0.5)
        full = metric(maps[:2], torch.ones(2, 6, 6))
        assert torch.equal(full.values, torch.ones(2))
        with pytest.raises(ValueError, match="masks"):
            metric(maps, masks[:, :5])
        with pytest.raises(ValueError, match="masks"):
            metric(maps, torch.full((4, 6, 6), float("nan")))
        with pytest.raises(ValueError, match="maps"):
            metric(maps[0], masks[0])
    negative = relevance_mass_accuracy(-maps[:1], masks[:1])
    assert negative.values.isnan().all() and negative.reasons == (NO_RELEVANCE,)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(maps, masks, tolerance=-1)


def test_localisation_batch_independent():
    gen = torch.Generator().manual_seed(6)
    maps = torch.randn(5, 9, 9, generator=gen).round()                     # many ties
    masks = torch.rand(5, 9, 9, generator=gen) < 0.4
    for metric in LOCALISATION:
        batch = metric(maps, masks).values
        alone = torch.cat([metric(maps[i:i + 1], masks[i:i + 1]).values for i in range(5)])
        torch.testing.assert_close(batch, alone)


def test_imputation_in_groups_equals_the_whole_batch(monkeypatch):
    """The solver takes the batch in groups of SOLVE_PIXELS pixels (memory per group, not per
    batch): each image's system is its own, so the values agree."""
    import importlib
    road_module = importlib.import_module("saliency_audit.explainers.metrics.road")  # the package exports the function road
    g = torch.Generator().manual_seed(3)
    images = torch.rand(5, 2, 12, 12, generator=g)
    removed = torch.rand(5, 12, 12, generator=g) > 0.6
    whole = road_module.linear_imputation(images, removed)
    monkeypatch.setattr(road_module, "SOLVE_PIXELS", 2 * 12 * 12)
    torch.testing.assert_close(road_module.linear_imputation(images, removed), whole, rtol=1e-6, atol=1e-9)
