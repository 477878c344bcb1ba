"""ROAD and the localisation metrics in the pipeline: rows, summary and report, on digits whose
shard carries ground truth (a KEY.mask.png for some, KEY.json boxes for others, none for the
rest), beside the control maps."""
import json
import tarfile

import numpy as np
import pytest
from conftest import add_member, png_bytes, read_output
from PIL import Image

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting.report import write_report

pytestmark = pytest.mark.slow  # end-to-end audit with ground truth

METHODS = ["grad", "lrp", "random", "sobel"]
N = 16


@pytest.fixture(scope="module")
def audited(tmp_path_factory, demo_shard, demo_model_args):
    """Masks of the digit's strokes for the first 6, boxes around them for the next 5, nothing for
    the last 5."""
    root = tmp_path_factory.mktemp("truth")
    with tarfile.open(demo_shard) as src, tarfile.open(root / "digits.tar", "w") as dst:
        members = [m for m in src.getmembers() if m.name.endswith(".png")][:N]
        for n, member in enumerate(members):
            data = src.extractfile(member).read()
            key = member.name[:-len(".png")]
            add_member(dst, member.name, data)
            strokes = np.asarray(Image.open(src.extractfile(member))) > 127
            if n < 6:
                add_member(dst, f"{key}.mask.png", png_bytes((strokes * 255).astype(np.uint8)))
            elif n < 11:
                rows, cols = np.nonzero(strokes)
                box = [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]
                add_member(dst, f"{key}.json", json.dumps({"boxes": [box]}).encode())
    output = root / "out"
    manifest = audit.run(["--input", str(root / "digits.tar"), *demo_model_args, "--methods", ",".join(METHODS),
                          "--channels", "1", "--batch-size", "8", "--road", "--output", str(output)])
    return output, manifest


def test_every_image_is_explained_and_only_those_with_ground_truth_are_scored(audited):
    output, manifest = audited
    assert manifest["counts"] == {m: {"read": N, "explained": N, "errors": 0} for m in METHODS}
    rows = read_output(output / "saliency")
    scored = {r["image_id"] for r in rows if r["pointing_game"] is not None}
    assert len(scored) == 11
    for r in rows:
        values = [r["pointing_game"], r["relevance_mass"], r["relevance_rank"]]
        if r["image_id"] in scored:
            assert all(0 <= v <= 1 for v in values), r
        else:
            assert values == [None, None, None]
        assert 0 <= r["road_morf_auc"] <= 1 and 0 <= r["road_lerf_auc"] <= 1
        assert r["road_gap"] == pytest.approx(r["road_lerf_auc"] - r["road_morf_auc"], abs=1e-6)


def test_explanations_beat_the_random_control(audited):
    """On the strokes, gradient x input (zero off the strokes) puts far more relevance inside
    the ground truth than noise, and removing its top pixels first hurts the model more."""
    output, _ = audited
    overall = {s["method"]: s for s in read_output(output / "summary") if s["target"] is None}
    for method in ("grad", "lrp"):
        assert overall[method]["mean_relevance_mass"] > overall["random"]["mean_relevance_mass"] + 0.2, method
        assert overall[method]["mean_relevance_rank"] > overall["random"]["mean_relevance_rank"] + 0.1, method
        assert overall[method]["mean_road_gap"] > overall["random"]["mean_road_gap"] + 0.05, method
    # noise scores about the mask's share of the image
    assert abs(overall["random"]["mean_road_gap"]) < 0.1


def test_the_report_shows_road_localisation_and_the_controls(audited, tmp_path):
    output, _ = audited
    html = open(write_report(str(output), str(tmp_path / "report.html"))).read()
    for text in ("ROAD", "Localisation (images with ground truth)", "pointing game", "relevance mass",
                 "road gap", "unsigned, control"):
        assert text in html, text


def test_road_convention_in_the_manifest(audited):
    _, manifest = audited
    assert "noisy linear imputation" in manifest["conventions"]["road"]
    assert "ground_truth.md" in manifest["conventions"]["localisation"]
