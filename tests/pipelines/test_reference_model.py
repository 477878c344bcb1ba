"""The reference MNIST CNN, its training, and the bundled demo weights and sample."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saliency_audit.pipelines.training.classifier import _schedule, evaluate, random_shift, train_classifier
from saliency_audit.pipelines.training.mnist import load_mnist_split, to_model_input
from saliency_audit.pipelines.training.reference_model import MnistCNN, mnist_cnn

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
DEMO_DIR = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST data not found at {MNIST_DIR}")


def _read_sample_shard(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, uint8 images [N, 28, 28] and labels [N] of a WebDataset tar."""
    parts: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            parts.setdefault(key, {})[ext] = tar.extractfile(member).read()
    keys = list(parts)
    images = np.stack([np.asarray(Image.open(io.BytesIO(parts[k]["png"]))) for k in keys])
    labels = np.array([int(parts[k]["cls"]) for k in keys])
    return keys, images, labels


def test_mnist_cnn_shapes_and_eval_mode():
    model = mnist_cnn()
    assert isinstance(model, MnistCNN) and not model.training
    logits = model(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert state_bytes < 2_000_000


def test_mnist_cnn_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        mnist_cnn()(torch.rand(2, 3, 28, 28))


def test_mnist_cnn_has_no_reused_or_inplace_modules():
    # Hook-based explainers (DeepLift, LRP) need one module instance per use.
    model = mnist_cnn()
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(m))
               for m in model.modules() if not list(m.children())]
    model(torch.rand(1, 1, 28, 28))
    for handle in handles:
        handle.remove()
    assert len(seen) == len({id(m) for m in seen}) == 11
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_random_shift_moves_pixels_within_bounds():
    batch = torch.zeros(64, 1, 28, 28)
    batch[:, 0, 14, 14] = 1.0
    shifted = random_shift(batch, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == batch.shape
    assert torch.all(shifted.sum(dim=(1, 2, 3)) == 1.0)  # the centre pixel never leaves the image
    rows, cols = torch.nonzero(shifted[:, 0], as_tuple=True)[1:]
    assert rows.min() >= 12 and rows.max() <= 16 and cols.min() >= 12 and cols.max() <= 16
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 1


@pytest.mark.parametrize("architecture", ["cnn", "vit", "convnext"])
def test_train_classifier_is_reproducible_and_leaves_global_rng_alone(architecture):
    if architecture != "cnn":
        pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, size=64)
    state = torch.get_rng_state()
    first = train_classifier(images, labels, epochs=1, batch_size=16, progress=False, architecture=architecture)
    assert torch.equal(state, torch.get_rng_state())
    second = train_classifier(images, labels, epochs=1, batch_size=16, progress=False, architecture=architecture)
    assert not first.training
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    if architecture != "cnn":  # standardised inside the model with the training images' statistics
        assert first.mean.item() == pytest.approx(images.mean()) and first.std.item() == pytest.approx(images.std(), rel=1e-3)


def test_the_transformer_recipe_warms_up_then_decays():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule, rates = _schedule(optimizer, 100, 0.3), []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(3e-3 / 25) and max(rates) == pytest.approx(3e-3, rel=1e-3)
    assert rates.index(max(rates)) == 30 and rates[-1] < 3e-5
    assert all(a < b for a, b in zip(rates[:30], rates[1:31])) and all(a >= b for a, b in zip(rates[30:], rates[31:]))


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="architecture must be one of cnn, vit, convnext, got 'mlp'"):
        train_classifier(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), architecture="mlp")


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 28, 28), dtype=np.float32), np.zeros(4, dtype=np.int64), r"\[N, 1, 28, 28\]"),
    (np.zeros((4, 1, 28, 28), dtype=np.uint8), np.zeros(4, dtype=np.int64), "divide uint8 pixels by 255"),
    (np.full((4, 1, 28, 28), 255.0, dtype=np.float32), np.zeros(4, dtype=np.int64), r"in \[0, 1\]"),
    (np.zeros((4, 1, 28, 28), dtype=np.float32), np.zeros(3, dtype=np.int64), "labels must be"),
    (np.zeros((4, 1, 28, 28), dtype=np.float32), np.full(4, 10), "0..9"),
])
def test_train_and_evaluate_reject_bad_data(images, labels, message):
    with pytest.raises(ValueError, match=message):
        train_classifier(images, labels, epochs=1, progress=False)
    with pytest.raises(ValueError, match=message):
        evaluate(mnist_cnn(), images, labels)


def test_demo_model_classifies_demo_sample():
    model = mnist_cnn()
    model.load_state_dict(torch.load(DEMO_DIR / "mnist_cnn.pt", weights_only=True))
    keys, images, labels = _read_sample_shard(DEMO_DIR / "mnist-test-sample.tar")
    assert keys == [f"mnist-test-{i:06d}" for i in range(300)]
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert evaluate(model, to_model_input(images), labels) >= 0.95


@needs_mnist
def test_demo_sample_is_the_first_test_digits():
    images, labels = load_mnist_split(MNIST_DIR / "t10k-images-idx3-ubyte.gz",
                                      MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    _, sample_images, sample_labels = _read_sample_shard(DEMO_DIR / "mnist-test-sample.tar")
    np.testing.assert_array_equal(sample_images, images[:300])
    np.testing.assert_array_equal(sample_labels, labels[:300])


@pytest.mark.slow
@needs_mnist
def test_training_from_scratch_on_train5k_reaches_97_percent():
    train_images, train_labels = load_mnist_split(MNIST_DIR / "train5k-images-idx3-ubyte.gz",
                                                  MNIST_DIR / "train5k-labels-idx1-ubyte.gz")
    test_images, test_labels = load_mnist_split(MNIST_DIR / "t10k-images-idx3-ubyte.gz",
                                                MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    model = train_classifier(to_model_input(train_images), train_labels, progress=False)
    assert not model.training
    assert evaluate(model, to_model_input(test_images), test_labels) >= 0.97
