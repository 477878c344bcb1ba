"""Known answers for the perturbation methods: occlusion and meaningful perturbation."""
import pytest
import torch
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.perturbation.occlusion import window_masks, window_starts

SIZE = 12
ROWS, COLS = slice(4, 8), slice(5, 9)  # the only pixels the region model reads


class RegionModel(nn.Module):
    """Two logits; only pixels in ROWS x COLS have non-zero weights (class 1 = bright region)."""

    def __init__(self, channels=1, scale=10.0):
        super().__init__()
        self.fc = nn.Linear(channels * SIZE * SIZE, 2)
        with torch.no_grad():
            weight = torch.zeros(2, channels, SIZE, SIZE)
            weight[1, :, ROWS, COLS] = torch.linspace(0.5, 1.5, 16).view(4, 4) * scale / 16 / channels
            self.fc.weight.copy_(weight.flatten(1))
            self.fc.bias.copy_(torch.tensor([0.0, -0.25 * scale]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def region_images(n=3, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, SIZE, SIZE, generator=g) * 0.3
    x[:, :, ROWS, COLS] = 0.7 + 0.3 * torch.rand(n, channels, 4, 4, generator=g)
    return x


def dilated(reach):
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[max(ROWS.start - reach, 0):ROWS.stop + reach, max(COLS.start - reach, 0):COLS.stop + reach] = True
    return inside


# --- occlusion ---------------------------------------------------------------------------

@pytest.mark.parametrize("score", ["log_odds", "margin", "logit", "probability"])
def test_occlusion_attribution_stays_within_the_window_reach_of_the_region(score):
    x, t = region_images(3, channels=3), torch.ones(3, dtype=torch.long)
    model = RegionModel(channels=3).eval()
    maps = get_explainer("occlusion", model, window=3, stride=2, score=score).explain(x, t).maps
    assert maps.shape == (3, SIZE, SIZE) and torch.isfinite(maps).all()
    assert (maps[:, ~dilated(2)] == 0).all()  # a window 2 px away can still touch the region
    assert (maps[:, ROWS, COLS] > 0).all()  # occluding the region always lowers the score


def test_occlusion_with_one_pixel_windows_is_weight_times_input_for_a_linear_logit():
    model = RegionModel().eval()
    x, t = region_images(2), torch.ones(2, dtype=torch.long)
    maps = get_explainer("occlusion", model, window=1, stride=1, score="logit").explain(x, t).maps
    expected = model.fc.weight[1].view(1, SIZE, SIZE) * x[:, 0]
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_occlusion_covers_every_pixel_even_when_the_stride_skips_the_border():
    assert window_starts(13, 4, 4) == [0, 4, 8, 9]
    assert window_starts(28, 4, 2) == list(range(0, 25, 2))
    assert window_masks(13, 13, 4, 4).any(0).all()
    model = RegionModel().eval()
    x = torch.rand(1, 1, 13, 13)
    model.fc = nn.Linear(13 * 13, 2)
    maps = get_explainer("occlusion", model, window=4, stride=4, fill=0.5).explain(x, torch.tensor([1])).maps
    assert torch.isfinite(maps).all()


def test_occlusion_windows_scale_with_the_image():
    """The default window is a seventh of the shorter side (at least 4) and the stride half of it:
    4 and 2 on 28-32 px images as before, 32 and 16 at 224 px (169 windows, not 12,321 of 4 px)."""
    class Pooled(nn.Module):  # any size in, two logits out
        def forward(self, x):
            pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
            return torch.stack([pooled[:, :8].sum(1), pooled[:, 8:].sum(1)], 1)

    model = Pooled()
    for size, window, stride in ((28, 4, 2), (32, 4, 2), (224, 32, 16)):
        x, t = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)), torch.tensor([1])
        default = get_explainer("occlusion", model)
        maps = default.explain(x, t).maps
        torch.testing.assert_close(maps, get_explainer("occlusion", model, window=window, stride=stride).explain(x, t).maps)
        assert default.passes()["forward"] == len(window_starts(size, window, stride)) ** 2 + 1
    assert default.passes()["forward"] == 13 * 13 + 1


def test_occlusion_chunking_and_batching_do_not_change_the_maps():
    model = RegionModel().eval()
    x, t = region_images(3), torch.tensor([1, 0, 1])
    whole = get_explainer("occlusion", model, window=3, stride=1).explain(x, t).maps
    chunked = get_explainer("occlusion", model, window=3, stride=1, max_forward_batch=7).explain(x, t).maps
    torch.testing.assert_close(chunked, whole)
    single = get_explainer("occlusion", model, window=3, stride=1).explain(x[1:2], t[1:2]).maps
    torch.testing.assert_close(single, whole[1:2])


def test_occlusion_passes_count_the_windows_of_the_last_image_size():
    explainer = get_explainer("occlusion", RegionModel().eval())
    assert explainer.passes() == {"forward": 13 * 13 + 1, "backward": 0}  # 28 px before any batch
    explainer.explain(region_images(1), torch.tensor([1]))
    assert explainer.passes() == {"forward": 5 * 5 + 1, "backward": 0}  # 12 px: starts 0,2,4,6,8


@pytest.mark.parametrize("options", [dict(window=0), dict(stride=-1), dict(window=2.5), dict(fill="grey"),
                                     dict(score="softmax"), dict(max_forward_batch=0)])
def test_occlusion_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        get_explainer("occlusion", RegionModel(), **options)


def test_occlusion_window_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="larger than the image"):
        get_explainer("occlusion", RegionModel(), window=13).explain(region_images(1), torch.tensor([1]))


# --- meaningful perturbation -------------------------------------------------------------------

def mask_explainer(**options):
    options = {"reference": 0.0, "mask_size": 6, "n_iter": 60, **options}
    return get_explainer("mask", RegionModel().eval(), **options)


def test_mask_deletion_lowers_the_target_probability_and_finds_the_region():
    explainer = mask_explainer()
    x, t = region_images(4), torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        before = torch.softmax(explainer.model(x), 1)[:, 1]
    assert (before > 0.9).all()
    result = explainer.explain(x, t)
    deleted = result.extras["deleted_score"]
    assert deleted.shape == (4,) and (deleted < 0.1).all()
    maps = result.maps
    assert maps.shape == (4, SIZE, SIZE) and (maps >= 0).all() and (maps <= 1).all()
    # the deleted area is on the region, and the rest of the image is mostly kept
    assert (maps[:, ROWS, COLS].mean((1, 2)) > 0.5).all()
    assert (maps[:, ~dilated(2)].mean(1) < 0.2).all()
    # deleted_score is the probability on the image perturbed with the returned map
    with torch.no_grad():
        again = torch.softmax(explainer.model((1 - maps[:, None]) * x), 1)[:, 1]
    torch.testing.assert_close(again, deleted, rtol=1e-4, atol=1e-6)


def test_mask_with_blur_reference_runs_and_is_deterministic_per_seed():
    explainer = mask_explainer(reference="blur", blur_sigma=2.0, noise=0.05, n_iter=20)
    x, t = region_images(3), torch.ones(3, dtype=torch.long)
    seeds = torch.tensor([5, 6, 7])
    first = explainer.explain(x, t, seeds)
    torch.testing.assert_close(explainer.explain(x, t, seeds).maps, first.maps)
    alone = explainer.explain(x[2:], t[2:], seeds[2:])
    torch.testing.assert_close(alone.maps, first.maps[2:], rtol=1e-4, atol=1e-5)


def test_mask_passes_and_default_mask_size():
    explainer = get_explainer("mask", RegionModel(), n_iter=10)
    assert explainer.passes() == {"forward": 13, "backward": 10}  # + the image, the reference, the result
    assert explainer.options()["mask_size"] is None  # a quarter of the image side


@pytest.mark.parametrize("options", [dict(mask_size=0), dict(reference="noise"), dict(blur_sigma=-1),
                                     dict(l1_coeff=-0.1), dict(tv_beta=0), dict(lr=0), dict(n_iter=0),
                                     dict(noise=-1), dict(score="softmax"), dict(init=1.5), dict(init=True)])
def test_mask_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        get_explainer("mask", RegionModel(), **options)


class DimmerIsStronger(nn.Module):
    """Class 1's logit rises as the square in ROWS x COLS dims from 1 to 0.7, then falls with it to 0:
    in closed form, what a confident network does to the deletion game (the trained ResNet of
    tests/pipelines/test_resnet_trained.py: deleting a little of its planted square raises its margin)."""

    def forward(self, x):
        v = x[:, 0, ROWS, COLS].mean((1, 2))
        return torch.stack([torch.zeros_like(v), 10 * v - 12 * torch.relu(v - 0.7)], 1)


def test_mask_deletes_evidence_whose_score_first_rises_as_it_fades():
    """From a mask of 1 the score's slope at the image says "keep the square", the mask is clamped at
    1 and deletes nothing: the map is 0 (the default start until issue 25). From the default start
    the square is deleted and the rest kept."""
    x = torch.zeros(1, 1, SIZE, SIZE)
    x[0, 0, ROWS, COLS] = 1.0
    t = torch.ones(1, dtype=torch.long)
    model = DimmerIsStronger()
    stuck = get_explainer("mask", model, reference=0.0, mask_size=6, init=1.0).explain(x, t)
    assert not stuck.maps.any() and stuck.extras["deleted_score_relative"][0] > 0.99
    result = get_explainer("mask", model, reference=0.0, mask_size=6).explain(x, t)
    m = result.maps[0]
    assert result.extras["deleted_score_relative"][0] < 0.2
    assert m[ROWS, COLS].mean() > 0.7 and m[~dilated(2)].mean() < 0.2
