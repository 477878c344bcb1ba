"""Fuzzing the readers: generated tar, tar.gz, PNG, JPEG, npy and Parquet inputs (valid, mutated,
truncated, with odd members, labels and headers) go through the job's own read -> decode ->
preprocess step. No exception may escape, every record is counted exactly once (a decoded
image or an ErrorRecord), and memory stays bounded.

FUZZ_EXAMPLES sets the number of inputs per test (CI default below); benchmarks/fuzz_readers.py
runs the same property on many more.
"""
from __future__ import annotations

import gzip
import io
import os
import random
import re
import resource
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.records import ErrorRecord, ImageBatch
from saliency_audit.transforms.read import ERRORS, READ, ReadShardBatches

pytestmark = pytest.mark.slow  # fuzz

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
KINDS = ("tar", "tar.gz", "png", "jpg", "npy", "parquet")
MAX_PIXELS = 48 * 48  # small, so that the size limits are reached by small inputs
PREPS = (Preprocessing(channels=1, to_grayscale=True, max_pixels=MAX_PIXELS),
         Preprocessing(channels=3, resize=(8, 8), mean=(0.5,), std=(1e-30,), max_pixels=MAX_PIXELS))
STAGES = {"read", "decode", "preprocess"}
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]{6,}")  # object reprs; a CRC in hex is deterministic
LABELS = ("3", " 7\n", "-1", "0", str(2 ** 63 - 1), str(2 ** 63), str(2 ** 70), "nan", "2.5", "3.0", "1e400",
          "seven", "", "\u0663", "1_0")


# Generators: plain functions of a random.Random, so the benchmark can drive them without
# Hypothesis; the tests draw the Random from Hypothesis (derandomized, so reproducible).

def random_bytes(rng: random.Random, n: int) -> bytes:
    return rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Leave, truncate, flip, overwrite with zeros, or insert into ``data``."""
    how = rng.choice(("keep", "keep", "truncate", "flip", "zeros", "insert"))
    if not data or how == "keep":
        return data
    at = rng.randrange(len(data))
    if how == "truncate":
        return data[:at]
    if how == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "zeros":
        return data[:at] + bytes(min(rng.randint(1, 600), len(data) - at)) + data[at + 600:]
    return data[:at] + random_bytes(rng, rng.randint(1, 64)) + data[at:]


def pil_bytes(rng: random.Random, fmt: str) -> bytes:
    modes = ("L", "RGB", "CMYK") if fmt == "JPEG" else ("L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I")
    mode = rng.choice(modes)
    side = rng.choice((1, 3, 16, 28, 49, 64))  # 49 and 64 are over MAX_PIXELS
    height, width = side, rng.choice((1, 5, side))
    array = np.frombuffer(random_bytes(rng, height * width * 4), np.uint8).reshape(height, width, 4)
    if mode == "I;16":
        image = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    elif mode == "I":  # 32-bit values; PNG holds 16 bits, and Pillow 13 writes mode I only after converting
        image = Image.fromarray(array[..., 0].astype(np.int32) * 1000).convert("I;16")
    else:
        image = Image.fromarray(array, "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def npy_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.15:  # a header that lies about the shape, or an unsupported one
        buffer = io.BytesIO()
        shape = rng.choice(((10 ** 6, 10 ** 6), (5000, 5000, 3), (2 ** 40,), (28, 28), (4, 4, 4, 4)))
        np.lib.format.write_array_header_1_0(buffer, {"descr": rng.choice(("<f4", "|u1", "<f8", "|O", "<c8")),
                                                      "fortran_order": rng.random() < 0.2, "shape": shape})
        return buffer.getvalue() + random_bytes(rng, rng.randint(0, 256))
    dtype = rng.choice((np.uint8, np.uint16, np.float16, np.float32, np.float64, np.int32, np.bool_,
                        np.complex64, object))
    shape = rng.choice(((12, 9), (28, 28, 1), (6, 7, 3), (5, 5, 2), (4, 4, 4), (60, 60), (30,), (), (0, 4),
                        (2, 3, 3, 1)))
    raw = np.frombuffer(random_bytes(rng, 8 * max(1, int(np.prod(shape)))), np.uint8)[:int(np.prod(shape))]
    array = raw.reshape(shape).astype(dtype)
    if np.issubdtype(array.dtype, np.floating) and array.size and rng.random() < 0.5:
        with np.errstate(over="ignore"):  # 3e38 is inf in float16: also wanted
            array.flat[rng.randrange(array.size)] = rng.choice((np.nan, np.inf, -np.inf, 3e38, -3e38, 1e300))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)  # object arrays must be refused by the reader
    return buffer.getvalue()


def image_member(rng: random.Random) -> tuple[str, bytes]:
    ext = rng.choice(("png", "jpg", "jpeg", "npy"))
    data = npy_bytes(rng) if ext == "npy" else pil_bytes(rng, "PNG" if ext == "png" else "JPEG")
    if rng.random() < 0.2:  # the extension does not match the content
        ext = rng.choice(("png", "jpg", "npy"))
    return ext, mutate(rng, data)


def tar_bytes(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=rng.choice((tarfile.GNU_FORMAT, tarfile.PAX_FORMAT))) as tar:
        names: list[str] = []
        for _ in range(rng.randint(0, 7)):
            key = rng.choice(("a", "b", "c", "d/e", "d/.hidden", "x.y"))
            kind = rng.choice(("file",) * 6 + ("dir", "symlink", "hardlink", "fifo", "chardev"))
            ext, data = image_member(rng) if rng.random() < 0.6 else \
                rng.choice((("cls", rng.choice(LABELS).encode()), ("txt", b"note"), ("", b"x"), ("cls", b"\xff\xfe")))
            info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                names.append(info.name)
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE}[kind]
            info.linkname = rng.choice(names + ["/etc/passwd", "../outside"]) if kind.endswith("link") else ""
            tar.addfile(info)
    return mutate(rng, buffer.getvalue())


def parquet_bytes(rng: random.Random) -> bytes:
    n = rng.randint(0, 6)
    ids = [rng.choice(("p1", "p2", "p3", None)) for _ in range(n)]
    images = [None if rng.random() < 0.1 else image_member(rng)[1] for _ in range(n)]
    columns = {"image_id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary())}
    label_type = rng.choice((None, pa.int64(), pa.uint64(), pa.float64(), pa.string(), pa.bool_(), pa.int8()))
    if label_type is not None:
        pool = {pa.int64(): [1, -5, 2 ** 63 - 1, None], pa.uint64(): [2, 2 ** 64 - 1, None],
                pa.float64(): [1.0, 2.5, float("nan"), float("inf"), 1e300, None],
                pa.string(): list(LABELS) + [None], pa.bool_(): [True, False, None], pa.int8(): [1, -128, None]}
        columns["label"] = pa.array([rng.choice(pool[label_type]) for _ in range(n)], label_type)
    if rng.random() < 0.3:
        columns["format"] = pa.array([rng.choice(("png", "NPY", "gif", "", None)) for _ in range(n)], pa.string())
    if rng.random() < 0.1:
        columns.pop(rng.choice(("image", "image_id")))
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return mutate(rng, buffer.getvalue())


def shard_bytes(rng: random.Random, kind: str) -> bytes:
    if kind == "tar":
        return tar_bytes(rng)
    if kind == "tar.gz":
        return mutate(rng, gzip.compress(tar_bytes(rng), compresslevel=1))
    if kind == "parquet":
        return parquet_bytes(rng)
    if kind == "npy":
        return mutate(rng, npy_bytes(rng))
    return mutate(rng, pil_bytes(rng, "PNG" if kind == "png" else "JPEG"))


# The property.

def check_shard(url: str, prep: Preprocessing) -> int:
    """Put one shard through the job's read -> decode -> preprocess step and check that each
    record read comes out once, as a finite model input or an ErrorRecord. Returns the count."""
    read, decoded, errors = 0, 0, []
    for out in ReadShardBatches(prep, 4).process(url):
        tag, value = getattr(out, "tag", None), getattr(out, "value", out)
        if tag == READ:
            read += 1
        elif tag == ERRORS:
            errors.append(value)
        else:
            assert isinstance(value, ImageBatch) and np.isfinite(value.pixels).all()
            assert all(label is None or (type(label) is int and -2 ** 63 <= label < 2 ** 63)
                       for label in value.labels)
            decoded += len(value.image_ids)
    assert read == decoded + len(errors), (read, decoded, len(errors))
    for error in errors:
        assert isinstance(error, ErrorRecord) and error.stage in STAGES and error.reason, error
        assert isinstance(error.image_id, str) and not ADDRESS.search(error.reason), error
    return read


def check_input(rng: random.Random, kind: str, prep: Preprocessing) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"shard.{kind}"
        path.write_bytes(shard_bytes(rng, kind))
        return check_shard(str(path), prep)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@settings(derandomize=True, max_examples=EXAMPLES, deadline=None)
@given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(KINDS), prep=st.sampled_from(PREPS))
def _fuzz_readers(rng, kind, prep):
    check_input(rng, kind, prep)


def test_readers_survive_fuzzed_inputs_with_bounded_memory():
    before = peak_rss_mb()
    _fuzz_readers()
    # Inputs are a few KB but headers claim up to 8 TB: nothing may be allocated from them.
    assert peak_rss_mb() - before < 100


def test_a_job_over_fuzzed_shards_reconciles(tmp_path):
    from conftest import DEMO_DATA, add_member

    from saliency_audit.pipelines import audit
    inputs = tmp_path / "in"
    inputs.mkdir()
    with tarfile.open(inputs / "clean.tar", "w") as tar:  # so that some images get explained
        for i in range(3):
            add_member(tar, f"clean{i}.png", pil_bytes(random.Random(i), "PNG"))
    expected = check_shard(str(inputs / "clean.tar"), PREPS[0])
    for seed in range(2 * len(KINDS)):
        kind = KINDS[seed % len(KINDS)]
        path = inputs / f"s{seed}.{kind}"
        path.write_bytes(shard_bytes(random.Random(seed), kind))
        expected += check_shard(str(path), PREPS[0])
    manifest = audit.run(["--input", str(inputs), "--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn",
                          "--weights", str(DEMO_DATA / "mnist_cnn.pt"), "--channels", "1", "--to-grayscale",
                          "--resize", "28,28", "--max-pixels", str(MAX_PIXELS), "--methods", "grad",
                          "--output", str(tmp_path / "out")])
    counts = manifest["counts"]["grad"]
    assert manifest["reconciled"] and counts["read"] == expected and counts["explained"] >= 3, counts
