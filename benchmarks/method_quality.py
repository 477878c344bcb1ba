"""Every method at its defaults, as a new user runs them, on MNIST and on photographs: a Markdown table.

    python benchmarks/method_quality.py [--datasets mnist,photos] [--images 200] [--methods all]
                                        [--train 10000] [--workdir DIR] [--threads 2]

For each dataset it writes labelled shards, trains the reference CNN with
``saliency-audit train-classifier``, audits the first ``--images`` test images with
``saliency-audit run`` (defaults: every method's default options, default metrics), and prints,
per method, from the run's summary: deletion AUC as a fraction of a random map's (lower is
better, 1.0 = no better than random), the share of all-zero maps and of constant maps.

Datasets:
- ``mnist``: the 5,000-digit training subset and the first test digits (needs ../shared/data/mnist).
- ``photos``: 28x28 grayscale patches of ten photographs bundled with scikit-image (astronaut,
  brick, camera, cat, coffee, coins, grass, gravel, moon, rocket); the class is the photograph.
  Training patches come from the top 80% of each photograph, test patches from the bottom 20%,
  so no test pixel was seen in training. Each patch is a random square of 40-120 px, flipped at
  random, resized to 28x28. abele is skipped here: its bundled autoencoder knows only digits.

Not part of the test suite (it takes minutes per dataset); wall times vary on shared machines.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "moon", "rocket")
MODEL = "saliency_audit.pipelines.training.reference_model:mnist_cnn"


def mnist(n_test: int, n_train: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    train = load_mnist_split(MNIST_DIR / "train5k-images-idx3-ubyte.gz", MNIST_DIR / "train5k-labels-idx1-ubyte.gz")
    test = load_mnist_split(MNIST_DIR / "t10k-images-idx3-ubyte.gz", MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    return (train[0][:n_train], train[1][:n_train]), (test[0][:n_test], test[1][:n_test])


def photo_patches(n: int, part: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 [28,28] patches, classes balanced, from the top 80% (train) or bottom 20% (test)."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()
        photo = rgb2gray(photo) if photo.ndim == 3 else photo / 255.0
        cut = int(photo.shape[0] * 0.8)
        region = photo[:cut] if part == "train" else photo[cut:]
        for _ in range(n // len(PHOTOS) + (label < n % len(PHOTOS))):
            side = int(rng.integers(40, min(121, *region.shape)))
            top = int(rng.integers(0, region.shape[0] - side + 1))
            left = int(rng.integers(0, region.shape[1] - side + 1))
            patch = region[top:top + side, left:left + side]
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            images.append((resize(patch, (28, 28), anti_aliasing=True) * 255).round().astype(np.uint8))
            labels.append(label)
    order = rng.permutation(len(images))  # interleave classes so the first test images cover all of them
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]


def photos(n_test: int, n_train: int):
    return photo_patches(n_train, "train", seed=1), photo_patches(n_test, "test", seed=2)


def cli(*args: str, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "saliency_audit.pipelines.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"saliency-audit {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def audit(name: str, data, methods: list[str], workdir: Path, threads: int) -> tuple[list[dict], dict]:
    (train_x, train_y), (test_x, test_y) = data
    folder = workdir / name
    write_tar_shards(train_x, train_y, folder / "train", shard_size=len(train_x), prefix="train")
    write_tar_shards(test_x, test_y, folder / "test", shard_size=len(test_x), prefix="test")
    weights = folder / "model.pt"
    start = time.perf_counter()
    trained = cli("train-classifier", "--input", f"{folder}/train/*.tar", "--test", f"{folder}/test/*.tar",
                  "--output", str(weights), threads=threads)
    accuracy = next((line.split()[2] for line in trained.splitlines() if line.startswith("test accuracy")), "?")
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    cli("run", "--input", f"{folder}/test/*.tar", "--model", MODEL, "--weights", str(weights),
        "--methods", ",".join(methods), "--output", str(folder / "out"),
        *(["--aae", str(ROOT / "pipelines/demo_data/mnist_aae.pt")] if "abele" in methods else []), threads=threads)
    run_s = time.perf_counter() - start
    from saliency_audit.pipelines.reporting.audit_dir import AuditDir
    rows = AuditDir(str(folder / "out")).table("summary").to_pylist()
    return rows, {"accuracy": accuracy, "train_s": train_s, "run_s": run_s, "images": len(test_x)}


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | deletion / random | all-zero maps | constant maps |", "|---|---:|---:|---:|"]

    def ratio(row):
        d, r = row.get("mean_deletion_auc"), row.get("mean_deletion_auc_random")
        return d / r if d is not None and r else float("nan")

    for row in sorted((r for r in rows if r.get("target") is None), key=ratio):  # per-class rows have a target
        lines.append(f"| {row['method']} | {ratio(row):.2f} | {row.get('empty_share') or 0:.1%} "
                     f"| {row.get('constant_share') or 0:.1%} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--datasets", default="mnist,photos")
    parser.add_argument("--images", type=int, default=200, help="test images audited per dataset")
    parser.add_argument("--train", type=int, default=10_000, help="training images (MNIST has 5,000 at most)")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--workdir", help="keep the shards, models and audits here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from saliency_audit.explainers import explainer_class, list_methods
    every = ([m for m in list_methods() if not explainer_class(m).needs_attention]  # CNNs: no attention layers
             if args.methods == "all" else args.methods.split(","))
    loaders = {"mnist": mnist, "photos": photos}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        for name in args.datasets.split(","):
            if name not in loaders:
                raise SystemExit(f"unknown dataset {name!r}; use mnist and/or photos")
            methods = [m for m in every if not (name != "mnist" and m == "abele")]
            rows, info = audit(name, loaders[name](args.images, args.train), methods, workdir, args.threads)
            print(f"\n### {name}: {info['images']} test images, test accuracy {info['accuracy']}, "
                  f"training {info['train_s']:.0f} s, audit {info['run_s']:.0f} s\n")
            print("\n".join(table(rows)))
            print(json.dumps({"dataset": name, **info}))


if __name__ == "__main__":
    main()
