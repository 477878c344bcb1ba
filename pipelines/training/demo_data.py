"""Regenerate the bundled demo data in pipelines/demo_data/ from the original MNIST files.

    python -m saliency_audit.pipelines.training.demo_data [--data-dir DIR] [--output-dir DIR]

Writes ``mnist-test-sample.tar`` (the first 300 test digits as one WebDataset shard)
and ``mnist_cnn.pt`` (the state dict of MnistCNN trained on the 5,000-digit train5k
split with seed 0), then prints the model's accuracy on the full 10,000 test digits.

    python -m saliency_audit.pipelines.training.demo_data --aae

writes ``mnist_aae.pt`` instead: the adversarial autoencoder for abele, trained with
``saliency-audit train-aae`` on the 60,000 training digits (never on test digits, which the
demo explains), and prints the share of the 10,000 test digits whose reconstruction the
bundled classifier labels as the digit's label.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from saliency_audit.pipelines.training.classifier import evaluate, train_classifier
from saliency_audit.pipelines.training.mnist import load_mnist_split, to_model_input, write_tar_shards

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "demo_data"
SAMPLE_SIZE = 300
SAMPLE_PREFIX = "mnist-test"
SAMPLE_FILE = "mnist-test-sample.tar"
WEIGHTS_FILE = "mnist_cnn.pt"
SEED = 0
AAE_FILE = "mnist_aae.pt"
# Latent size 8: ABELE's MNIST size 4 reached 74% label agreement after 7 epochs here
# (the bundled file must keep >= 90%); 8 is ABELE's size for Fashion-MNIST.
AAE_ARGS = ["--latent-dim", "8", "--epochs", "30", "--adv-weight", "0.01", "--seed", "0", "--device", "cpu"]


def make_demo_data(data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                   output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, progress: bool = True) -> dict[str, float]:
    """Write the sample shard and the trained weights; return accuracy and training time.

    Parameters
    ----------
    data_dir
        Folder holding the MNIST IDX files (t10k-* and train5k-*, gzip).
    output_dir
        Where ``mnist-test-sample.tar`` and ``mnist_cnn.pt`` are written.
    progress
        Show training progress bars.
    """
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not data_dir.is_dir():
        raise ValueError(f"MNIST data folder not found: {data_dir} (pass --data-dir)")
    test_images, test_labels = load_mnist_split(data_dir / "t10k-images-idx3-ubyte.gz",
                                                data_dir / "t10k-labels-idx1-ubyte.gz")
    train_images, train_labels = load_mnist_split(data_dir / "train5k-images-idx3-ubyte.gz",
                                                  data_dir / "train5k-labels-idx1-ubyte.gz")

    # write_tar_shards names its single shard {prefix}-000000.tar; give it the demo name.
    output_dir.mkdir(parents=True, exist_ok=True)
    (shard,) = write_tar_shards(test_images[:SAMPLE_SIZE], test_labels[:SAMPLE_SIZE], output_dir,
                                shard_size=SAMPLE_SIZE, prefix=SAMPLE_PREFIX)
    os.replace(shard, output_dir / SAMPLE_FILE)

    start = time.perf_counter()
    model = train_classifier(to_model_input(train_images), train_labels, seed=SEED, progress=progress)
    seconds = time.perf_counter() - start
    torch.save(model.state_dict(), output_dir / WEIGHTS_FILE)
    accuracy = evaluate(model, to_model_input(test_images), test_labels)
    return {"test_accuracy": accuracy, "train_seconds": seconds}


def make_demo_aae(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
                  progress: bool = True) -> dict[str, float]:
    """Train ``mnist_aae.pt`` with the train-aae command on the MNIST training split; return the
    test digits' reconstruction label agreement with the bundled classifier and the training time."""
    import tempfile

    from saliency_audit.explainers.blackbox.aae import load_aae
    from saliency_audit.pipelines import cli
    from saliency_audit.pipelines.training.aae import label_agreement
    from saliency_audit.pipelines.training.reference_model import mnist_cnn
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    train_images, train_labels = load_mnist_split(data_dir / "train-images-idx3-ubyte.gz",
                                                  data_dir / "train-labels-idx1-ubyte.gz")
    test_images, test_labels = load_mnist_split(data_dir / "t10k-images-idx3-ubyte.gz",
                                                data_dir / "t10k-labels-idx1-ubyte.gz")
    output = output_dir / AAE_FILE
    with tempfile.TemporaryDirectory() as shards:
        write_tar_shards(train_images, train_labels, shards, shard_size=10_000, prefix="mnist-train")
        start = time.perf_counter()
        code = cli.main(["train-aae", "--input", f"{shards}/*.tar", "--output", str(output), "--no-resume",
                         *AAE_ARGS, *([] if progress else ["--no-progress"])])
        seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"train-aae failed with exit code {code}")
    model = mnist_cnn()
    model.load_state_dict(torch.load(output_dir / WEIGHTS_FILE, weights_only=True))
    agreement = label_agreement(load_aae(str(output)), model.eval(), to_model_input(test_images), test_labels)
    return {"label_agreement": agreement, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with the MNIST IDX .gz files")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="where to write the demo files")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    parser.add_argument("--aae", action="store_true", help=f"only (re)train {AAE_FILE}, the AAE for abele")
    args = parser.parse_args(argv)
    if args.aae:
        result = make_demo_aae(args.data_dir, args.output_dir, progress=not args.no_progress)
        print(f"wrote {AAE_FILE} to {args.output_dir}; the bundled classifier labels "
              f"{result['label_agreement']:.2%} of the 10,000 test digits' reconstructions as their label; "
              f"training took {result['train_seconds']:.0f} s")
        return
    result = make_demo_data(args.data_dir, args.output_dir, progress=not args.no_progress)
    print(f"wrote {SAMPLE_FILE} and {WEIGHTS_FILE} to {args.output_dir}")
    print(f"test accuracy (10,000 digits): {result['test_accuracy']:.4f}; "
          f"training took {result['train_seconds']:.1f} s")


if __name__ == "__main__":
    main()
