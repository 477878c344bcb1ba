"""The benchmark's bookkeeping (never its timings)."""
import math

import pytest
import torch
from torch import nn

from saliency_audit.pipelines.benchmark import benchmark_methods, floor_images_per_s, main, markdown_table


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
    assert "Conv2d" in gradcam["error"]  # no conv layer: reported, not raised
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| occlusion |" in table and "error:" in table


@pytest.mark.slow
def test_main_prints_a_markdown_table(capsys):
    assert main(["--methods", "sal,elrp", "--batch-size", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| method | images/s |" in out and "| elrp |" in out and "| (model forward) |" in out
