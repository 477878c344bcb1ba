"""Regenerate the bundled demo data in pipelines/demo_data/ from the original MNIST files.

    python -m pipelines.make_demo_data [--data-dir DIR] [--output-dir DIR]

Writes ``mnist-test-sample.tar`` (the first 300 test digits as one WebDataset shard)
and ``mnist_cnn.pt`` (the state dict of MnistCNN trained on the 5,000-digit train5k
split with seed 0), then prints the model's accuracy on the full 10,000 test digits.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from pipelines.mnist import load_mnist_split, to_model_input, write_tar_shards
from pipelines.training import evaluate, train_classifier

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "demo_data"
SAMPLE_SIZE = 300
SAMPLE_PREFIX = "mnist-test"
SAMPLE_FILE = "mnist-test-sample.tar"
WEIGHTS_FILE = "mnist_cnn.pt"
SEED = 0


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder with the MNIST IDX .gz files")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="where to write the demo files")
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    args = parser.parse_args(argv)
    result = make_demo_data(args.data_dir, args.output_dir, progress=not args.no_progress)
    print(f"wrote {SAMPLE_FILE} and {WEIGHTS_FILE} to {args.output_dir}")
    print(f"test accuracy (10,000 digits): {result['test_accuracy']:.4f}; "
          f"training took {result['train_seconds']:.1f} s")


if __name__ == "__main__":
    main()
