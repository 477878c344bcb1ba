"""Shared fixtures: the bundled demo data, the real MNIST files, and small helpers."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "pipelines" / "demo_data"
MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def demo_shard() -> Path:
    return DEMO_DATA / "mnist-test-sample.tar"


@pytest.fixture(scope="session")
def demo_model_args() -> list[str]:
    return ["--model", "pipelines.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST data not found at {MNIST}")
    return MNIST


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_output(directory: Path | str) -> list[dict]:
    """All rows of one output directory (saliency/, summary/ or errors/)."""
    return ds.dataset(str(directory), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="session")
def demo_model():
    from transforms.models import ModelSpec, load_model
    return load_model(ModelSpec("pipelines.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt")))


@pytest.fixture(scope="session")
def demo_images(demo_shard):
    """The first 64 bundled digits as model input [64,1,28,28] and their labels."""
    from transforms.preprocess import Preprocessing, decode, preprocess
    from transforms.readers import read_shard
    prep = Preprocessing(channels=1)
    records = [r for _, r in zip(range(64), read_shard(str(demo_shard)))]
    images = np.stack([preprocess(decode(r, prep.max_pixels), prep) for r in records])
    return torch.from_numpy(images), torch.tensor([r.label for r in records])
