"""Tests of saliency_audit.explainers.metrics on a model whose decision depends on one square region only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from saliency_audit.explainers.metrics import (
    auc,
    cascading_randomization,
    default_steps,
    deletion_auc,
    deletion_curve,
    gini,
    insertion_auc,
    insertion_curve,
    lipschitz_ratios,
    make_substrate,
    parameterised_layers,
    prediction_unchanged,
    random_maps,
    relevance_flip_rate,
    salt_and_pepper,
    sanity_rank_correlation,
    spearman_rank_correlation,
    ssim,
)

torch.set_num_threads(1)

C, H, W = 3, 16, 16
ROWS, COLS = slice(4, 8), slice(6, 10)          # the 4x4 region the model reads


class RegionModel(torch.nn.Module):
    """Logits [0, sum(region over channels) - 4C]: class 1 iff the region is bright enough."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 1, H, W)
        mask[..., ROWS, COLS] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        s = (x * self.mask).sum(dim=(1, 2, 3)) - 4 * x.shape[1]
        return torch.stack([torch.zeros_like(s), s], dim=1)


def region_map(batch: int) -> torch.Tensor:
    maps = torch.zeros(batch, H, W)
    maps[:, ROWS, COLS] = 1.0
    return maps


def probability(model, images, targets):
    with torch.no_grad():
        return torch.softmax(model(images), dim=1)[torch.arange(len(targets)), targets]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    images = 0.5 + 0.5 * torch.rand(12, C, H, W, generator=g)   # region sum >= 24 > 12: class 1
    targets = torch.ones(12, dtype=torch.long)
    seeds = torch.arange(100, 112)
    return RegionModel().eval(), images, targets, seeds


def test_perfect_map_beats_random_order(data):
    model, images, targets, seeds = data
    perfect = region_map(len(images))
    reference = random_maps(perfect.shape, seeds)
    kwargs = dict(seeds=seeds, max_forward_batch=50)
    del_perfect = deletion_auc(model, images, perfect, targets, **kwargs)
    del_random = deletion_auc(model, images, reference, targets, **kwargs)
    ins_perfect = insertion_auc(model, images, perfect, targets, **kwargs)
    ins_random = insertion_auc(model, images, reference, targets, **kwargs)
    assert del_perfect.shape == ins_perfect.shape == (len(images),)
    assert del_perfect.max() < 0.1 and del_random.mean() > 0.4
    assert ins_perfect.min() > 0.9 and ins_random.mean() < 0.75
    assert bool((del_perfect < del_random - 0.2).all()) and bool((ins_perfect > ins_random + 0.2).all())


def test_random_map_sits_near_random_reference(data):
    model, images, targets, seeds = data
    other = random_maps((len(images), H, W), seeds + 1000)
    reference = random_maps((len(images), H, W), seeds)
    for metric in (deletion_auc, insertion_auc):
        a = metric(model, images, other, targets, seeds=seeds).mean()
        b = metric(model, images, reference, targets, seeds=seeds).mean()
        assert abs(float(a - b)) < 0.12


@pytest.mark.parametrize("substrate", ["zero", "blur", "mean", 0.25])
def test_curve_points_and_end_values(data, substrate):
    model, images, targets, seeds = data
    maps = torch.randn(len(images), H, W, generator=torch.Generator().manual_seed(1))
    deletion = deletion_curve(model, images, maps, targets, substrate=substrate, seeds=seeds, steps=8)
    insertion = insertion_curve(model, images, maps, targets, substrate=substrate, seeds=seeds, steps=8)
    assert deletion.shape == insertion.shape == (len(images), 9)
    intact = probability(model, images, targets)
    empty = probability(model, make_substrate(substrate, images), targets)
    torch.testing.assert_close(deletion[:, 0], intact)
    torch.testing.assert_close(deletion[:, -1], empty)
    torch.testing.assert_close(insertion[:, 0], empty)
    torch.testing.assert_close(insertion[:, -1], intact)
    assert default_steps(H) == H and default_steps(224) == 64
    assert deletion_curve(model, images[:2], maps[:2], targets[:2]).shape == (2, H + 1)


def test_results_do_not_depend_on_the_batch(data):
    model, images, targets, seeds = data
    maps = region_map(len(images))              # many ties: the seeded tie-break decides the order
    full = deletion_curve(model, images, maps, targets, seeds=seeds, steps=32, max_forward_batch=13)
    alone = deletion_curve(model, images[5:6], maps[5:6], targets[5:6], seeds=seeds[5:6], steps=32)
    order = torch.tensor([7, 5, 2])
    mixed = deletion_curve(model, images[order], maps[order], targets[order], seeds=seeds[order], steps=32,
                           max_forward_batch=1000)
    torch.testing.assert_close(alone[0], full[5])
    torch.testing.assert_close(mixed, full[order])
    ins_full = insertion_curve(model, images, maps, targets, seeds=seeds, steps=32)
    ins_alone = insertion_curve(model, images[5:6], maps[5:6], targets[5:6], seeds=seeds[5:6], steps=32)
    torch.testing.assert_close(ins_alone[0], ins_full[5])
    torch.testing.assert_close(random_maps((1, H, W), seeds[5:6])[0], random_maps((12, H, W), seeds)[5])


def test_auc_trapezoid():
    curves = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(auc(curves), torch.tensor([1.0, 0.5, 0.25]))
    with pytest.raises(ValueError):
        auc(torch.ones(3))


def test_gini():
    one_hot = torch.zeros(2, H, W)
    one_hot[0, 3, 4] = 5.0
    one_hot[1, 0, 0] = -2.0                       # sparsity of |map|
    torch.testing.assert_close(gini(one_hot), torch.full((2,), 1 - 1 / (H * W)))
    constant = torch.full((1, H, W), 0.3)
    torch.testing.assert_close(gini(torch.cat([constant, torch.zeros(1, H, W)])), torch.zeros(2))


def test_relevance_flip_rate_region_model(data):
    model, images, targets, _ = data
    g = torch.Generator().manual_seed(2)
    good = 0.5 * torch.rand(len(images), H, W, generator=g)      # outside: least relevant
    good[:, ROWS, COLS] += 1.0
    flips = relevance_flip_rate(model, images, good, targets, max_forward_batch=64)
    assert flips.shape == (len(images), 21)
    assert flips[:, :19].sum() == 0               # up to the 90th percentile only outside pixels go
    assert bool((flips[:, -1] == 1).all())        # the max step blanks everything
    bad = -good                                    # the region is now "least relevant"
    assert bool((relevance_flip_rate(model, images, bad, targets, percentiles=(10,)) == 1).all())
    assert relevance_flip_rate(model, images, good, targets, percentiles=(0, 50), fill=1.0).sum() == 0


def test_salt_and_pepper_alters_about_two_elevenths():
    images = 0.2 + 0.6 * torch.rand(4, C, H, W, generator=torch.Generator().manual_seed(3))
    seeds = torch.tensor([1, 2, 3, 4])
    copies = salt_and_pepper(images, seeds)
    assert copies.shape == (4, 20, C, H, W)
    changed = copies != images.unsqueeze(1)
    assert bool((changed.all(dim=2) == changed.any(dim=2)).all())   # all channels of a pixel together
    assert abs(changed[:, :, 0].float().mean().item() - 2 / 11) < 0.02
    assert abs((copies[:, :, 0] == 0).float().mean().item() - 1 / 11) < 0.015
    torch.testing.assert_close(salt_and_pepper(images[2:3], seeds[2:3])[0], copies[2])


def test_lipschitz_ratios():
    images = torch.rand(3, C, H, W, generator=torch.Generator().manual_seed(4))
    maps = torch.randn(3, H, W, generator=torch.Generator().manual_seed(5))
    neighbours = salt_and_pepper(images, [0, 1, 2], n_copies=5)
    same = maps.unsqueeze(1).expand(3, 5, H, W)
    mean, worst = lipschitz_ratios(maps, same, images, neighbours)
    torch.testing.assert_close(mean, torch.zeros(3))
    torch.testing.assert_close(worst, torch.zeros(3))
    # Scale does not matter (each array is min-max scaled on its own); a different map does.
    mean, _ = lipschitz_ratios(maps, 10 * same + 3, images, neighbours)
    torch.testing.assert_close(mean, torch.zeros(3))
    other = torch.randn(3, 5, H, W, generator=torch.Generator().manual_seed(6))
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1] = False
    mean, worst = lipschitz_ratios(maps, other, images, neighbours, valid=valid)
    assert bool((mean[[0, 2]] > 0).all()) and bool((worst[[0, 2]] >= mean[[0, 2]]).all())
    assert torch.isnan(mean[1]) and torch.isnan(worst[1])


def test_prediction_unchanged(data):
    model, images, _, seeds = data
    neighbours = torch.stack([images, torch.zeros_like(images)], dim=1)   # black: class 0
    keep = prediction_unchanged(model, images, neighbours, max_forward_batch=5)
    assert keep[:, 0].all() and not keep[:, 1].any()


def _small_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(C, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * H * W, 10),
    ).eval()
    with torch.no_grad():                          # "trained" BatchNorm: not its initial 1 / 0
        model[2].weight.uniform_(0.5, 1.5)
        model[2].running_mean.uniform_(-1, 1)
    return model


def test_cascading_randomization_top_down_on_copies():
    model = _small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = list(cascading_randomization(model, seed=7))
    assert [name for name, _ in steps] == ["6", "3", "2", "0"]    # Linear, Conv, BatchNorm, Conv
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the user's model changed at {k}"
    randomised: set[str] = set()
    for name, copy_ in steps:
        randomised.add(name)
        assert copy_ is not model and not copy_.training
        params = dict(copy_.named_parameters())
        for layer in ["6", "3", "2", "0"]:
            same = torch.equal(params[f"{layer}.weight"], before[f"{layer}.weight"])
            assert same != (layer in randomised), (name, layer)
    assert len({id(m) for _, m in steps}) == len(steps)
    assert torch.equal(steps[2][1][2].running_mean, torch.zeros(4))   # BatchNorm statistics reset too
    # Same seed, same draws; the global RNG is left alone.
    state = torch.random.get_rng_state()
    again = list(cascading_randomization(model, seed=7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again[-1][1][6].weight, steps[-1][1][6].weight)


def test_parameterised_layers_follow_execution_order():
    class Reversed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 2)      # registered first, runs last
            self.body = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.head(self.body(x))

    model = Reversed()
    assert [n for n, _ in parameterised_layers(model)] == ["body", "head"]
    assert [n for n, _ in parameterised_layers(model, torch.zeros(1, 3))] == ["head", "body"]
    assert [n for n, _ in cascading_randomization(model, example_input=torch.zeros(1, 3))] == ["head", "body"]


def test_spearman_rank_correlation():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(3, H, W, generator=g)
    a[0, :4] = 0.0                                                   # ties
    torch.testing.assert_close(spearman_rank_correlation(a, a), torch.ones(3))
    torch.testing.assert_close(spearman_rank_correlation(a, -a), -torch.ones(3))
    torch.testing.assert_close(spearman_rank_correlation(a, -a, absolute=True), torch.ones(3))
    b = torch.round(torch.randn(3, H, W, generator=g))              # many ties
    expected = [spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(3)]
    np.testing.assert_allclose(spearman_rank_correlation(a, b).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_sanity_rank_correlation_counts_a_map_that_lost_its_ranking_as_zero():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, H, W, generator=g), torch.randn(4, H, W, generator=g)
    a[1], b[2], a[3], b[3] = 0.0, 0.0, 1.0, 1.0  # trained constant; the other constant; both
    rho = sanity_rank_correlation(a, b)
    torch.testing.assert_close(rho[0], spearman_rank_correlation(a, b)[0])
    assert torch.isnan(rho[1]) and rho[2] == 0.0 and torch.isnan(rho[3])
    b[0] = -b[0].abs()  # signed it ranks, absolute it still does; a map of +-1 ranks only signed
    b[2] = torch.where(a[2] > 0, 1.0, -1.0)
    assert sanity_rank_correlation(a, b, absolute=True)[2] == 0.0 and sanity_rank_correlation(a, b)[2] > 0.5

def test_ssim():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(2, H, W, generator=g)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    torch.testing.assert_close(ssim(a, 5 * a + 1), torch.ones(2))  # min-max scaled first
    b = a + 0.5 * torch.randn(2, H, W, generator=g)
    scale = lambda t: ((t - t.min()) / (t.max() - t.min())).numpy().astype(np.float64)  # noqa: E731
    expected = [structural_similarity(scale(a[i]), scale(b[i]), data_range=1.0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False) for i in range(2)]
    np.testing.assert_allclose(ssim(a, b).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert bool((ssim(a, b) < 1).all())


def test_clear_errors(data):
    model, images, targets, seeds = data
    maps = region_map(len(images))
    with pytest.raises(ValueError, match="substrate"):
        deletion_curve(model, images, maps, targets, substrate="noise")
    with pytest.raises(ValueError, match="maps"):
        deletion_curve(model, images, maps[:, :4], targets)
    with pytest.raises(ValueError, match="steps"):
        insertion_curve(model, images, maps, targets, steps=0)
    with pytest.raises(ValueError, match="seeds"):
        deletion_curve(model, images, maps, targets, seeds=seeds[:3])
    with pytest.raises(ValueError, match="percentiles"):
        relevance_flip_rate(model, images, maps, targets, percentiles=(101,))


def test_fills_per_channel(data):
    """Normalised inputs need one fill value per channel; a repeated value equals the scalar."""
    model, images, targets, seeds = data
    maps = torch.randn(len(images), H, W, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(relevance_flip_rate(model, images, maps, targets, fill=[1.0] * C),
                               relevance_flip_rate(model, images, maps, targets, fill=1.0))
    copies = salt_and_pepper(images[:2], seeds[:2], low=[0.0, 0.5, 1.0][:C], high=2.0)
    low = (copies != images[:2].unsqueeze(1)) & (copies != 2.0)
    for channel, value in enumerate([0.0, 0.5, 1.0][:C]):
        assert bool((copies[:, :, channel][low[:, :, channel]] == value).all())
    with pytest.raises(ValueError, match="one per channel"):
        relevance_flip_rate(model, images, maps, targets, fill=[0.0, 1.0])
