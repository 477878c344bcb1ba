"""benchmarks/gpu_benchmark.py in its reduced CPU mode (the tests' 32 px models, 16 synthetic JPEGs):
the script keeps running and reports what docs/performance.md quotes. No timing is asserted."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_reduced_mode_reports_every_model_precision_and_method(tmp_path, one_torch_thread):
    import gpu_benchmark
    figures = gpu_benchmark.main(["--reduced", "--methods", "sal,gradcam,rollout", "--json", str(tmp_path / "f.json"),
                                "--markdown", str(tmp_path / "f.md")])
    assert figures["decode"]["images"] == 16 and figures["shards"]["shards"] == 2
    runs = {(r["model"], r["precision"]): r for r in figures["runs"]}
    assert set(runs) == {(m, p) for m in ("resnet50", "vit_b16") for p in ("fp32", "bf16")}
    for (model, _), run in runs.items():
        assert run["pipeline"]["images"] == 16 and run["pipeline"]["images_per_s"] > 0  # every shard image, once
        rows = {r["method"]: r for r in run["rows"]}
        assert list(rows) == ["(model forward)", "(model forward+backward)", "sal", "gradcam", "rollout",
                              gpu_benchmark.DELETION]
        measured = [rows[m] for m in ("sal", "gradcam", gpu_benchmark.DELETION)] + (
            [rows["rollout"]] if model == "vit_b16" else [])
        for row in measured:
            assert row["images_per_s"] > 0
            assert math.isclose(row["ratio"], row["images_per_s"] / row["floor_images_per_s"])
            assert math.isclose(row["hours"]["50000"], 50_000 / row["images_per_s"] / 3600)
        assert rows[gpu_benchmark.DELETION]["forward_passes"] == 34  # 2 x (16 steps + 1)
        if model == "resnet50":
            assert "no attention" in rows["rollout"]["error"]  # refused, reported, the rest measured
    assert json.loads((tmp_path / "f.json").read_text())["runs"][3]["precision"] == "bf16"
    text = (tmp_path / "f.md").read_text()
    assert "### vit_b16, bf16" in text and "| rollout |" in text and "Decode (16 synthetic JPEGs" in text


def test_default_methods_are_the_gradient_cam_and_on_a_vit_transformer_families():
    import gpu_benchmark
    cnn, vit = gpu_benchmark.chosen_methods("default", "resnet50"), gpu_benchmark.chosen_methods("default", "vit_b16")
    assert {"sal", "intg", "xrai", "gradcam", "scorecam", "eigencam"} <= set(cnn)
    assert not {"rollout", "attention_grad", "attnlrp", "occlusion", "lime", "elrp", "random"} & set(cnn)
    assert set(vit) - set(cnn) == {"rollout", "attention_grad", "attnlrp", "legrad"}
    assert "abele" not in gpu_benchmark.chosen_methods("all", "vit_b16")  # needs an autoencoder


def test_synthetic_jpegs_are_distinct_224_colour_images():
    import io

    import gpu_benchmark
    import numpy as np
    from PIL import Image
    images = [np.asarray(Image.open(io.BytesIO(gpu_benchmark.synthetic_jpeg(i, 224)))) for i in range(4)]
    assert all(i.shape == (224, 224, 3) for i in images) and len({i.tobytes() for i in images}) == 4
    assert min(float(i.std()) for i in images) > 5
