"""MNIST IDX reading and WebDataset tar shard writing."""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saliency_audit.pipelines.training.mnist import load_mnist_split, read_idx, to_model_input, write_tar_shards

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST data not found at {MNIST_DIR}")


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = {3: 2051, 1: 2049}[array.ndim]
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _read_shard(path: str) -> list[tuple[str, np.ndarray, int]]:
    """(key, pixels, label) per sample, in member order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    result = []
    for key, parts in samples.items():
        with Image.open(io.BytesIO(parts["png"])) as image:
            assert image.mode == "L"
            pixels = np.asarray(image)
        result.append((key, pixels, int(parts["cls"].decode("ascii"))))
    return result


@needs_mnist
def test_read_idx_real_test_split():
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0


@needs_mnist
def test_load_mnist_split_train5k_is_balanced():
    images, labels = load_mnist_split(MNIST_DIR / "train5k-images-idx3-ubyte.gz",
                                      MNIST_DIR / "train5k-labels-idx1-ubyte.gz")
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10


def test_read_idx_plain_and_gzip_agree(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain.idx").write_bytes(_idx_bytes(array))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.idx"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.gz"), array)


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"garbage that is not IDX at all", "magic number"),
    (struct.pack(">II", 2051, 5), "truncated IDX header"),
    (struct.pack(">IIII", 2051, 5, 28, 28) + bytes(100), "truncated IDX data"),
    (struct.pack(">II", 2049, 3) + bytes(4), "longer than its header"),
])
def test_read_idx_rejects_bad_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    packed = gzip.compress(_idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="corrupt gzip") as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_load_mnist_split_rejects_mismatched_counts(tmp_path):
    (tmp_path / "images").write_bytes(_idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))
    (tmp_path / "labels").write_bytes(_idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        load_mnist_split(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(ValueError, match="expected an IDX images file"):
        load_mnist_split(tmp_path / "labels", tmp_path / "images")


def test_write_tar_shards_round_trip_and_is_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(25, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=25)
    paths = write_tar_shards(images, labels, tmp_path / "a", shard_size=10, prefix="digits")
    assert [Path(p).name for p in paths] == ["digits-000000.tar", "digits-000001.tar", "digits-000002.tar"]

    samples = [sample for path in paths for sample in _read_shard(path)]
    assert [key for key, _, _ in samples] == [f"digits-{i:06d}" for i in range(25)]
    for (_, pixels, label), image, expected in zip(samples, images, labels):
        np.testing.assert_array_equal(pixels, image)
        assert label == expected

    with tarfile.open(paths[0]) as tar:
        first = tar.getmembers()[0]
    assert (first.name, first.mtime, first.uid, first.gid, first.uname) == ("digits-000000.png", 0, 0, 0, "")

    again = write_tar_shards(images, labels, tmp_path / "b", shard_size=10, prefix="digits")
    assert [Path(p).read_bytes() for p in paths] == [Path(p).read_bytes() for p in again]


@needs_mnist
def test_write_tar_shards_real_digits_pixel_exact(tmp_path):
    images, labels = load_mnist_split(MNIST_DIR / "t10k-images-idx3-ubyte.gz",
                                      MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    (path,) = write_tar_shards(images[:50], labels[:50], tmp_path, shard_size=100, prefix="mnist-test")
    samples = _read_shard(path)
    np.testing.assert_array_equal(np.stack([pixels for _, pixels, _ in samples]), images[:50])
    assert [label for _, _, label in samples] == labels[:50].tolist()


@pytest.mark.parametrize("kwargs, message", [
    ({"images": np.zeros((2, 28, 28), dtype=np.float32)}, "uint8"),
    ({"labels": np.zeros(3, dtype=np.int64)}, "2 images but 3 labels"),
    ({"labels": np.zeros(2, dtype=np.float32)}, "integer"),
    ({"shard_size": 0}, "shard_size"),
    ({"prefix": "a.b"}, "prefix"),
    ({"prefix": ""}, "prefix"),
])
def test_write_tar_shards_rejects_bad_input(tmp_path, kwargs, message):
    arguments = {"images": np.zeros((2, 28, 28), dtype=np.uint8), "labels": np.zeros(2, dtype=np.int64),
                 "output_dir": tmp_path, "shard_size": 10, "prefix": "x"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        write_tar_shards(**arguments)


def test_to_model_input_scales_to_unit_range():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    result = to_model_input(images)
    assert result.shape == (1, 1, 2, 2) and result.dtype == np.float32
    np.testing.assert_allclose(result[0, 0], [[0.0, 1.0], [0.2, 0.4]])
