"""Clever-Hans discovery on a planted shortcut: a Markdown table.

    python benchmarks/clever_hans.py [--train 10000] [--epochs 1] [--images 400] [--methods sal,grad,intg,elrp]
                                     [--model reference|small] [--threads 1] [--workdir DIR]

The reference CNN (saliency_audit.pipelines.training.reference_model.MnistCNN; ``--model small``: at a tenth of its width,
the test's) is trained twice on the same MNIST training digits: once where 90% of the 7s carry a
small constant watermark (a 3x3 patch of white pixels near the top-left corner), once without
(the control). Both models are audited with ``saliency_audit.pipelines.audit.run`` (no metrics) on the same
test digits, where half of the 7s carry the watermark, and ``saliency_audit.pipelines.checks.findings.find_clever_hans``
reads each audit's saliency files. Per method the table gives: the rank of class 7's best
finding among the watermarked model's findings, its kind, score (flagged or not at
SCORE_THRESHOLD) and region, the recall of the watermarked test digits among that finding's
images and the share of those images that carry the watermark (precision), and the control
model's highest score.

The defaults take about 7 minutes on 2 shared cores. The test suite runs the same experiment
at a small size (tests/pipelines/test_findings.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the audit imports the small model as clever_hans:small_cnn

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saliency_audit.pipelines import audit  # noqa: E402
from saliency_audit.pipelines.checks.findings import SCORE_THRESHOLD, find_clever_hans  # noqa: E402
from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards  # noqa: E402
from saliency_audit.pipelines.training.reference_model import MnistCNN, mnist_cnn  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
WATERMARK = (slice(1, 4), slice(1, 4))  # a 3x3 patch near the top-left corner, where digits never reach
WATERMARK_CLASS = 7
TRAIN_SHARE = 0.9  # of the class's training digits that carry it
TEST_SHARE = 0.5   # of the class's test digits that carry it
LEARNING_RATE = 4e-3


def watermarked(images: np.ndarray, labels: np.ndarray, label: int, share: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of uint8 images [N,28,28] where ``share`` of class ``label`` carry the watermark; and its mask [N]."""
    rng = np.random.default_rng(seed)
    marked = (labels == label) & (rng.random(len(labels)) < share)
    images = images.copy()
    images[np.ix_(marked, *(np.arange(s.start, s.stop) for s in WATERMARK))] = 255
    return images, marked


def small_cnn() -> MnistCNN:
    """The reference CNN at a tenth of its width (8 and 16 channels, 32 hidden units): the test's model."""
    return MnistCNN(conv_channels=(8, 16), hidden=32, dropout=0.0).eval()


MODELS = {"reference": ("saliency_audit.pipelines.training.reference_model:mnist_cnn", mnist_cnn),
          "small": ("clever_hans:small_cnn", small_cnn)}


def train(images: np.ndarray, labels: np.ndarray, epochs: int, size: str = "reference", seed: int = 0) -> MnistCNN:
    """The reference CNN, trained with Adam on uint8 images [N,28,28] (no augmentation: a shifted
    watermark would be a different one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[size][1]()
        x = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
        y = torch.from_numpy(labels.astype(np.int64))
        optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x), 64):
                batch = perm[i:i + 64]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    return model.eval()


@dataclass
class Experiment:
    """The test shards, which of their digits carry the watermark, and the two trained models' weights."""
    shards: list[str]
    marked_ids: set[str]
    weights: Path
    control_weights: Path
    accuracy: float
    control_accuracy: float
    size: str


def prepare(workdir: Path, n_train: int, n_test: int, epochs: int, size: str = "reference",
            data: Path = MNIST) -> Experiment:
    """Train both models on the first n_train training digits and write the first n_test test digits as shards."""
    workdir.mkdir(parents=True, exist_ok=True)
    split = "train5k" if n_train <= 5000 else "train"  # the 5,000-digit subset decompresses 12x faster
    train_x, train_y = load_mnist_split(data / f"{split}-images-idx3-ubyte.gz", data / f"{split}-labels-idx1-ubyte.gz")
    test_x, test_y = load_mnist_split(data / "t10k-images-idx3-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz")
    train_x, train_y, test_x, test_y = train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test]
    marked_train, _ = watermarked(train_x, train_y, WATERMARK_CLASS, TRAIN_SHARE, seed=0)
    marked_test, marks = watermarked(test_x, test_y, WATERMARK_CLASS, TEST_SHARE, seed=1)
    shards = write_tar_shards(marked_test, test_y, workdir / "shards", shard_size=max(1, n_test // 2), prefix="digit")
    marked_ids = {f"digit-{i:06d}" for i in np.flatnonzero(marks)}
    found = {}
    for name, images in (("watermarked", marked_train), ("control", train_x)):
        model = train(images, train_y, epochs, size)
        with torch.no_grad():
            predicted = model(torch.from_numpy(test_x[:, None] / np.float32(255))).argmax(1).numpy()
        accuracy = float((predicted == test_y).mean())
        path = workdir / f"{name}.pt"
        torch.save(model.state_dict(), path)
        found[name] = (path, accuracy)
    return Experiment(shards, marked_ids, found["watermarked"][0], found["control"][0],
                      found["watermarked"][1], found["control"][1], size)


def audit_findings(experiment: Experiment, weights: Path, output: Path, methods: list[str], **options) -> pa.Table:
    """Audit the test shards with the model (no metrics, no sanity check) and find Clever Hans in its saliency files."""
    manifest = audit.run(["--input", str(Path(experiment.shards[0]).parent), "--model", MODELS[experiment.size][0],
                          "--weights", str(weights), "--methods", ",".join(methods), "--channels", "1",
                          "--device", "cpu", "--batch-size", "64", "--no-metrics", "--output", str(output)])
    files = [str(output / f) for f in manifest["files"]["saliency"]]
    return find_clever_hans(files, **options)


@dataclass
class Outcome:
    rank: int | None     # of the watermark class's best finding in the method's findings (1 = top)
    kind: str | None
    score: float
    recall: float        # of the watermarked test digits among that finding's images
    precision: float     # of that finding's images that carry the watermark
    region: str | None
    control_max: float


def outcome(findings: pa.Table, control: pa.Table, method: str, marked_ids: set[str]) -> Outcome:
    rows = [r for r in findings.to_pylist() if r["method"] == method]  # sorted by score, highest first
    control_scores = [r["score"] for r in control.to_pylist() if r["method"] == method]
    rank = next((i + 1 for i, r in enumerate(rows) if r["class"] == WATERMARK_CLASS), None)
    best = rows[rank - 1] if rank else {}
    images = set(best.get("images") or [])
    return Outcome(rank, best.get("kind"), best.get("score", 0.0), len(marked_ids & images) / max(len(marked_ids), 1),
                   len(marked_ids & images) / max(len(images), 1), best.get("region"), max(control_scores, default=0.0))


def main(argv: list[str] | None = None) -> list[Outcome]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="training digits")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=400, help="test digits audited")
    parser.add_argument("--methods", default="sal,grad,intg,elrp")
    parser.add_argument("--model", choices=sorted(MODELS), default="reference",
                        help="reference: the reference CNN as the demo's; small: at a tenth of its width (the test's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clever-hans-"))
    started = time.monotonic()
    experiment = prepare(workdir, args.train, args.images, args.epochs, args.model)
    trained = time.monotonic()
    findings = audit_findings(experiment, experiment.weights, workdir / "audit", methods)
    control = audit_findings(experiment, experiment.control_weights, workdir / "control", methods)
    print(f"{args.model} CNN, {args.train} training digits, {args.epochs} epochs; {args.images} test digits audited, "
          f"{len(experiment.marked_ids)} of class {WATERMARK_CLASS} watermarked; accuracy on the clean test digits "
          f"{experiment.accuracy:.3f} watermarked model, {experiment.control_accuracy:.3f} control; "
          f"training {trained - started:.0f} s, audits and findings {time.monotonic() - trained:.0f} s; "
          f"threshold {SCORE_THRESHOLD}\n")
    print("| method | rank of class 7 | kind | score | region | recall / precision of the watermarked digits "
          "| control's max score |")
    print("|---|---|---|---|---|---|---|")
    outcomes = []
    for method in methods:
        o = outcome(findings, control, method, experiment.marked_ids)
        outcomes.append(o)
        flag = "flagged" if o.score >= SCORE_THRESHOLD else "not flagged"
        control_flag = "flagged" if o.control_max >= SCORE_THRESHOLD else "none flagged"
        print(f"| {method} | {o.rank} | {o.kind} | {o.score:.3f} ({flag}) | {o.region} | {o.recall:.2f} / "
              f"{o.precision:.2f} | {o.control_max:.3f} ({control_flag}) |")
    return outcomes


if __name__ == "__main__":
    main()
