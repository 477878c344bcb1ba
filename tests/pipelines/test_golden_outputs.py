"""The job's values do not move when the code does: every method (at its defaults) and every metric on
six bundled digits, held against values recorded before the architecture step (tests/golden/).

    python tests/pipelines/test_golden_outputs.py --write     # record anew, after a change that means to move them

Each (image, method) row is summarised by its prediction, its map's statistics, the map at 16
fixed pixels and every metric column. Compared within float32 rounding (rtol 1e-4), so a kernel
that rounds differently on another CPU passes and a change of behaviour does not.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "demo_outputs.json"
DEMO = REPO / "pipelines" / "demo_data"
IMAGES = 6
PIXELS = [0, 57, 120, 203, 290, 351, 378, 406, 433, 460, 487, 518, 601, 655, 700, 783]  # of 28 x 28
SCALARS = ("target", "predicted", "score", "saliency_min", "saliency_max", "saliency_sum", "saliency_abs_mean")
RTOL, ATOL = 1e-4, 1e-6
pytestmark = pytest.mark.slow


def golden_argv(output: Path) -> list[str]:
    from saliency_audit.explainers import explainer_class, list_methods
    methods = [m for m in list_methods() if not explainer_class(m).needs_attention]  # the digits' CNN has none
    return ["--input", str(DEMO / "mnist-test-sample.tar"), "--limit-per-shard", str(IMAGES),
            "--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn",
            "--weights", str(DEMO / "mnist_cnn.pt"), "--channels", "1", "--device", "cpu",
            "--methods", ",".join(methods), "--aae", str(DEMO / "mnist_aae.pt"), "--road",
            "--torch-threads", "1", "--output", str(output)]


def summarise(output: Path) -> dict[str, dict]:
    """(image_id/method) -> its values, from the published saliency table."""
    manifest = json.loads((output / "manifest.json").read_text())
    table = ds.dataset(output / manifest["outputs"]["saliency"], format="parquet").to_table()
    metrics = [name for name in table.column_names if name.endswith(("_auc", "_auc_random", "_gap")) or name in (
        "gini", "pointing_game", "relevance_mass", "relevance_rank")]
    out = {}
    for row in table.to_pylist():
        saliency = np.asarray(row["saliency"], dtype=np.float64)
        values = {name: row[name] for name in (*SCALARS, *metrics)}
        values["pixels"] = saliency[PIXELS].tolist()
        out[f"{row['image_id']}/{row['method']}"] = values
    return dict(sorted(out.items()))


def close(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def test_every_method_and_metric_gives_the_recorded_values(tmp_path):
    from saliency_audit.pipelines import audit
    assert audit.main(golden_argv(tmp_path / "out")) == 0
    found = summarise(tmp_path / "out")
    recorded = json.loads(GOLDEN.read_text())
    assert sorted(found) == sorted(recorded), "the (image, method) rows differ from the recorded ones"
    moved = [f"{key}.{name}: {found[key].get(name)!r} != {value!r}" for key, values in recorded.items()
             for name, value in values.items() if not close(found[key].get(name), value)]
    assert not moved, f"{len(moved)} value(s) moved, e.g. " + "; ".join(moved[:5])


if __name__ == "__main__":  # --write: record the values anew
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/pipelines/test_golden_outputs.py --write")
    import tempfile

    from saliency_audit.pipelines import audit
    with tempfile.TemporaryDirectory() as folder:
        assert audit.main(golden_argv(Path(folder) / "out")) == 0
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(summarise(Path(folder) / "out"), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
