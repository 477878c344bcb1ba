"""An audit history after relabelling, and a history row it cannot trust.

* The skip key of an incremental run is the record's hash (image bytes, label, ground truth), not
  the image's alone: a shard relabelled in place has its relabelled images explained again, so
  ``--target label`` gives maps of the new class, and ``saliency_dataset`` answers with them.
* A history file that is valid Parquet but whose row ``history.read`` leaves out (a malformed run
  id or model...) may still be the record of a run: reclaim keeps every run of the history while
  it is there, as for a file that does not parse."""
from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_DATA, add_member

from saliency_audit.pipelines import audit
from saliency_audit.transforms.io import history, publication

MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights",
         str(DEMO_DATA / "mnist_cnn.pt")]
PER_SHARD = 4


def run(output: Path, shard: Path, slot: str, *extra: str) -> dict:
    return audit.run(["--input", str(shard), *MODEL, "--methods", "sal", "--channels", "1", "--device", "cpu",
                      "--torch-threads", "1", "--no-metrics", "--output", str(output), "--incremental",
                      "--slot", slot, *extra])


def members(count: int) -> list[tuple[str, bytes]]:
    """The first ``count`` digits of the demo shard: (name, bytes) of KEY.png and KEY.cls each."""
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src:
        return [(m.name, src.extractfile(m).read()) for m in src.getmembers()[:2 * count]]


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as dst:
        for name, data in entries:
            add_member(dst, name, data)
    path.write_bytes(sink.getvalue())


@pytest.mark.slow
def test_a_shard_relabelled_in_place_is_explained_again_with_the_new_label(tmp_path):
    shard, root = tmp_path / "x.tar", tmp_path / "history"
    entries = members(PER_SHARD)
    write_tar(shard, entries)
    first = run(root, shard, "a", "--target", "label")
    assert first["counts"]["sal"]["explained"] == PER_SHARD
    # relabel one digit in place: the same image bytes under another label
    index = next(i for i, (name, _) in enumerate(entries) if name.endswith(".cls"))
    name, old = entries[index]
    new_label = (int(old.decode().strip()) + 1) % 10
    entries[index] = (name, str(new_label).encode())
    write_tar(shard, entries)
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as any rewrite: a new mtime
    second = run(root, shard, "b", "--target", "label")
    assert second["counts"]["sal"] == {"read": PER_SHARD, "explained": 1, "errors": 0, "skipped": PER_SHARD - 1}
    image_id = name[:-len(".cls")]
    rows = history.saliency_dataset(str(root)).to_table(
        columns=["image_id", "label", "target", "run", "content_sha256", "record_sha256"]).to_pylist()
    assert len(rows) == PER_SHARD  # the current answer: one map per image
    mine = [r for r in rows if r["image_id"] == image_id]
    assert [(r["label"], r["target"], r["run"]) for r in mine] == [(new_label, new_label, second["run_id"])]
    old_rows = history.saliency_dataset(str(root), superseded=True).to_table(
        columns=["image_id", "label", "content_sha256", "record_sha256", "run"]).to_pylist()
    before = [r for r in old_rows if r["image_id"] == image_id and r["run"] == first["run_id"]]
    # the image is the same (the gates' content hash), the record is not
    assert before[0]["content_sha256"] == mine[0]["content_sha256"]
    assert before[0]["record_sha256"] != mine[0]["record_sha256"]


def test_record_hashes_cover_label_mask_and_boxes():
    from saliency_audit.transforms.io.records import RawImage
    base = RawImage("i", "s", b"png", "png", label=3)
    assert base.record_sha256 == RawImage("i", "other", b"png", "png", label=3).record_sha256
    assert len({base.record_sha256, RawImage("i", "s", b"png", "png", label=4).record_sha256,
                RawImage("i", "s", b"png", "png", label=None).record_sha256,
                RawImage("i", "s", b"png", "png", label=3, mask=b"m").record_sha256,
                RawImage("i", "s", b"png", "png", label=3, boxes=[[0, 0, 1, 1]]).record_sha256,
                RawImage("i", "s", b"png", "png", label=3, boxes=[[0, 0, 1, 2]]).record_sha256,
                RawImage("i", "s", b"jpg", "png", label=3).record_sha256}) == 7


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("seeded")
    write_tar(folder / "x.tar", members(PER_SHARD))
    run(folder / "out", folder / "x.tar", "a")
    [row] = history.read(str(folder / "out"))
    return folder / "out", row


@pytest.mark.parametrize("change", [
    {"run_id": "malformed"},  # not a run id: names no run, yet the file is slot a's record
    {"model": "not-a-sha256"},
])
def test_a_row_read_leaves_out_holds_reclaim(seeded, tmp_path, caplog, change):
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    root = tmp_path / "out"
    shutil.copytree(seeded[0], root)
    row = seeded[1]
    (root / "manifest.json").unlink()  # the pointer names no run: only the history keeps run a
    pq.write_table(pa.Table.from_pylist([{**row, **change}], schema=history.SCHEMA), root / "history" / "a.parquet")
    assert history.read(str(root)) == []
    assert history.recorded_runs(str(root)).unreadable == ["a.parquet"]
    assert publication.reclaim(str(root), stale_after_s=0) == []
    assert (root / row["files"][0]).is_file() and (root / row["manifest"]).is_file()
    assert any("a.parquet" in m and "reclaim" in m for m in caplog.messages), caplog.messages
    (root / "history" / "a.parquet").unlink()  # once the file is gone, reclaim takes what no file names
    assert publication.reclaim(str(root), stale_after_s=0) == [row["run_id"]]
