"""Stored map form (--map-dtype) and image ids repeated across shards."""
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from conftest import add_member

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting.audit_dir import AuditDir, saliency_map

pytestmark = pytest.mark.slow  # end-to-end audits


def _shard(path, demo_shard, members):
    with tarfile.open(demo_shard) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers()[:members]:
            add_member(dst, member.name, src.extractfile(member).read())


def _run(shards, output, demo_model_args, *extra):
    return audit.run(["--input", str(shards), *demo_model_args, "--methods", "sal,grad", "--output", str(output),
                      "--channels", "1", "--no-metrics", *extra])


def test_float16_maps_halve_the_bytes_and_keep_three_digits(demo_shard, demo_model_args, tmp_path):
    _shard(tmp_path / "a.tar", demo_shard, 32)
    exact = _run(tmp_path / "a.tar", tmp_path / "f32", demo_model_args)
    half = _run(tmp_path / "a.tar", tmp_path / "f16", demo_model_args, "--map-dtype", "float16")
    a, b = AuditDir(str(tmp_path / "f32")), AuditDir(str(tmp_path / "f16"))
    assert b.columns("saliency").field("saliency").type == pa.list_(pa.float16())
    assert a.columns("saliency").field("saliency").type == pa.list_(pa.float32())
    rows_a = {(r["image_id"], r["method"]): r for r in a.rows("saliency")}
    rows_b = {(r["image_id"], r["method"]): r for r in b.rows("saliency")}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == 32
    for key, row in rows_a.items():
        exact_map, stored = saliency_map(row), saliency_map(rows_b[key])
        scale = np.abs(exact_map).max() + 1e-12
        assert np.abs(exact_map - stored).max() <= 1e-3 * scale
        assert rows_b[key]["saliency_max"] == row["saliency_max"]  # statistics come from the float32 map
    assert half["map_bytes_per_row"] < 0.75 * exact["map_bytes_per_row"]
    assert "float16" in half["conventions"]["map_storage"]


def test_an_id_in_two_shards_is_explained_once_from_the_first(demo_shard, demo_model_args, tmp_path):
    (tmp_path / "in").mkdir()
    _shard(tmp_path / "in" / "b.tar", demo_shard, 20)   # 10 digits
    _shard(tmp_path / "in" / "a.tar", demo_shard, 12)   # the first 6 of them again, in the earlier shard
    manifest = _run(tmp_path / "in" / "*.tar", tmp_path / "out", demo_model_args)
    assert manifest["counts"]["sal"] == {"read": 16, "explained": 10, "errors": 6}
    finished = AuditDir(str(tmp_path / "out"))
    rows = finished.rows("saliency", ["image_id", "method", "source"])
    assert len({(r["image_id"], r["method"]) for r in rows}) == len(rows) == 20
    first_six = {r["image_id"] for r in rows if r["source"].endswith("a.tar")}
    assert len(first_six) == 6
    errors = finished.rows("errors")
    assert sorted(e["image_id"] for e in errors) == sorted(first_six)
    assert all(e["stage"] == "read" and e["source"].endswith("b.tar") and "a.tar" in e["reason"] for e in errors)
