"""Known answers for elrp: conservation, agreement with gradient x input, agreement with
Zennit's epsilon rule at epsilons where LRP is not gradient x input, BatchNorm folding,
torchvision-style ResNet/VGG graphs, clear errors, an untouched model."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.relevance.lrp import lrp_graph
from saliency_audit.pipelines.training.reference_model import BasicBlock, MnistCNN, ResNet18

# --- torchvision-style test networks (reduced widths) ---------------------------------

def randomise_batchnorm(model, bias_free=False):
    """Non-trivial running statistics, so folding has something to fold."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            m.running_var.uniform_(0.5, 2.0)
            if bias_free:
                nn.init.zeros_(m.bias)
                m.running_mean.zero_()
            else:
                nn.init.uniform_(m.bias, -0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
    return model


def resnet(bias_free=False):
    torch.manual_seed(0)
    model = ResNet18(width=4)
    with torch.no_grad():
        randomise_batchnorm(model, bias_free)
        if bias_free:
            model.fc.bias.zero_()
    return model.eval()


class VGG(nn.Module):
    """VGG's layout: features (conv-BN-ReLU, max pools), adaptive avg pool, flatten, classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class Activations(nn.Module):
    """Elementwise activations other than ReLU, average pooling, functional calls, reshape."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=bias)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=bias)
        self.act2 = nn.ELU()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 16, bias=bias)
        self.fc2 = nn.Linear(16, 16, bias=bias)
        self.fc3 = nn.Linear(16, 3, bias=bias)

    def forward(self, x):
        x = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        x = F.gelu(x).reshape(-1, 6 * 4 * 4)
        x = torch.tanh(self.fc1(x))
        return self.fc3(torch.sigmoid(self.fc2(x)) * 0.5)


class Functional(nn.Module):
    """Functional calls only: input normalisation, in-place F.relu, F.max_pool2d, two
    branches joined by torch.cat, a global mean and x.view(x.shape[0], -1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = (x - 0.45) / 0.25
        x = torch.cat([F.relu(self.a(x), inplace=True), torch.relu(self.b(x))], dim=1)
        x = F.max_pool2d(x, 2)
        x = self.c(x).relu().mean(dim=(2, 3), keepdim=True)
        return self.fc(x.view(x.shape[0], -1))


def bias_free_relu_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).eval()


def logits_of(model, x, t):
    with torch.no_grad():
        return model(x).gather(1, t[:, None]).squeeze(1)


def elrp(model, x, t, **options):
    return get_explainer("elrp", model, **options).explain(x, t)


# --- conservation and agreement with gradient x input ---------------------------------

def test_bias_free_relu_net_conserves_the_target_logit():
    model = bias_free_relu_net()
    torch.manual_seed(1)
    x, t = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    result = elrp(model, x, t, epsilon=1e-9)
    assert result.maps.shape == (6, 8, 8)
    logits = logits_of(model, x, t)
    torch.testing.assert_close(result.maps.sum((1, 2)), logits, rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(result.extras["relevance_sum"], result.maps.sum((1, 2)))


def test_relu_net_with_biases_equals_gradient_times_input():
    """Ancona et al. 2018: for ReLU networks epsilon-LRP -> gradient x input as eps -> 0."""
    torch.manual_seed(0)
    model = MnistCNN(conv_channels=(4, 8), hidden=16).eval()
    x, t = torch.rand(4, 1, 28, 28), torch.tensor([3, 1, 4, 1])
    maps = elrp(model, x, t).maps
    expected = get_explainer("grad", model).explain(x, t).maps
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_batchnorm_folding_leaves_the_outputs_unchanged():
    model = resnet()
    x = torch.rand(3, 3, 32, 32)
    gm = lrp_graph(model, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_resnet18_shaped_network_conserves_when_bias_free():
    """BN with zero mean and shift folds into bias-free convs; adds, max and average
    pooling conserve, so the map sums to the logit."""
    model = resnet(bias_free=True)
    torch.manual_seed(2)
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([0, 7])
    result = elrp(model, x, t, epsilon=1e-9)
    assert result.maps.shape == (2, 32, 32)
    torch.testing.assert_close(result.extras["relevance_sum"], logits_of(model, x, t), rtol=3e-2, atol=1e-5)


def test_resnet18_shaped_network_with_biases_equals_gradient_times_input():
    model = resnet()
    torch.manual_seed(3)
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([2, 5])
    # this random network's pre-activations are small, so epsilon must be smaller still
    maps = elrp(model, x, t, epsilon=1e-9).maps
    expected = get_explainer("grad", model).explain(x, t).maps
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_vgg_style_network_runs_and_equals_gradient_times_input():
    torch.manual_seed(0)
    model = randomise_batchnorm(VGG()).eval()
    x, t = torch.rand(2, 3, 16, 16), torch.tensor([1, 4])
    maps = elrp(model, x, t, epsilon=1e-9).maps
    assert maps.shape == (2, 16, 16) and torch.isfinite(maps).all()
    expected = get_explainer("grad", model).explain(x, t).maps
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_functional_network_equals_gradient_times_input():
    torch.manual_seed(0)
    model = Functional().eval()
    x, t = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    maps = elrp(model, x, t, epsilon=1e-9).maps
    expected = get_explainer("grad", model).explain(x, t).maps
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_mnist_cnn_with_flatten_and_an_input_check_runs():
    """The reference model checks x.dim() in forward(): the tracer resolves shape checks."""
    torch.manual_seed(0)
    model = MnistCNN(conv_channels=(4, 8), hidden=16).eval()
    result = elrp(model, torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2]))
    assert result.maps.shape == (3, 28, 28) and torch.isfinite(result.maps).all()


def test_other_activations_pass_relevance_and_conserve_when_bias_free():
    torch.manual_seed(0)
    model = Activations(bias=False).eval()
    x, t = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    result = elrp(model, x, t, epsilon=1e-9)
    torch.testing.assert_close(result.extras["relevance_sum"], logits_of(model, x, t), rtol=1e-2, atol=1e-6)
    with_bias = Activations().eval()
    assert torch.isfinite(elrp(with_bias, x, t).maps).all()


def test_batch_results_equal_single_image_results():
    model = resnet()
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    explainer = get_explainer("elrp", model)
    batch = explainer.explain(x, t).maps
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], explainer.explain(x[i:i + 1], t[i:i + 1]).maps,
                                   rtol=1e-4, atol=1e-6)


# --- agreement with Zennit (an independent implementation) at non-tiny epsilon -----------

def zennit_epsilon(zennit, model, x, t, epsilon, canonizers=()):
    """Zennit's epsilon-LRP configured as elrp's rules: the epsilon rule on Conv, Linear,
    average pooling and residual sums (Zennit's stock composites use Norm, a fixed 1e-6
    stabiliser, on the last two); Pass on activations; max pooling, flatten and dropout get
    no rule, so the plain gradient moves relevance to the winner, as elrp's ``move`` does.
    Relevance starts as the target logit, as in elrp."""
    z = zennit
    rule = z.rules.Epsilon(epsilon)
    composite = z.composites.LayerMapComposite(
        [(z.types.Activation, z.rules.Pass()), (z.types.Convolution, rule), (z.types.Linear, rule),
         (z.types.AvgPool, rule), (z.layer.Sum, rule)], canonizers=list(canonizers))
    return zennit_relevance(zennit, model, x, t, composite)


def zennit_relevance(zennit, model, x, t, composite):
    """Zennit's relevance map under ``composite``, starting from the target logit as elrp does."""
    with torch.no_grad():
        logits = model(x)
    start = torch.zeros_like(logits).scatter_(1, t[:, None], logits.gather(1, t[:, None]))
    with zennit.attribution.Gradient(model, composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), start)
    return relevance.sum(1)


def assert_matches_zennit_off_the_gradient_limit(zennit, model, x, t, epsilons, canonizers=lambda: ()):
    gradient_x_input = get_explainer("grad", model).explain(x, t).maps
    for epsilon in epsilons:
        ours = elrp(model, x, t, epsilon=epsilon).maps
        theirs = zennit_epsilon(zennit, model, x, t, epsilon, canonizers())
        scale = theirs.abs().max().item()
        assert scale > 0, f"Zennit's map is all zero at epsilon {epsilon}"
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3 * scale, msg=f"epsilon {epsilon}")
        # the check means something only where epsilon changes the map
        departure = ((ours - gradient_x_input).norm() / gradient_x_input.norm()).item()
        assert departure > 0.1, f"epsilon {epsilon} is still in the gradient x input limit ({departure:.3f})"


def test_demo_cnn_matches_zennit_at_epsilon_0_1_1_and_10(zennit, demo_model, demo_images):
    x = demo_images[0][:8]
    with torch.no_grad():
        t = demo_model(x).argmax(1)
    assert_matches_zennit_off_the_gradient_limit(zennit, demo_model, x, t, (0.1, 1.0, 10.0))


def test_net_with_biases_batchnorm_max_and_average_pooling_matches_zennit(zennit):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    randomise_batchnorm(model)
    with torch.no_grad():  # pre-activations of order 1, so that epsilon 0.1 and 1 matter
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    model.eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 3])
    assert_matches_zennit_off_the_gradient_limit(
        zennit, model, x, t, (0.1, 1.0), lambda: [zennit.canonizers.SequentialMergeBatchNorm()])


def test_resnet18_shaped_network_matches_zennit(zennit, monkeypatch):
    """Residual sums: Zennit's ResNet canonizer rewrites each torchvision BasicBlock into
    conv-bn-relu-conv-bn, Sum(identity, out), relu; our BasicBlock has the same attributes."""
    monkeypatch.setattr(zennit.torchvision, "ResNetBasicBlock", BasicBlock)
    model = resnet()
    torch.manual_seed(3)
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([2, 5])
    # this random width-4 network's pre-activations are around 1e-3
    assert_matches_zennit_off_the_gradient_limit(
        zennit, model, x, t, (1e-3, 1e-2), lambda: [zennit.torchvision.ResNetCanonizer()])


# --- errors ----------------------------------------------------------------------------

def test_unsupported_layer_is_named():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                               nn.Upsample(scale_factor=2), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)))
    with pytest.raises(ValueError, match=r"elrp cannot explain this model: .*layer 'features\.3' \(Upsample\)"):
        elrp(model.eval(), torch.rand(1, 1, 8, 8), torch.tensor([0]))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x * torch.sigmoid(x))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.flatten(1))


class CausalAttention(nn.Module):
    """Branches on a tensor value, as timm's EVA attention does on ``is_causal``."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class AttendingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.fc = CausalAttention(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.attention(x).flatten(1))


def test_a_model_with_attention_hears_about_the_attention_whatever_stopped_the_trace():
    """EVA's attention branches on a value before the rules meet its attention: the refusal named
    the branch (node 'is_causal'), which says nothing of why no rule could explain the model."""
    with pytest.raises(ValueError, match=r"uses attention \(CausalAttention\), which they do not: use attnlrp"):
        elrp(AttendingNet().eval(), torch.rand(1, 1, 2, 2), torch.tensor([0]))


def test_unsupported_operation_and_value_branches_raise():
    x, t = torch.rand(1, 1, 2, 2), torch.tensor([0])
    with pytest.raises(ValueError, match=r"elrp cannot explain this model: .*operation 'mul'"):
        elrp(Gated().eval(), x, t)
    with pytest.raises(ValueError, match="branches on tensor values"):
        elrp(ValueBranch().eval(), x, t)


@pytest.mark.parametrize("family, uses", [
    ("vit", r"attention \(ViTAttention\)"), ("swin", r"attention \(SwinAttention\)"),
    ("convnext", r"operation 'layer_norm' in 'model\.convnext\.embeddings\.layernorm' \(ConvNextLayerNorm\)")])
def test_layer_norm_and_attention_models_are_refused_in_one_line(family, uses):
    """Not a TraceError or a failure on every image: an UnsupportedModel that names what the rules
    do not cover and a method that explains the model instead."""
    from hf_models import logits_model

    from saliency_audit.explainers.core.base import UnsupportedModel

    model = logits_model(family)
    for method in ("deeplift", "elrp", "lrp"):
        with pytest.raises(UnsupportedModel) as refused:
            get_explainer(method, model).explain(torch.rand(1, 3, 32, 32), torch.tensor([0]))
        reason = refused.value.reason
        assert refused.value.method == method and "\n" not in reason
        assert re.search(uses, reason) and re.search(r"[:;] use (intg|attnlrp)\b", reason), reason


def test_torchscript_models_are_refused():
    scripted = torch.jit.script(bias_free_relu_net())
    with pytest.raises(ValueError, match="TorchScript"):
        get_explainer("elrp", scripted)


def test_bad_epsilon_is_refused():
    for bad in (0, -1e-3, "small"):
        with pytest.raises(ValueError, match="epsilon"):
            get_explainer("elrp", bias_free_relu_net(), epsilon=bad)


def test_the_users_model_is_not_modified():
    model = resnet().train()
    before = copy.deepcopy(model.state_dict())
    elrp(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert model.training and model.relu.inplace and model.layer1[0].relu.inplace
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_passes_and_options():
    explainer = get_explainer("elrp", bias_free_relu_net(), epsilon=1e-4)
    assert explainer.passes() == {"forward": 1, "backward": 1}
    assert explainer.options() == {"epsilon": 1e-4, "composite": "epsilon", "gamma": 0.25,
                                   "input_bounds": [[0.0], [1.0]]}
