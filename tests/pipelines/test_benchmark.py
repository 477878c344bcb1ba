"""The benchmark's bookkeeping (never its timings)."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from saliency_audit.pipelines.benchmark import (
    PeakMemory,
    Task,
    benchmark_methods,
    floor_images_per_s,
    main,
    markdown_table,
)


def test_floor_counts_backward_pairs_and_extra_forwards():
    assert floor_images_per_s({"forward": 1, "backward": 1}, 100.0, 40.0) == 40.0
    assert floor_images_per_s({"forward": 50, "backward": 50}, 100.0, 40.0) == 40.0 / 50
    assert floor_images_per_s({"forward": 170, "backward": 0}, 100.0, 40.0) == 100.0 / 170
    assert math.isclose(floor_images_per_s({"forward": 2, "backward": 1}, 100.0, 40.0), 1 / (1 / 40 + 1 / 100))


@pytest.mark.slow
def test_benchmark_rows_for_the_model_and_each_method():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    rows = benchmark_methods(model, torch.rand(3, 1, 8, 8), ["sal", "occlusion", "gradcam"], batch_size=4,
                             repeats=1, method_options={"occlusion": {"window": 4, "stride": 4}})
    assert [r["method"] for r in rows] == ["(model forward)", "(model forward+backward)", "sal", "occlusion", "gradcam"]
    sal, occlusion, gradcam = rows[2:]
    assert sal["forward_passes"] == 1 and sal["backward_passes"] == 1
    assert occlusion["forward_passes"] == 5 and occlusion["backward_passes"] == 0  # 2 x 2 windows + 1
    for row in (sal, occlusion):
        assert row["images_per_s"] > 0 and row["floor_images_per_s"] > 0
        assert math.isclose(row["ratio"], row["images_per_s"] / row["floor_images_per_s"])
    assert "gradcam" in gradcam["error"] and "images_per_s" not in gradcam  # no conv layer: reported, not raised
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| occlusion |" in table and "error:" in table


@pytest.mark.slow
def test_main_prints_a_markdown_table(capsys):
    assert main(["--methods", "sal,elrp", "--batch-size", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| method | images/s |" in out and "| elrp |" in out and "| (model forward) |" in out


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()


FAST = {"repeats": 1, "warmup": 0, "min_seconds": 0.0}


def test_a_method_over_the_time_limit_runs_reduced_and_is_extrapolated():
    rows = benchmark_methods(_linear(), torch.rand(2, 1, 8, 8), ["intg", "occlusion"], batch_size=2,
                             max_seconds_per_image=1e-9, method_options={"occlusion": {"window": 4, "stride": 4}},
                             **FAST)
    intg, occlusion = rows[2:]
    assert intg["reduced"] == {"n_steps": [2, 50]} and intg["options"]["n_steps"] == 2  # cut to the minimum
    assert (intg["forward_passes"], intg["backward_passes"]) == (2, 2)  # the passes of the run that was timed
    # at the defaults: the same ratio to a floor 25 times lower (50 steps against 2)
    assert math.isclose(intg["images_per_s_at_defaults"], intg["ratio"] * intg["floor_images_per_s"] * 2 / 50)
    assert intg["extrapolated"] and intg["images_per_s"] > 0
    # occlusion has no count to cut: not run, its floor stands for it
    assert "images_per_s" not in occlusion and occlusion["skipped"].endswith("s per image at its floor")
    assert occlusion["images_per_s_at_defaults"] == occlusion["floor_images_per_s"]
    assert occlusion["forward_passes"] == 50 and occlusion["backward_passes"] == 0  # passes() before a batch: 28 px
    table = markdown_table(rows, (3600,))
    assert "| intg (n_steps 2 of 50) |" in table and "not run:" in table
    hours = float(table.split("| intg (n_steps 2 of 50) |")[1].split("\n")[0].split("|")[-2].strip().rstrip("*"))
    assert math.isclose(hours, 1 / intg["images_per_s_at_defaults"], rel_tol=0.01)  # 3,600 images


def test_batch_follows_the_target_seconds_and_tasks_are_timed():
    calls = []
    task = Task(lambda x, t, s: calls.append(len(x)), {"forward": 2, "backward": 0})
    quick = benchmark_methods(_linear(), torch.rand(3, 1, 8, 8), ["sal"], batch_size=8, target_seconds=1e3,
                              tasks={"metric": task}, **FAST)
    # one probe image, then the batch: once watched for memory (no warm-up asked), once timed
    assert [r["batch_size"] for r in quick[2:]] == [8, 8] and calls == [1, 8, 8]
    assert quick[3]["method"] == "metric" and quick[3]["forward_passes"] == 2
    slow = benchmark_methods(_linear(), torch.rand(3, 1, 8, 8), ["sal"], batch_size=8, target_seconds=0.0, **FAST)
    assert slow[2]["batch_size"] == 1
    late = benchmark_methods(_linear(), torch.rand(3, 1, 8, 8), ["sal"], batch_size=2, deadline=0.0, **FAST)
    assert late[2]["error"] == "not run: the time budget ran out"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_memory_counts_what_was_allocated_inside():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(40 << 20, dtype=torch.uint8)  # 40 MiB, touched
        del block
    assert peak.bytes is not None and peak.bytes >= 36 << 20  # (pages the heap kept from before count out)
    with PeakMemory(torch.device("cpu")) as idle:
        pass
    assert idle.bytes < 8 << 20
    kept = torch.ones(40 << 20, dtype=torch.uint8)
    del kept  # freed memory the heap might keep is not counted again, nor does it hide a new block:
    with PeakMemory(torch.device("cpu")) as again:
        block = torch.ones(40 << 20, dtype=torch.uint8)
        del block
    assert 36 << 20 <= again.bytes < 48 << 20
