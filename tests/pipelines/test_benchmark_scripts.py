"""Smoke tests of benchmarks/pipeline_vs_loop.py and benchmarks/load.py at minimal sizes: the
scripts run, the bare loop writes the same maps as the pipeline, and the load test's counts
reconcile and its memory figures come back."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT.parent / "shared/data/mnist"
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="needs the MNIST files in ../shared/data/mnist")


@pytest.mark.slow
def test_pipeline_vs_loop_same_maps_and_figures(tmp_path):
    import pipeline_vs_loop
    out = tmp_path / "figures.json"
    figures = pipeline_vs_loop.main(["--images", "24", "--shards", "2", "--batch-size", "8", "--repeats", "1",
                                     "--modes", "loop,inprocess", "--check", "--metrics",
                                     "--scratch", str(tmp_path), "--json", str(out)])
    assert figures["checked_rows"] == 48  # 24 digits x sal,grad: equal maps, scores, seeds and metrics
    assert json.loads(out.read_text())["modes"].keys() == {"loop", "inprocess"}
    assert figures["counts"]["loop"] == {"read": 24, "rows": 48, "errors": 0}
    assert all(c == {"read": 24, "explained": 24, "errors": 0} for c in figures["counts"]["inprocess"].values())
    assert figures["modes"]["loop"]["ratio_to_loop"] == 1.0
    assert figures["modes"]["inprocess"]["images_per_s"] > 0


def test_pipeline_vs_loop_rejects_an_unknown_mode():
    import pipeline_vs_loop
    with pytest.raises(SystemExit):
        pipeline_vs_loop.parse_args(["--modes", "loop,spark"])


@pytest.mark.slow
def test_load_counts_reconcile_and_memory_is_reported(tmp_path):
    import load
    # --no-loop: the bare loop is checked above; one subprocess less keeps this test short
    figures = load.main(["--parts", "digits,rgb", "--sizes", "16", "--shard-size", "8", "--intg-steps", "2",
                         "--batch-size", "8", "--no-loop", "--rgb-images", "2", "--rgb-shard-size", "2",
                         "--rgb-methods", "gradcam", "--rgb-no-metrics", "--scratch", str(tmp_path)])
    (digits,) = figures["digits"]
    assert digits["reconciled"] and digits["counts"]["intg"] == {"read": 16, "explained": 16, "errors": 0}
    assert 50 < digits["peak_rss_mb"] < 8000 and "loop_s" not in digits
    (rgb,) = figures["rgb"]
    assert rgb["method"] == "gradcam" and rgb["images"] == 2 and rgb["reconciled"] and rgb["peak_rss_mb"] > 50


def test_rgb_images_are_distinct_224_photographs():
    import load
    images = list(load.rgb_images(30))
    assert all(i.shape == (224, 224, 3) and i.dtype == np.uint8 for i in images)
    assert len({i.tobytes() for i in images}) == 30
    assert min(float(i.std()) for i in images) > 1  # crops of photographs, not blank frames


def test_load_rejects_sizes_beyond_mnist():
    import load
    with pytest.raises(SystemExit):
        load.parse_args(["--sizes", "80000"])
