"""diff streams: its peak memory does not grow with the number of images compared."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
SIDE = 112
BUDGET = 2 << 20  # maps per audit held at once in the measured runs: 41 images of 112 x 112


def synthetic_audit(directory: Path, n_images: int, seed: int, side: int = SIDE, methods=("sal",)) -> Path:
    """An audit's layout (manifest.json, saliency/*.parquet as the sink writes them: one file, one
    row group) with ``n_images`` random side x side maps per method. Values are small integers, so
    the files stay small on disk while the maps are full size in memory."""
    rng = np.random.default_rng(seed)
    (directory / "saliency").mkdir(parents=True)
    pixels = side * side
    tables = []
    for method in methods:
        values = rng.integers(0, 16, size=n_images * pixels).astype(np.float32)
        offsets = pa.array(np.arange(n_images + 1, dtype=np.int32) * pixels)
        tables.append(pa.table({
            "image_id": [f"img-{i:06d}" for i in range(n_images)], "source": ["gone/shard.tar"] * n_images,
            "label": pa.array(rng.integers(0, 10, n_images)), "method": [method] * n_images,
            "target": pa.array(rng.integers(0, 10, n_images)), "predicted": pa.array(rng.integers(0, 10, n_images)),
            "score": pa.array(rng.random(n_images, dtype=np.float32)),
            "height": pa.array(np.full(n_images, side, np.int32)), "width": pa.array(np.full(n_images, side, np.int32)),
            "saliency": pa.ListArray.from_arrays(offsets, pa.array(values))}))
    pq.write_table(pa.concat_tables(tables), directory / "saliency" / "part-00000-of-00001.parquet",
                   compression="zstd")
    manifest = {"run_id": f"synthetic-{seed}", "methods": {m: {"signed": True} for m in methods},
                "options": {"methods": ",".join(methods)}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


PEAK = """
import resource, sys
from saliency_audit.pipelines.reporting import diff
diff.MAP_BUDGET = int(sys.argv[4])
result = diff.diff_audits(sys.argv[1], sys.argv[2], sys.argv[3])
print(result["pairs"], next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak_rss_mb(tmp_path: Path, n_images: int) -> float:
    a = synthetic_audit(tmp_path / f"a{n_images}", n_images, seed=1)
    b = synthetic_audit(tmp_path / f"b{n_images}", n_images, seed=2)
    proc = subprocess.run([sys.executable, "-c", PEAK, str(a), str(b), str(tmp_path / f"diff{n_images}"), str(BUDGET)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pairs, peak_kb = proc.stdout.split()[-2:]
    assert int(pairs) == n_images
    return int(peak_kb) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_audit(tmp_path):
    """One chunk against four (the budget is lowered so the test stays quick; the default is 64 MB):
    160 maps of 112 x 112 a side are 8 MB as float32, 130 MB as the Python floats diff used to hold,
    and the metrics' work arrays take about 40 times the maps' bytes."""
    small, large = peak_rss_mb(tmp_path, 40), peak_rss_mb(tmp_path, 160)
    assert large < 1.25 * small, (small, large)


def test_chunked_rows_match_a_direct_comparison(tmp_path):
    """Rows written chunk by chunk are those of one comparison of all maps at once."""
    import torch

    from saliency_audit.explainers.metrics import spearman_rank_correlation, ssim
    from saliency_audit.pipelines.reporting import diff
    a = synthetic_audit(tmp_path / "a", 30, seed=3, side=20, methods=("sal", "grad"))
    b = synthetic_audit(tmp_path / "b", 30, seed=4, side=20, methods=("sal", "grad"))
    original = diff.MAP_BUDGET
    diff.MAP_BUDGET = 7 * 20 * 20 * 4  # chunks of 7 images: several chunks and a partial one per method
    try:
        result = diff.diff_audits(str(a), str(b), str(tmp_path / "out"), top_k=40)
    finally:
        diff.MAP_BUDGET = original
    rows = pq.read_table(tmp_path / "out" / "diff").to_pylist()
    assert result["pairs"] == len(rows) == 60
    assert [(r["method"], r["image_id"]) for r in rows] == sorted((r["method"], r["image_id"]) for r in rows)

    def maps(directory, method):
        table = pq.read_table(directory / "saliency", filters=[("method", "=", method)]).sort_by("image_id")
        return table, torch.tensor(np.stack(table.column("saliency").to_numpy(zero_copy_only=False))).view(-1, 20, 20)

    for method in ("grad", "sal"):
        (ta, ma), (tb, mb) = maps(a, method), maps(b, method)
        mine = [r for r in rows if r["method"] == method]
        np.testing.assert_allclose([r["rank_correlation"] for r in mine], spearman_rank_correlation(ma, mb), rtol=1e-6)
        np.testing.assert_allclose([r["ssim"] for r in mine], ssim(ma, mb), rtol=1e-6)
        np.testing.assert_array_equal([r["top_k_overlap"] for r in mine], diff.top_k_overlap(ma, mb, 40))
        score_change = np.float64(tb.column("score").to_numpy()) - np.float64(ta.column("score").to_numpy())
        np.testing.assert_array_equal([r["score_change"] for r in mine], score_change.astype(np.float32))
        assert [r["label"] for r in mine] == ta.column("label").to_pylist()
