"""The report streams the saliency rows: its memory does not grow with the audit, and its streamed
picks and counts are those of a sort of every row (benchmarks/report_check_memory.py measures the
command's peak RSS up to a million rows)."""
from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report_check_memory as bench  # noqa: E402

from saliency_audit.pipelines.reporting import aggregate, audit_dir  # noqa: E402
from saliency_audit.pipelines.reporting.audit_dir import AuditDir  # noqa: E402
from saliency_audit.pipelines.reporting.report import Report  # noqa: E402


def python_peak_mb(directory: Path) -> float:
    tracemalloc.start()
    try:
        Report(AuditDir(str(directory))).html()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_report_does_not_hold_the_rows(tmp_path, monkeypatch):
    """Ten times the rows, in batches of 500 (the default, 8,192, would hold the smaller in one):
    the Python heap's peak stays put (9.2 and 9.6 MB when written). Holding the rows as dicts, as
    the report did, took 11.7 and 33.9 MB."""
    monkeypatch.setattr(audit_dir, "BATCH_ROWS", 500)
    small = python_peak_mb(bench.build_audit(tmp_path / "small", 2_000))
    large = python_peak_mb(bench.build_audit(tmp_path / "large", 20_000))
    assert large < 1.3 * small + 2, (small, large)


def with_awkward_rows(directory: Path) -> Path:
    """The audit's saliency rows with what a merge of batches can get wrong: gains tied at both
    ends (broken by image id), NaN and null metrics, unlabelled rows and rows without a target."""
    path = next((directory / "saliency").rglob("*.parquet"))
    table = pq.read_table(path)
    index = np.arange(table.num_rows)

    def replaced(name, values, mask=None):
        return table.set_column(table.schema.get_field_index(name), name,
                                pa.array(values, table.schema.field(name).type, mask=mask))

    best, worst = index % 7 == 0, index % 7 == 1  # gains 0.875 and -0.5: beyond every other row's
    deletion = table.column("deletion_auc").to_numpy().copy()
    random = table.column("deletion_auc_random").to_numpy().copy()
    deletion[best], random[best], deletion[worst], random[worst] = 0.0, 0.875, 0.75, 0.25
    deletion[index % 13 == 0] = np.nan
    table = replaced("deletion_auc", deletion, mask=index % 29 == 0)
    table = replaced("deletion_auc_random", random)
    table = replaced("label", table.column("label").to_numpy(), mask=index % 11 == 0)
    table = replaced("target", table.column("target").to_numpy(), mask=index % 17 == 0)
    pq.write_table(table, path)
    return directory


def picks_of_every_row(rows: list[dict], methods: list[str], per_class: int, extremes: int, wrong: int) -> dict:
    """What the report chose when it held every row (a NaN gain, which sorts nowhere, left out)."""
    classes = sorted({r["target"] for r in rows if r["target"] is not None})
    selection = {f"class:{c}": sorted({r["image_id"] for r in rows if r["target"] == c})[:per_class] for c in classes}
    misclassified = sorted({r["image_id"] for r in rows if r["label"] is not None and r["label"] != r["predicted"]})
    selection["misclassified"] = misclassified[:wrong]
    for method in methods:
        scored = sorted((r["deletion_auc_random"] - r["deletion_auc"], r["image_id"]) for r in rows
                        if r["method"] == method and r["deletion_auc"] is not None
                        and r["deletion_auc_random"] is not None
                        and math.isfinite(r["deletion_auc_random"] - r["deletion_auc"]))
        selection[f"worst:{method}"] = [i for _, i in scored[:extremes]]
        selection[f"best:{method}"] = [i for _, i in scored[::-1][:extremes]]
    return {"classes": classes, "selection": selection, "images": len({r["image_id"] for r in rows}),
            "misclassified": len(misclassified)}


def test_streamed_picks_and_counts_match_a_sort_of_every_row(tmp_path, monkeypatch):
    """Batches of 97 rows and the distinct count in 5 passes: every merge and every pass is used."""
    directory = with_awkward_rows(bench.build_audit(tmp_path / "audit", 2_000))
    monkeypatch.setattr(audit_dir, "BATCH_ROWS", 97)
    monkeypatch.setattr(aggregate, "IDS_PER_PASS", 400)
    audit = AuditDir(str(directory))
    picks = aggregate.pick_images(audit, audit.methods, per_class=5, extremes=6, misclassified_shown=9)
    images, misclassified = aggregate.count_images(audit)
    rows = pq.read_table(directory / "saliency").to_pylist()
    assert {"classes": picks.classes, "selection": picks.selection, "images": images,
            "misclassified": misclassified} == picks_of_every_row(rows, audit.methods, 5, 6, 9)
    best, worst = picks.selection["best:sal"], picks.selection["worst:sal"]
    assert [r["gain"] for r in picks.extremes[("best", "sal")]] == [0.875] * 6 and best == sorted(best, reverse=True)
    assert [r["gain"] for r in picks.extremes[("worst", "sal")]] == [-0.5] * 6 and worst == sorted(worst)


def test_streamed_histograms_and_errors_match_every_row(tmp_path, monkeypatch):
    directory = with_awkward_rows(bench.build_audit(tmp_path / "audit", 2_000))
    monkeypatch.setattr(audit_dir, "BATCH_ROWS", 97)
    audit = AuditDir(str(directory))
    rows = pq.read_table(directory / "saliency").to_pylist()
    deletion = next(d for d in aggregate.distributions(audit, ["grad"]) if d.metric == "deletion_auc")
    values = np.array([r["deletion_auc"] for r in rows if r["method"] == "grad" and r["deletion_auc"] is not None])
    values = values[np.isfinite(values)]
    every = [v for r in rows for v in (r["deletion_auc"], r["deletion_auc_random"])
             if v is not None and math.isfinite(v)]
    bins, random_bins = deletion.panels["grad"]
    assert (bins.low, bins.high) == (min(every), max(every)) and random_bins.n == len(rows) // len(audit.methods)
    assert bins.counts.tolist() == np.histogram(values, np.linspace(min(every), max(every), 21))[0].tolist()
    assert bins.n == len(values) and bins.mean == pytest.approx(values.mean(), rel=1e-12)
    errors = aggregate.errors(audit, shown=100)
    assert errors.total == 1 and errors.counts == {("decode", "all methods"): 1}


def test_scan_reads_a_column_a_file_lacks_as_null_and_skips_row_groups_without_the_images(tmp_path, monkeypatch):
    """Two files of one output, the older without ``gini``; ``image_ids`` decodes only the row
    groups that hold one of them."""
    old = pa.table({"image_id": ["a", "b", "c", "d"], "method": ["sal"] * 4})
    new = pa.table({"image_id": ["e", "f"], "method": ["sal"] * 2, "gini": pa.array([0.5, 0.25], pa.float32())})
    (tmp_path / "saliency").mkdir()
    pq.write_table(new, tmp_path / "saliency" / "new.parquet")
    pq.write_table(old, tmp_path / "saliency" / "old.parquet", row_group_size=2)
    (tmp_path / "manifest.json").write_text('{"files": {"saliency": ["saliency/new.parquet", "saliency/old.parquet"]}}')
    audit = AuditDir(str(tmp_path))
    rows = [r for b in audit.scan("saliency", ["image_id", "gini", "absent"], batch_rows=1) for r in b.to_pylist()]
    assert rows == [{"image_id": i, "gini": g} for i, g in zip("efabcd", [0.5, 0.25, None, None, None, None])]
    decoded = []
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, row_groups=None, **k: decoded.append(list(row_groups)) or iter(()))
    list(audit.scan("saliency", ["gini"], image_ids=["c"]))
    assert decoded == [[], [1]]  # new.parquet: none of its groups; old.parquet: its second


@pytest.mark.slow
def test_the_benchmark_runs_in_its_reduced_mode(tmp_path, capsys):
    """The script keeps working (sizes, not timings: CI machines vary)."""
    figures = bench.main(["--rows", "60,2000", "--commands", "report", "--scratch", str(tmp_path), "--keep"])
    assert figures["rows"] == [60, 2000] and len(figures["peak_rss_mb"]["report"]) == 2
    assert all(50 < peak < 8000 for peak in figures["peak_rss_mb"]["report"])
    page = (tmp_path / "report-2000" / "report.html").read_text()
    assert ">Galleries by class</h2>" in page and "500 images explained by 4 method(s)" in page
    assert "| 2,000 |" in capsys.readouterr().out
