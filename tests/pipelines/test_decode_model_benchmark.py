"""Smoke test of benchmarks/decode_model_pipeline.py at a minimal size: every mode runs on the same
JPEGs and the figures come back."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_decode_model_pipeline_figures(tmp_path, one_torch_thread):
    import decode_model_pipeline
    out = tmp_path / "figures.json"
    figures = decode_model_pipeline.main(["--images", "8", "--size", "80x60", "--batch-size", "4", "--width", "4",
                                          "--repeats", "1", "--decode-threads", "1", "--json", str(out)])
    assert figures["images_per_s"].keys() == {"decode", "model", "pipeline", "inline", "beam"}
    rates = figures["images_per_s"]
    assert all(rates[mode] > 0 for mode in ("decode", "model", "pipeline", "inline"))
    assert rates["beam"] > 0 or math.isnan(rates["beam"])  # 8 images may take less than Beam's start-up
    assert json.loads(out.read_text())["decode_threads"] == 1 and figures["pipeline_over_slower"] > 0
