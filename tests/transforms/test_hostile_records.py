"""Hostile records cost that record (an errors/ row or a clean value), never the run."""
from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO_DATA, REPO, add_member, png_bytes, read_output

from saliency_audit.pipelines import audit
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ErrorRecord, RawImage
from saliency_audit.transforms.read import ReadShardBatches

MODEL_ARGS = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt"),
              "--channels", "1"]
DIGITS = [np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8) for i in range(3)]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_tar(path, members) -> str:
    """members: (name, bytes) for plain files, or a ready TarInfo (links) with None."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
            else:
                add_member(tar, name, data)
    return str(path)


def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def good_members(prefix: str = "g") -> list[tuple[str, bytes]]:
    return [m for i, d in enumerate(DIGITS) for m in ((f"{prefix}{i}.png", png_bytes(d)), (f"{prefix}{i}.cls", b"3"))]


def run_audit(tmp_path, *extra, methods="grad"):
    manifest = audit.run(["--input", str(tmp_path / "*.*"), *MODEL_ARGS, "--methods", methods,
                          "--output", str(tmp_path / "out"), "--batch-size", "8", *extra])
    assert manifest["reconciled"], manifest["counts"]
    return manifest, read_output(tmp_path / "out" / "saliency"), read_output(tmp_path / "out" / "errors")


def outcomes(url: str, **kwargs) -> list:
    """Everything one shard yields through the pipeline's own read -> decode -> preprocess step."""
    prep = Preprocessing(channels=1, **kwargs)
    return [getattr(o, "value", o) for o in ReadShardBatches(prep, 8).process(url)]


# 1. Labels are validated per record in the reader.

@pytest.mark.slow
def test_cls_label_beyond_int64_is_an_error_row_and_the_other_shards_survive(tmp_path):
    write_tar(tmp_path / "good.tar", good_members())
    write_tar(tmp_path / "bad.tar", [("big.png", png_bytes(DIGITS[0])), ("big.cls", str(2 ** 70).encode())])
    manifest, rows, errors = run_audit(tmp_path, "--no-metrics")
    assert manifest["counts"] == {"grad": {"read": 4, "explained": 3, "errors": 1}}
    assert {r["image_id"] for r in rows} == {"g0", "g1", "g2"}
    (error,) = errors
    assert error["image_id"] == "big" and error["stage"] == "read" and str(2 ** 70) in error["reason"]


@pytest.mark.parametrize("values, pa_type, expected", [
    (["7", "seven", " 2 "], pa.string(), [7, "'seven'", 2]),
    ([3.0, float("nan"), 2.5], pa.float64(), [3, "nan", "2.5"]),
    ([2 ** 64 - 1, 5, None], pa.uint64(), [str(2 ** 64 - 1), 5, None]),
    ([1, None, -4], pa.int64(), [1, None, -4]),
])
def test_parquet_labels_are_checked_per_record(tmp_path, values, pa_type, expected):
    images = [png_bytes(d) for d in DIGITS]
    pq.write_table(pa.table({"image_id": ["a", "b", "c"], "image": images, "label": pa.array(values, pa_type)}),
                   tmp_path / "s.parquet")
    records = list(read_shard(str(tmp_path / "s.parquet")))
    assert len(records) == 3
    for record, want in zip(records, expected):
        if isinstance(want, str):
            assert isinstance(record, ErrorRecord) and record.stage == "read"
            assert "label" in record.reason and want in record.reason
        else:
            assert isinstance(record, RawImage) and record.label == want and type(record.label) in (int, type(None))


@pytest.mark.slow
def test_parquet_uint64_labels_do_not_kill_the_run(tmp_path):
    images = [png_bytes(d) for d in DIGITS]
    pq.write_table(pa.table({"image_id": ["a", "b", "c"], "image": images,
                             "label": pa.array([1, 2 ** 64 - 1, 2], pa.uint64())}), tmp_path / "s.parquet")
    manifest, rows, errors = run_audit(tmp_path, "--no-metrics")
    assert sorted(r["image_id"] for r in rows) == ["a", "c"] and [e["image_id"] for e in errors] == ["b"]


# 2. A non-finite output costs that image, not the run.

def extreme_shard(tmp_path):
    write_tar(tmp_path / "x.tar", good_members() + [("huge.npy", npy_bytes(np.full((28, 28), 3e38, np.float32)))])


@pytest.mark.slow
@pytest.mark.parametrize("metrics", [True, False])
def test_extreme_npy_is_a_model_error_and_the_summary_stays_finite(tmp_path, metrics):
    extreme_shard(tmp_path)
    manifest, rows, errors = run_audit(tmp_path, *([] if metrics else ["--no-metrics"]), methods="grad,sal")
    assert manifest["counts"] == {m: {"read": 4, "explained": 3, "errors": 1} for m in ("grad", "sal")}
    (error,) = errors
    assert (error["image_id"], error["stage"], error["method"]) == ("huge", "model", None)
    assert "not finite" in error["reason"]
    for row in rows:
        numbers = [v for k, v in row.items() if isinstance(v, float)] + list(row["saliency"])
        assert np.isfinite(numbers).all(), row["image_id"]
    for summary in read_output(tmp_path / "out" / "summary"):
        assert np.isfinite([v for v in summary.values() if isinstance(v, float)]).all()


class _InfForSecondImage:
    """A method whose map for the batch's second image is infinite."""

    def explain(self, images, targets, seeds):
        from saliency_audit.explainers.core.base import Explanation
        maps = images.sum(dim=1).clone()
        maps[1, 0, 0] = float("inf")
        return Explanation(maps)


def explain_one_batch(model, method) -> tuple[list[dict], list[ErrorRecord]]:
    """Rows and errors of the explain step on three digits with ``method`` as the only method."""
    from saliency_audit.transforms.io.records import ImageBatch
    from saliency_audit.transforms.model.handler import BatchHandler, ExplainConfig
    from saliency_audit.transforms.model.load import ModelSpec

    pixels = np.stack([d[None].astype(np.float32) / 255 for d in DIGITS])
    batch = ImageBatch(["a", "b", "c"], ["s"] * 3, [None] * 3, [(28, 28)] * 3, pixels)
    state = type("State", (), {"device": torch.device("cpu"), "model": model, "explainers": {"m": method}})()
    handler = BatchHandler(ExplainConfig(ModelSpec("unused"), {"m": {}}), state)
    out = [value for _, value in handler.explain_batch(batch)]
    return [o for o in out if isinstance(o, dict)], [o for o in out if isinstance(o, ErrorRecord)]


def test_a_non_finite_map_costs_that_image_and_method_only(demo_model):
    rows, errors = explain_one_batch(demo_model, _InfForSecondImage())
    assert [r["image_id"] for r in rows] == ["a", "c"]
    assert [(e.image_id, e.stage, e.method) for e in errors] == [("b", "explain", "m")]
    for row in rows:
        assert np.isfinite(row["saliency"]).all() and row["gini"] is not None


def test_a_metric_that_fails_on_one_image_costs_only_its_values(demo_model, monkeypatch):
    from saliency_audit.explainers.metrics import causal
    gini = causal.gini

    def fragile_gini(maps):  # fails on any batch holding b's map (the one with an odd first pixel)
        if bool((maps[:, 0, 0] == 7).any()):
            raise ValueError("cannot score this map")
        return gini(maps)

    class Marked:
        def explain(self, images, targets, seeds):
            from saliency_audit.explainers.core.base import Explanation
            maps = images.sum(dim=1).clone()
            maps[:, 0, 0] = torch.tensor([1.0, 7.0, 1.0])[:len(maps)] if len(maps) == 3 else 1.0
            return Explanation(maps)

    monkeypatch.setattr(causal, "gini", fragile_gini)  # the deletion metric's sparsity column
    rows, errors = explain_one_batch(demo_model, Marked())
    assert not errors and [r["image_id"] for r in rows] == ["a", "b", "c"]
    assert [r.get("gini") is None for r in rows] == [False, True, False]
    assert [r.get("deletion_auc") is None for r in rows] == [False, True, False]


# 3. Tar members that are not plain files, and duplicate keys.

def test_links_are_error_rows_naming_the_member_and_its_type(tmp_path):
    url = write_tar(tmp_path / "l.tar", [
        ("a.png", png_bytes(DIGITS[0])), ("a.cls", b"1"),
        link("b.png", "a.png", tarfile.LNKTYPE),           # a hard link to another sample
        link("c.png", "/etc/passwd", tarfile.SYMTYPE),      # never followed
        ("d.jpg", png_bytes(DIGITS[1])), link("d.png", "d.jpg", tarfile.LNKTYPE),  # same sample: resolved
        ("e.png", png_bytes(DIGITS[2])),
    ])
    records = list(read_shard(url))
    assert [r.image_id for r in records] == ["a", "b", "c", "d", "e"]
    assert [type(r) for r in records] == [RawImage, ErrorRecord, ErrorRecord, RawImage, RawImage]
    assert "b.png" in records[1].reason and "hard link" in records[1].reason
    assert "c.png" in records[2].reason and "symbolic link" in records[2].reason
    assert records[3].data == png_bytes(DIGITS[1])


def test_a_key_repeated_within_a_shard_is_read_once(tmp_path):
    url = write_tar(tmp_path / "d.tar", [("a.png", png_bytes(DIGITS[0])), ("b.png", png_bytes(DIGITS[1])),
                                          ("a.png", png_bytes(DIGITS[2])), ("a.cls", b"4")])
    records = list(read_shard(url))
    assert [(r.image_id, type(r)) for r in records] == [("a", RawImage), ("b", RawImage), ("a", ErrorRecord)]
    assert records[0].data == png_bytes(DIGITS[0]) and "duplicate image id within the shard" in records[2].reason
    pq.write_table(pa.table({"image_id": ["x", "y", "x"], "image": [png_bytes(d) for d in DIGITS]}),
                   tmp_path / "d.parquet")
    records = list(read_shard(str(tmp_path / "d.parquet")))
    assert [type(r) for r in records] == [RawImage, RawImage, ErrorRecord]
    assert "duplicate image id within the shard" in records[2].reason


# 4. Sizes are checked before anything is read.

# Read and decode one shard in a fresh process: prints the peak RSS after the imports and
# after the shard, then the reasons. (VmHWM, the peak of this process's own memory: ru_maxrss
# would carry the parent's peak across fork and exec.)
READ_AND_DECODE = textwrap.dedent("""
    import resource, sys
    from saliency_audit.transforms.io.preprocess import BadImage, decode
    from saliency_audit.transforms.io.readers import read_shard
    peak = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024
    before, reasons = peak(), []
    for record in read_shard(sys.argv[1]):
        try:
            reasons.append(record.reason if hasattr(record, "reason") else decode(record, 4096 * 4096).shape)
        except BadImage as e:
            reasons.append(e)
    print(before, peak())
    print(*reasons, sep="\\n")
""")


def shard_peak_rss_mb(url: str) -> tuple[float, str]:
    """MB the peak RSS grows by while the shard is read and decoded, and what it printed."""
    result = subprocess.run([sys.executable, "-c", READ_AND_DECODE, url], capture_output=True, text=True,
                            cwd=REPO, check=True)
    first, _, rest = result.stdout.partition("\n")
    before, after = map(float, first.split())
    return after - before, rest


@pytest.mark.slow
def test_an_oversized_npy_in_a_tar_gz_is_rejected_from_its_header(tmp_path):
    side = 8192  # 256 MiB of float32, 4x the default --max-pixels
    path = tmp_path / "bomb.tar.gz"
    # A real npy header for the shape, then zeros streamed after it.
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (side, side)})
    header = buffer.getvalue()
    size = len(header) + side * side * 4
    with gzip.open(path, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("bomb.npy")
        info.size = size
        tar.addfile(info, _Zeros(header, size))
    assert path.stat().st_size < 2 ** 21
    growth, reasons = shard_peak_rss_mb(str(path))
    assert growth < 64, f"peak RSS grew by {growth:.0f} MB for a 256 MiB member"
    assert "(8192, 8192)" in reasons and "over the limit" in reasons


def test_an_oversized_member_is_skipped_unread(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    url = write_tar(tmp_path / "big.tar", [("big.png", png_bytes(big)), ("ok.png", png_bytes(DIGITS[0]))])
    records = list(read_shard(url, max_pixels=100))
    assert [(r.image_id, type(r)) for r in records] == [("big", ErrorRecord), ("ok", RawImage)]
    assert records[0].stage == "read" and "bytes" in records[0].reason and "limit" in records[0].reason


class _Zeros(io.RawIOBase):
    """A file-like of ``header`` then zeros up to ``size`` bytes, never all in memory."""

    def __init__(self, header: bytes, size: int):
        self.header, self.size, self.pos = header, size, 0

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        head = self.header[self.pos:self.pos + n]
        self.pos += n
        return head + bytes(n - len(head))


# 5. Reasons are deterministic.

def test_reasons_are_the_same_on_every_read_and_hold_no_addresses(tmp_path):
    url = write_tar(tmp_path / "h.tar", [("junk.png", b"not a png at all"), ("junk2.jpg", b"\xff\xd8\xff junk"),
                                         ("cut.npy", npy_bytes(np.zeros((4, 4)))[:90]), ("z.npy", b"\x93NUMPY")])
    first, second = ([r.reason for r in outcomes(url) if isinstance(r, ErrorRecord)] for _ in range(2))
    assert len(first) == 4 and first == second
    assert not [r for r in first if re.search(r"0x[0-9a-f]{6,}", r)]
    assert ErrorRecord("i", "s", "decode", "cannot identify <_io.BytesIO object at 0x7f3a2b1c4d50>").reason \
        == "cannot identify <_io.BytesIO object>"
