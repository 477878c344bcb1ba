"""Shard readers over local files and memory://, with good and broken records."""
import io
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import add_member, png_bytes

from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.io.records import ErrorRecord, RawImage
from saliency_audit.transforms.io.storage import expand_glob

rng = np.random.default_rng(0)
GREY = rng.integers(0, 256, (12, 10), dtype=np.uint8)
RGB = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            add_member(tar, name, data)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_tar_groups_members_by_key_with_labels(tmp_path):
    write_tar(tmp_path / "a.tar", [("d/x1.png", png_bytes(GREY)), ("d/x1.cls", b"7\n"),
                                   ("d/x2.npy", npy_bytes(RGB)), ("d/x3.jpg", b"jpegdata"), ("d/x3.cls", b"2")])
    records = list(read_shard(str(tmp_path / "a.tar")))
    assert [(r.image_id, r.fmt, r.label) for r in records] == [("d/x1", "png", 7), ("d/x2", "npy", None),
                                                                ("d/x3", "jpg", 2)]
    assert records[0].data == png_bytes(GREY) and records[0].source == str(tmp_path / "a.tar")


def test_tar_reports_samples_without_image_and_bad_labels(tmp_path):
    write_tar(tmp_path / "b.tar", [("k1.cls", b"3"), ("k2.png", png_bytes(GREY)), ("k2.cls", b"seven")])
    records = list(read_shard(str(tmp_path / "b.tar")))
    assert all(isinstance(r, ErrorRecord) and r.stage == "read" for r in records)
    assert "no image member" in records[0].reason and "not an integer" in records[1].reason


def test_truncated_tar_keeps_earlier_records_and_reports_the_cut_member(tmp_path):
    big = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    write_tar(tmp_path / "c.tar", [("a.png", png_bytes(GREY)), ("a.cls", b"1"), ("b.png", png_bytes(big))])
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[:2048 + 512 + 100])  # cut inside b.png's data
    records = list(read_shard(str(tmp_path / "c.tar")))
    assert isinstance(records[0], RawImage) and records[0].image_id == "a"
    assert isinstance(records[-1], ErrorRecord) and records[-1].image_id == "b"
    assert "truncated" in records[-1].reason or "unreadable" in records[-1].reason


@pytest.mark.parametrize("compress", [False, True])
def test_tar_cut_inside_a_header_is_reported_not_taken_for_its_end(tmp_path, compress):
    import gzip
    write_tar(tmp_path / "h.tar", [("a.png", png_bytes(GREY)), ("a.cls", b"1"), ("b.png", png_bytes(GREY))])
    data = (tmp_path / "h.tar").read_bytes()[:2048 + 100]  # inside b.png's header block
    name = "h.tar.gz" if compress else "h.tar"
    (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    records = list(read_shard(str(tmp_path / name)))
    assert [type(r) for r in records] == [RawImage, ErrorRecord]
    assert "ends inside a member header at byte 2048" in records[1].reason


def test_complete_tar_has_no_errors(tmp_path):
    write_tar(tmp_path / "ok.tar", [("a.png", png_bytes(GREY)), ("b.png", png_bytes(GREY))])
    assert [r.image_id for r in read_shard(str(tmp_path / "ok.tar"))] == ["a", "b"]


def test_garbage_tar_is_one_error(tmp_path):
    (tmp_path / "g.tar").write_bytes(b"this is not a tar archive at all" * 40)
    records = list(read_shard(str(tmp_path / "g.tar")))
    assert len(records) == 1 and isinstance(records[0], ErrorRecord) and "tar" in records[0].reason


def test_parquet_shard_with_labels_and_format_sniffing(tmp_path):
    table = pa.table({"image_id": ["p1", "p2", "p3"], "image": [png_bytes(GREY), npy_bytes(RGB), None],
                      "label": [1, None, 3]})
    pq.write_table(table, tmp_path / "s.parquet")
    records = list(read_shard(str(tmp_path / "s.parquet")))
    assert [(r.image_id, r.fmt, r.label) for r in records[:2]] == [("p1", "png", 1), ("p2", "npy", None)]
    assert isinstance(records[2], ErrorRecord) and "null" in records[2].reason


def test_parquet_shard_missing_columns_is_an_error(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "bad.parquet")
    (record,) = read_shard(str(tmp_path / "bad.parquet"))
    assert isinstance(record, ErrorRecord) and "image, image_id" in record.reason


def test_plain_image_files_and_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe("/imgs/one.png", png_bytes(GREY))
    fs.pipe("/imgs/two.npy", npy_bytes(RGB))
    fs.pipe("/imgs/notes.txt", b"ignored by the glob")
    urls = expand_glob("memory://imgs/*.[pn][np][gy]")
    assert urls == ["memory:///imgs/one.png", "memory:///imgs/two.npy"]
    records = [r for u in urls for r in read_shard(u)]
    assert [(r.image_id, r.fmt) for r in records] == [("one.png", "png"), ("two.npy", "npy")]


def test_empty_glob_and_unsupported_shards_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files match"):
        expand_glob(str(tmp_path / "*.tar"))
    (tmp_path / "x.csv").write_text("a,b")
    (record,) = read_shard(str(tmp_path / "x.csv"))
    assert "unsupported shard type" in record.reason


def test_directory_input_lists_its_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(png_bytes(GREY))
    assert expand_glob(str(tmp_path)) == [f"file://{tmp_path}/sub/a.png"] or \
        expand_glob(str(tmp_path)) == [str(tmp_path / "sub" / "a.png")]
