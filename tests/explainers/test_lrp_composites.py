"""LRP composites (elrp's composite option and the lrp method): map for map equal to Zennit's
composites on VGG- and ResNet-18-shaped networks, conservation where the rules conserve,
z-box bounds carried through a normalisation inside the model and from --mean/--std, and
clear errors."""
import pytest
import torch
from test_lrp import VGG, logits_of, randomise_batchnorm, resnet, zennit_relevance
from torch import nn

from saliency_audit.explainers import get_explainer, list_methods
from saliency_audit.explainers.relevance.rules import COMPOSITES
from saliency_audit.pipelines.training.reference_model import BasicBlock

# ours -> Zennit's class name
ZENNIT_COMPOSITES = {
    "epsilon_plus": "EpsilonPlus",
    "epsilon_plus_flat": "EpsilonPlusFlat",
    "epsilon_gamma_box": "EpsilonGammaBox",
    "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
    "epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
}


def zennit_map(zennit, model, x, t, composite, canonizers, low=None, high=None, **kwargs):
    """Zennit's relevance with its own composite, starting from the target logit as elrp does."""
    cls = getattr(zennit.composites, ZENNIT_COMPOSITES[composite])
    if composite == "epsilon_gamma_box":
        kwargs.update(low=low, high=high)
    return zennit_relevance(zennit, model, x, t, cls(canonizers=canonizers, **kwargs))


def assert_same_map(ours, theirs, label):
    scale = theirs.abs().max().item()
    assert scale > 0, f"{label}: Zennit's map is all zero"
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=2e-4 * scale, msg=label)


def vgg():
    torch.manual_seed(0)
    model = randomise_batchnorm(VGG())
    with torch.no_grad():  # biases of both signs that matter, so the rules' bias terms are exercised
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.mark.parametrize("composite", sorted(ZENNIT_COMPOSITES))
def test_vgg_shaped_network_matches_zennit(zennit, composite):
    model = vgg()
    torch.manual_seed(1)
    x, t = torch.rand(3, 3, 16, 16), torch.tensor([0, 2, 4])
    ours = get_explainer("elrp", model, composite=composite, input_bounds=(0.0, 1.0)).explain(x, t).maps
    theirs = zennit_map(zennit, model, x, t, composite, [zennit.canonizers.SequentialMergeBatchNorm()],
                        low=0.0, high=1.0)
    assert_same_map(ours, theirs, composite)
    plain = get_explainer("elrp", model).explain(x, t).maps
    assert not torch.allclose(ours, plain, atol=0.05 * plain.abs().max().item()), \
        f"{composite} is no different from epsilon-LRP on this network: the check would not tell them apart"


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1_flat"])
def test_resnet18_shaped_network_matches_zennit(zennit, monkeypatch, composite):
    """Residual sums: Zennit needs its ResNet canonizer (a Sum module for the addition, with its
    Norm rule); in our graph the addition is a node and gets the same rule."""
    monkeypatch.setattr(zennit.torchvision, "ResNetBasicBlock", BasicBlock)
    model = resnet()
    torch.manual_seed(3)
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([2, 5])
    low, high = -0.5, 1.5
    ours = get_explainer("elrp", model, composite=composite, input_bounds=[low, high]).explain(x, t).maps
    theirs = zennit_map(zennit, model, x, t, composite, [zennit.torchvision.ResNetCanonizer()], low=low, high=high)
    assert_same_map(ours, theirs, composite)


def test_gamma_and_per_channel_bounds_match_zennit(zennit):
    model = vgg()
    torch.manual_seed(2)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    x = (torch.rand(2, 3, 16, 16) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    t = torch.tensor([1, 3])
    low, high = (-mean / std).tolist(), ((1 - mean) / std).tolist()
    ours = get_explainer("elrp", model, composite="epsilon_gamma_box", gamma=0.5,
                         input_bounds=[low, high]).explain(x, t).maps
    theirs = zennit_map(zennit, model, x, t, "epsilon_gamma_box", [zennit.canonizers.SequentialMergeBatchNorm()],
                        low=torch.tensor(low).view(1, 3, 1, 1), high=torch.tensor(high).view(1, 3, 1, 1), gamma=0.5)
    assert_same_map(ours, theirs, "gamma 0.5, per-channel bounds")


class Normalised(nn.Module):
    """A model that normalises its own input: the z-box rule's bounds are those of the first
    conv's input, (0 - 0.5) / 0.25 and (1 - 0.5) / 0.25 for pixels in [0, 1]."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body((x - 0.5) / 0.25)


def test_zbox_bounds_follow_a_normalisation_inside_the_model(zennit):
    body = vgg()
    torch.manual_seed(4)
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    ours = get_explainer("elrp", Normalised(body), composite="epsilon_gamma_box").explain(x, t).maps
    # Zennit's attributor sees the normalised input; relevance is not moved through the
    # normalisation (an elementwise affine map with no mixing passes it on unchanged)
    theirs = zennit_map(zennit, body, (x - 0.5) / 0.25, t, "epsilon_gamma_box",
                        [zennit.canonizers.SequentialMergeBatchNorm()], low=-2.0, high=2.0)
    assert_same_map(ours, theirs, "bounds through the model's normalisation")
    wrong = zennit_map(zennit, body, (x - 0.5) / 0.25, t, "epsilon_gamma_box",
                       [zennit.canonizers.SequentialMergeBatchNorm()], low=0.0, high=1.0)
    assert not torch.allclose(ours, wrong, atol=0.05 * wrong.abs().max().item())


def bias_free_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 2 * 2, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    with torch.no_grad():  # logits of order 1
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat"])
def test_bias_free_network_conserves_the_target_logit(composite):
    """z+, alpha-beta (alpha - beta = 1), flat and epsilon (small) all conserve when no bias absorbs
    relevance and no denominator is 0; a target with a positive logit keeps every sign plain.
    (Not alpha-beta on the first layer: on inputs >= 0 a filter with no negative weight has
    z- = 0, so its beta share is lost and alpha times the relevance goes down, as in Zennit.)"""
    model = bias_free_net()
    torch.manual_seed(5)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        t = model(x).argmax(1)
    keep = logits_of(model, x, t) > 1e-3
    x, t = x[keep], t[keep]
    assert len(x) >= 4
    result = get_explainer("elrp", model, composite=composite, epsilon=1e-9).explain(x, t)
    torch.testing.assert_close(result.extras["relevance_sum"], logits_of(model, x, t), rtol=1e-3, atol=1e-6)


def test_flat_first_layer_spreads_relevance_over_the_receptive_field():
    """flat ignores the input: two images that the rest of the network treats alike get the same
    map wherever the first layer's relevance is the same."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(16, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[2].weight.zero_()
        model[2].weight[0, 5] = 1.0  # only position (1, 1) of the 4x4 conv output counts
    x = torch.rand(1, 1, 4, 4) + 0.1
    maps = get_explainer("elrp", model.eval(), composite="epsilon_plus_flat").explain(x, torch.tensor([0])).maps[0]
    expected = torch.zeros(4, 4)
    expected[0:3, 0:3] = logits_of(model, x, torch.tensor([0])).item() / 9
    torch.testing.assert_close(maps, expected)


def test_lrp_is_registered_with_the_recommended_composite():
    assert "lrp" in list_methods()
    explainer = get_explainer("lrp", bias_free_net())
    assert explainer.composite == "epsilon_plus_flat"
    assert explainer.options() == {"epsilon": 1e-6, "composite": "epsilon_plus_flat", "gamma": 0.25,
                                   "input_bounds": [[0.0], [1.0]]}
    assert get_explainer("elrp", bias_free_net()).options()["composite"] == "epsilon"
    boxed = get_explainer("lrp", bias_free_net(), composite="epsilon_gamma_box", input_bounds=[-1, 2]).options()
    assert boxed["input_bounds"] == [[-1.0], [2.0]] and boxed["gamma"] == 0.25


@pytest.mark.parametrize("options, message", [
    ({"composite": "zplus_everywhere"}, "composite must be one of"),
    ({"composite": 3}, "composite must be one of"),
    ({"gamma": -0.1}, "gamma"),
    ({"gamma": True}, "gamma"),
    ({"input_bounds": [1, 0]}, "low must be below high"),
    ({"input_bounds": [0]}, "input_bounds must be"),
    ({"input_bounds": "0,1"}, "input_bounds must be"),
    ({"input_bounds": [[0, 0], [1]]}, "low must be below high"),
    ({"input_bounds": [float("nan"), 1]}, "input_bounds must be"),
    ({"input_bounds": [[], []]}, "input_bounds must be"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        get_explainer("lrp", bias_free_net(), **options)


def test_bounds_with_the_wrong_number_of_channels_are_refused():
    explainer = get_explainer("lrp", bias_free_net(), composite="epsilon_gamma_box", input_bounds=[[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="2 values per side for 1-channel images"):
        explainer.explain(torch.rand(1, 1, 8, 8), torch.tensor([0]))


def test_every_composite_is_batch_independent():
    model = resnet()
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    for composite in COMPOSITES:
        explainer = get_explainer("elrp", model, composite=composite)
        batch = explainer.explain(x, t).maps
        for i in range(3):
            torch.testing.assert_close(batch[i:i + 1], explainer.explain(x[i:i + 1], t[i:i + 1]).maps,
                                       rtol=1e-4, atol=1e-6 * batch.abs().max().item(), msg=composite)
