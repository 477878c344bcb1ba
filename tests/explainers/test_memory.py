"""Memory follows the batch and the chunk, never the dataset or the image size.

Each measurement runs in a fresh Python process that reports its own peak RSS (VmHWM), so
the numbers are not mixed with the test runner's."""
import io
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def peak_rss_mb(code: str, cwd: Path = ROOT, timeout: float = 300) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (its peak RSS in MB, its stdout)."""
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into a child's ru_maxrss across fork and
    # exec, so a child of a large pytest process would report the parent's size
    script = code + "\nprint('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "", "PYTHONPATH": str(cwd)})
    assert done.returncode == 0, done.stderr[-2000:]
    kb = int(done.stdout.rsplit("PEAK_KB", 1)[1])
    return kb / 1024, done.stdout


# --- train-aae streams its shards ---------------------------------------------------------------

def write_digit_shards(directory: Path, n_images: int, per_shard: int = 1000) -> str:
    rng = np.random.default_rng(n_images)
    directory.mkdir(parents=True, exist_ok=True)
    for first in range(0, n_images, per_shard):
        with tarfile.open(directory / f"shard-{first // per_shard:04d}.tar", "w") as tar:
            for i in range(first, min(first + per_shard, n_images)):
                buffer = io.BytesIO()
                np.save(buffer, rng.integers(0, 256, (28, 28), dtype=np.uint8))
                info = tarfile.TarInfo(f"img{i:06d}.npy")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return str(directory / "*.tar")


def train_aae_peak(pattern: str, output: Path, cwd: Path = ROOT) -> float:
    argv = ["train-aae", "--input", pattern, "--output", str(output), "--epochs", "1", "--hidden", "2,2",
            "--latent-dim", "2", "--no-progress", "--device", "cpu", "--shuffle-buffer", "1000"]
    if cwd != ROOT:  # an older tree without --shuffle-buffer, for the before/after figures
        argv = argv[:-2]
    peak, out = peak_rss_mb(f"from saliency_audit.pipelines import cli\nassert cli.main({argv!r}) == 0", cwd)
    assert "reconstruction MSE" in out
    return peak


@pytest.mark.slow
def test_train_aae_memory_does_not_grow_with_the_dataset(tmp_path):
    # Before streaming the peak grew by 19% from 2,000 to 16,000 images (500 -> 595 MB: the
    # decoded list, the stacked array and the training copy, ~7 KB per 3 KB image); streamed
    # it grows by 4% (492 -> 511 MB), mostly the larger held-out set (5% of the images).
    small = train_aae_peak(write_digit_shards(tmp_path / "small", 2_000), tmp_path / "small.pt")
    large = train_aae_peak(write_digit_shards(tmp_path / "large", 16_000), tmp_path / "large.pt")
    assert large < small * 1.10, (small, large)


def test_streamed_training_sees_every_image_once_per_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    import torch

    from saliency_audit.explainers.blackbox.aae import default_config
    from saliency_audit.pipelines.training import aae as aae_training
    from saliency_audit.transforms.io.preprocess import Preprocessing

    stream = aae_training.scan_shards(write_digit_shards(tmp_path / "s", 300, per_shard=70), Preprocessing(),
                                      holdout=0.1, seed=1, shuffle_buffer=50)
    assert stream.train_count + len(stream.held_keys) == 300 and len(stream.held) == len(stream.held_keys) > 0
    epoch = torch.cat(list(stream.batches(aae_training._generator(1, 0), 32)))
    assert len(epoch) == stream.train_count and len({bytes(x.numpy()) for x in epoch}) == stream.train_count
    config = default_config(stream.image_shape, hidden=(2, 2), latent_dim=2)
    kwargs = dict(epochs=2, batch_size=32, seed=1, progress=False)
    straight, report = aae_training.train_aae_stream(stream, config, output=str(tmp_path / "a.pt"), **kwargs)
    original = aae_training.save_aae

    def crash_after_epoch_1(aae, path, training=None):
        original(aae, path, training)
        if training and training["epoch"] == 1 and "opt_ae" in training:
            raise KeyboardInterrupt

    monkeypatch.setattr(aae_training, "save_aae", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        aae_training.train_aae_stream(stream, config, output=str(tmp_path / "b.pt"), **kwargs)
    monkeypatch.setattr(aae_training, "save_aae", original)
    resumed, again = aae_training.train_aae_stream(stream, config, output=str(tmp_path / "b.pt"), **kwargs)
    assert again == report
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# --- perturbation methods at 224 x 224 ------------------------------------------------------------

EXPLAIN = textwrap.dedent("""
    import torch
    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.metrics.causal import deletion_auc

    class Tiny(torch.nn.Module):  # a few channels: the model's own memory is negligible
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, batch = Tiny().eval(), {batch}
    images, targets = torch.rand(batch, 3, 224, 224), torch.full((batch,), 3)
    if {method!r} == "deletion":
        result = deletion_auc(model, images, torch.rand(batch, 224, 224), targets)
    else:
        result = get_explainer({method!r}, model).explain(images, targets, torch.arange(batch)).maps
    assert torch.isfinite(result).all()
""")


# Peak RSS in MB with default options (the interpreter with torch and the explainers imported
# is ~350 MB of it), before -> after bounding the chunks: occlusion 3,312 -> 397 (one image:
# 12,321 windows, whose masks were all built at once), deletion 840 -> 436 and smoothgrad
# 1,142 -> 497 (8 images: up to 256 perturbed 224 px images per chunk).
@pytest.mark.slow
@pytest.mark.parametrize("method, batch", [("occlusion", 1), ("deletion", 8), ("smoothgrad", 8)])
def test_perturbation_memory_follows_the_chunk_not_the_image_size(method, batch):
    peak, _ = peak_rss_mb(EXPLAIN.format(method=method, batch=batch))
    assert peak < 600, peak


def test_forward_chunks_on_a_cpu_stay_small_at_224_px():
    """A CPU's chunk of 224-px images is a handful (ResNet-50 ran 35% faster in chunks of 4 to 8 than
    of 32 on one thread: docs/performance.md), an accelerator's as large as memory allows; digits
    keep the requested chunk on both."""
    import torch

    from saliency_audit.explainers.core.base import chunk_within_budget
    assert chunk_within_budget(32, (3, 224, 224), "cpu") == 6
    assert chunk_within_budget(32, (3, 224, 224), torch.device("cpu")) == 6
    assert chunk_within_budget(256, (3, 224, 224), "cuda") == 27
    assert chunk_within_budget(32, (1, 28, 28), "cpu") == chunk_within_budget(32, (1, 28, 28), "cuda") == 32
    assert chunk_within_budget(256, (1, 28, 28), "cpu") == 256
    assert chunk_within_budget(8, (3, 4096, 4096), "cpu") == 1


def test_abele_metrics_chunk_224_px_images_within_the_budget(monkeypatch):
    """ABELE's flip-rate and stability forwards took max_forward_batch (256) images of any size at
    once: 154 MiB of input at 224 px before a layer ran. They now follow chunk_within_budget."""
    import torch

    from saliency_audit.explainers.metrics import abele as metric
    chunks = []
    real = metric.forward_in_chunks

    def spy(model, total, build, reduce, chunk, device):
        chunks.append(chunk)
        return real(model, total, build, reduce, chunk, device)

    monkeypatch.setattr(metric, "forward_in_chunks", spy)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    images = torch.rand(2, 3, 224, 224)
    flips = metric.relevance_flip_rate(model, images, torch.rand(2, 224, 224), torch.zeros(2, dtype=torch.long),
                                       percentiles=(0, 50, 100))
    assert flips.shape == (2, 3) and chunks and max(chunks) == 6
