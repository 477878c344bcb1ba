"""Known answers for SmoothGrad (seeded per image) and Grad-CAM (raw, hooks removed)."""
import pytest
import torch
from torch import nn

from saliency_audit.explainers import get_explainer


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 3)).eval()


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 10, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


# --- SmoothGrad -------------------------------------------------------------------------

def test_smoothgrad_same_image_and_seed_give_the_same_map_alone_and_in_another_batch():
    model = small_cnn()
    x, t = batch(4)
    other, other_t = batch(3, seed=1)
    explainer = get_explainer("smoothgrad", model, n_samples=8, max_expanded_batch=5)
    seeds = torch.tensor([11, 12, 13, 14])
    in_batch = explainer.explain(x, t, seeds).maps
    alone = explainer.explain(x[2:3], t[2:3], seeds[2:3]).maps
    mixed = explainer.explain(torch.cat([other, x[2:3]]), torch.cat([other_t, t[2:3]]),
                              torch.tensor([1, 2, 3, 13])).maps
    torch.testing.assert_close(alone[0], in_batch[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixed[3], in_batch[2], rtol=1e-5, atol=1e-7)
    different = explainer.explain(x[2:3], t[2:3], torch.tensor([99])).maps
    assert not torch.allclose(different, alone)


def test_smoothgrad_without_noise_is_the_gradient():
    model = small_cnn()
    x, t = batch(3)
    unsigned = get_explainer("smoothgrad", model, n_samples=3, noise_level=0.0, absolute=True)
    assert torch.allclose(unsigned.explain(x, t).maps, get_explainer("sal", model).explain(x, t).maps,
                          rtol=1e-5, atol=1e-7)
    assert not unsigned.signed
    signed = get_explainer("smoothgrad", model, n_samples=2, noise_level=0.0)  # the default: signed
    assert signed.signed and signed.options()["absolute"] is False
    torch.testing.assert_close(signed.explain(x, t).maps,
                               get_explainer("sal", model, absolute=False).explain(x, t).maps, rtol=1e-5, atol=1e-7)
    grad_x_input = get_explainer("grad", model).explain(x, t).maps
    # grad x input / x, one channel: the signed gradient
    torch.testing.assert_close(signed.explain(x, t).maps * x[:, 0], grad_x_input, rtol=1e-4, atol=1e-6)


def test_signed_maps_by_default_beat_unsigned_ones_on_deletion(demo_model, demo_images):
    """An unsigned map ranks evidence against the class as high as evidence for it, which deletion
    punishes: smoothgrad's default is the signed mean gradient, and sal offers the signed gradient."""
    from saliency_audit.explainers.metrics import deletion_auc, random_maps
    x, _ = demo_images
    x, seeds = x[:32], torch.arange(32)
    with torch.no_grad():
        t = demo_model(x).argmax(1)
    reference = deletion_auc(demo_model, x, random_maps((32, 28, 28), seeds), t, seeds=seeds).mean()

    def ratio(name, **options):
        maps = get_explainer(name, demo_model, **options).explain(x, t, seeds).maps
        return float(deletion_auc(demo_model, x, maps, t, seeds=seeds).mean() / reference)

    # first 100 test digits, n_samples 50: smoothgrad 0.16 signed, 0.30 unsigned; sal 0.15 and 0.29
    assert ratio("smoothgrad", n_samples=10) < 0.75 * ratio("smoothgrad", n_samples=10, absolute=True)
    assert ratio("sal", absolute=False) < 0.75 * ratio("sal")


def test_smoothgrad_chunking_does_not_change_the_result():
    model = small_cnn()
    x, t = batch(3)
    seeds = torch.tensor([1, 2, 3])
    a = get_explainer("smoothgrad", model, n_samples=6, max_expanded_batch=4).explain(x, t, seeds).maps
    b = get_explainer("smoothgrad", model, n_samples=6, max_expanded_batch=100).explain(x, t, seeds).maps
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_smoothgrad_passes_and_bad_options():
    assert get_explainer("smoothgrad", small_cnn(), n_samples=7).passes() == {"forward": 7, "backward": 7}
    for options in (dict(n_samples=0), dict(noise_level=-0.1), dict(absolute="yes"), dict(max_expanded_batch=0)):
        with pytest.raises(ValueError):
            get_explainer("smoothgrad", small_cnn(), **options)
    with pytest.raises(ValueError, match="absolute must be True or False"):
        get_explainer("sal", small_cnn(), absolute=1)


# --- Grad-CAM ----------------------------------------------------------------------------

class CAMNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: Grad-CAM on the ReLU equals CAM / (h w)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def test_gradcam_on_a_global_pool_network_is_class_activation_mapping():
    torch.manual_seed(0)
    model = CAMNet().eval()
    x, t = batch(3)
    maps = get_explainer("gradcam", model, layer="act", weighting="mean").explain(x, t).maps
    with torch.no_grad():
        a = model.act(model.conv(x))
        cam = torch.relu((model.fc.weight[t][:, :, None, None] * a).sum(1)) / (10 * 10)
    torch.testing.assert_close(maps, cam, rtol=1e-4, atol=1e-7)


def test_gradcam_is_non_negative_raw_upsampled_and_removes_its_hooks():
    model = small_cnn()
    x, t = batch(4)
    explainer = get_explainer("gradcam", model)
    assert explainer.layer is None and explainer.options() == {"layer": None, "weighting": "elementwise"}
    maps = explainer.explain(x, t).maps
    assert explainer.layer_used == "4"  # the ReLU after the last Conv2d
    assert maps.shape == (4, 10, 10) and (maps >= 0).all()
    assert maps.max() > 0 and not torch.allclose(maps.amax((1, 2)), torch.ones(4))  # not scaled to 1
    assert all(not m._forward_hooks for m in model.modules())


class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(100, 2)

    def forward(self, x):
        return self.fc(self.conv(self.conv(x)).flatten(1))


def test_gradcam_errors_and_hooks_removed_after_them():
    with pytest.raises(ValueError, match="no module named 'nope'"):
        get_explainer("gradcam", small_cnn(), layer="nope")
    with pytest.raises(ValueError, match="no layer's output keeps the image's spatial grid"):
        get_explainer("gradcam", nn.Sequential(nn.Flatten(), nn.Linear(100, 2))).explain(
            torch.rand(1, 1, 10, 10), torch.tensor([0]))
    model = Reuse()
    with pytest.raises(ValueError, match="ran 2 times"):
        get_explainer("gradcam", model).explain(torch.rand(1, 1, 10, 10), torch.tensor([0]))
    assert not model.conv._forward_hooks
    with pytest.raises(ValueError, match="TorchScript"):
        get_explainer("gradcam", torch.jit.script(small_cnn()))


def test_gradcam_passes():
    assert get_explainer("gradcam", small_cnn()).passes() == {"forward": 1, "backward": 1}
