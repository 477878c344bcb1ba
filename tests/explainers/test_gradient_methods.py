"""Known answers for the Captum-based methods on models whose attributions are exact."""
import pytest
import torch

from saliency_audit.explainers import get_explainer


class Linear2d(torch.nn.Module):
    """logits = W . flatten(x) + b: every gradient method has a closed-form answer."""

    def __init__(self, channels=3, size=5, classes=4):
        super().__init__()
        self.fc = torch.nn.Linear(channels * size * size, classes)
        self.shape = (channels, size, size)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return Linear2d().eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(6, 3, 5, 5), torch.tensor([0, 1, 2, 3, 0, 2])


def weights_for(model, targets):
    return model.fc.weight[targets].view(len(targets), *model.shape)


def test_grad_is_weight_times_input(linear, batch):
    x, t = batch
    maps = get_explainer("grad", linear).explain(x, t).maps
    assert maps.shape == (6, 5, 5)
    torch.testing.assert_close(maps, (weights_for(linear, t) * x).sum(1), rtol=1e-5, atol=1e-6)


def test_sal_is_absolute_weight(linear, batch):
    x, t = batch
    maps = get_explainer("sal", linear).explain(x, t).maps
    torch.testing.assert_close(maps, weights_for(linear, t).abs().sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["intg", "deeplift"])
def test_reference_methods_on_a_linear_model_equal_weight_times_difference(linear, batch, name):
    x, t = batch
    result = get_explainer(name, linear, baseline=0.25).explain(x, t)
    torch.testing.assert_close(result.maps, (weights_for(linear, t) * (x - 0.25)).sum(1), rtol=1e-4, atol=1e-5)


def small_relu_cnn():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 7 * 7, 10)).eval()


def test_integrated_gradients_completeness_within_one_percent(demo_model, demo_images):
    """Sum of attributions = f(x) - f(baseline) (Sundararajan et al. 2017, axiom of
    completeness), at the default 50 steps, on the trained reference CNN and real digits."""
    x = demo_images[0][:32]
    with torch.no_grad():
        t = demo_model(x).argmax(1)
        rows = torch.arange(len(x))
        gap = demo_model(x)[rows, t] - demo_model(torch.zeros_like(x))[rows, t]
    result = get_explainer("intg", demo_model).explain(x, t)
    total = result.maps.sum(dim=(1, 2))
    assert torch.all((total - gap).abs() <= 0.01 * gap.abs()), (total, gap)
    torch.testing.assert_close(result.extras["convergence_delta"], total - gap, atol=1e-3, rtol=1e-3)


def test_integrated_gradients_chunks_give_the_same_answer():
    """A small max_expanded_batch bounds memory and must not change the result."""
    model = small_relu_cnn()
    x, t = torch.rand(4, 1, 14, 14), torch.tensor([1, 2, 3, 4])
    full = get_explainer("intg", model, n_steps=20).explain(x, t).maps
    chunked = get_explainer("intg", model, n_steps=20, max_expanded_batch=8).explain(x, t).maps
    torch.testing.assert_close(full, chunked, rtol=1e-4, atol=1e-6)


def test_deeplift_sums_to_the_output_difference():
    model = small_relu_cnn()
    x, t = torch.rand(5, 1, 14, 14), torch.tensor([0, 1, 2, 3, 4])
    result = get_explainer("deeplift", model).explain(x, t)
    assert result.extras["convergence_delta"].abs().max() < 1e-3


def test_results_do_not_depend_on_batch_composition():
    model = small_relu_cnn()
    x, t = torch.rand(6, 1, 14, 14), torch.tensor([0, 1, 2, 3, 4, 5])
    for name in ("sal", "grad", "intg", "deeplift"):
        explainer = get_explainer(name, model)
        whole = explainer.explain(x, t).maps
        alone = explainer.explain(x[2:3], t[2:3]).maps
        torch.testing.assert_close(whole[2:3], alone, rtol=1e-4, atol=1e-6)


def test_deeplift_refuses_torchscript_with_a_clear_message():
    scripted = torch.jit.script(small_relu_cnn())
    with pytest.raises(ValueError, match="deeplift cannot explain this model: it needs the model.s Python code"):
        get_explainer("deeplift", scripted)


class FunctionalNet(torch.nn.Module):
    """Activations as functions, which module hooks (Captum's DeepLift) never see."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.nn.functional.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.sigmoid(self.fc1(h)) - torch.tanh(h[:, :16]))


def test_deeplift_rescales_functional_activations():
    torch.manual_seed(3)
    model = FunctionalNet().eval()
    x, t = torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    result = get_explainer("deeplift", model, baseline=0.3).explain(x, t)
    with torch.no_grad():
        gap = (model(x) - model(torch.full_like(x, 0.3))).gather(1, t[:, None]).squeeze(1)
    # summation to delta holds exactly only if every nonlinearity got the Rescale rule
    torch.testing.assert_close(result.maps.sum((1, 2)), gap, rtol=1e-4, atol=1e-5)
    assert result.extras["convergence_delta"].abs().max() < 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")  # Captum's notes about hooks
def test_deeplift_agrees_with_captum_on_the_demo_model(demo_model, demo_images):
    from captum.attr import DeepLift as CaptumDeepLift
    x = demo_images[0][:16]
    t = demo_model(x).argmax(1)
    ours = get_explainer("deeplift", demo_model).explain(x, t).maps
    theirs = CaptumDeepLift(demo_model).attribute(x.clone().requires_grad_(), baselines=torch.zeros_like(x),
                                                  target=t).detach().sum(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("images,targets,message", [
    (torch.rand(2, 5, 5), torch.tensor([0, 1]), r"images must be a float tensor \[B,C,H,W\]"),
    (torch.rand(2, 3, 5, 5), torch.tensor([0]), r"targets must be a tensor \[B\] with B=2"),
    (torch.zeros(2, 3, 5, 5, dtype=torch.uint8), torch.tensor([0, 1]), "floating point"),
])
def test_bad_batches_get_clear_errors(linear, images, targets, message):
    with pytest.raises(ValueError, match=message):
        get_explainer("grad", linear).explain(images, targets)


@pytest.mark.parametrize("shape, width", [((2, 3, 224, 224), 27), ((2, 1, 28, 28), 1024), ((64, 3, 224, 224), 64)])
def test_intg_path_points_per_pass_on_an_accelerator_fit_the_image_size(monkeypatch, shape, width):
    """1,024 path points of a 224 px image hold ~110 GiB in a ResNet-50's forward and backward: on an
    accelerator the pass is cut to 16 MiB of input (never below the batch, as Captum requires)."""
    from saliency_audit.explainers.gradient import integrated_gradients
    seen = {}

    def attribute(self, images, **kwargs):
        seen.update(kwargs)
        return torch.zeros_like(images), torch.zeros(len(images))
    monkeypatch.setattr(integrated_gradients._CaptumIG, "attribute", attribute)
    images = torch.zeros(shape, device="meta")  # not a CPU: the accelerator's default
    get_explainer("intg", torch.nn.Identity()).explain(images, torch.zeros(shape[0], dtype=torch.long, device="meta"))
    assert seen["internal_batch_size"] == width
