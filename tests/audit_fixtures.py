"""One small audit shared by the sanity, report, figure and diff tests, run once per session.

It audits 40 bundled digits plus one corrupt record (so errors/ has a row) with `sal`,
`grad`, `lime` (few samples) and `edge`, a test method that ignores the model (a Sobel
edge detector): the sanity check must flag it. `edge` is registered only while the audit
runs, so no other test sees it in the registry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import DEMO_DATA, add_member

from saliency_audit.explainers.core import registry as _registry
from saliency_audit.explainers.core.base import Explainer, Explanation
from saliency_audit.pipelines import audit

N_IMAGES = 40
METHODS = ("sal", "grad", "lime", "edge")
MODEL_ARGS = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


class EdgeDetector(Explainer):
    """Gradient magnitude of the image itself: looks like a saliency map, knows no model."""

    name = "edge"
    signed = False

    def explain(self, images, targets, seeds=None):
        grey = images.detach().sum(dim=1, keepdim=True)
        kernels = torch.stack([_SOBEL, _SOBEL.t()]).unsqueeze(1).to(grey)
        return Explanation(F.conv2d(grey, kernels, padding=1).pow(2).sum(dim=1).sqrt())


@contextlib.contextmanager
def registered(cls):
    _registry.register(cls)
    try:
        yield
    finally:
        _registry._REGISTRY.pop(cls.name, None)


def sample_shard(directory: Path, n_images: int = N_IMAGES) -> Path:
    """The first n bundled digits and one corrupt record, as one tar shard."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sample.tar"
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers()[: 2 * n_images]:  # KEY.png and KEY.cls per digit
            add_member(dst, member.name, src.extractfile(member).read())
        add_member(dst, "broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00not a png" * 8)
    return path


def run_audit(shard: Path, output: Path, methods=METHODS, *extra: str, model_args=MODEL_ARGS) -> dict:
    options = ["--method-options", '{"lime": {"n_samples": 100}}'] if "lime" in methods else []
    with registered(EdgeDetector):
        return audit.run(["--input", str(shard), *model_args, "--methods", ",".join(methods),
                          "--output", str(output), "--channels", "1", "--device", "cpu", "--batch-size", "20",
                          *options, *extra])


@dataclasses.dataclass(frozen=True)
class SharedAudit:
    output: Path
    manifest: dict
    shard: Path


_CACHE: dict[str, SharedAudit] = {}


def shared_audit(tmp_path_factory) -> SharedAudit:
    """The shared audit, with the sanity check and ABELE's metrics (3 neighbours, to stay quick)."""
    if "audit" not in _CACHE:
        root = tmp_path_factory.mktemp("shared-audit")
        shard = sample_shard(root / "shards")
        manifest = run_audit(shard, root / "out", METHODS, "--sanity-check", "--sanity-images", "8",
                             "--abele-metrics", "--abele-neighbours", "3")
        _CACHE["audit"] = SharedAudit(root / "out", manifest, shard)
    return _CACHE["audit"]
