"""Maps that say nothing are counted in the summary and shown to the auditor in the report."""
import tarfile

import numpy as np
import pytest
from conftest import add_member, png_bytes

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.report import write_report


@pytest.mark.slow
def test_empty_maps_are_counted_and_reported(demo_shard, demo_model_args, tmp_path):
    # gradient x input is exactly 0 on a black image, whatever the model: 4 empty grad maps of 8
    with tarfile.open(demo_shard) as src, tarfile.open(tmp_path / "s.tar", "w") as dst:
        for member in src.getmembers()[:8]:
            add_member(dst, member.name, src.extractfile(member).read())
        for i in range(4):
            add_member(dst, f"black-{i}.png", png_bytes(np.zeros((28, 28), np.uint8)))
    audit.run(["--input", str(tmp_path / "s.tar"), *demo_model_args, "--methods", "grad,sal", "--channels", "1",
               "--no-metrics", "--output", str(tmp_path / "out")])
    finished = AuditDir(str(tmp_path / "out"))
    overall = {r["method"]: r for r in finished.rows("summary") if r["target"] is None}
    assert overall["grad"]["empty_maps"] == 4 and overall["grad"]["empty_share"] == 0.5
    assert overall["grad"]["constant_maps"] == 4 and overall["sal"]["empty_maps"] == 0
    per_class = [r for r in finished.rows("summary") if r["method"] == "grad" and r["target"] is not None]
    assert sum(r["empty_maps"] for r in per_class) == 4
    page = (tmp_path / "report.html")
    write_report(str(tmp_path / "out"), str(page))
    text = page.read_text()
    assert "grad: 50% of its maps are constant (50% all zero): they point nowhere." in text
    assert "sal: " not in text.split('class="warnings"')[1].split("</div>")[0]


def test_no_better_than_random_warning_gives_the_reason_for_unsigned_maps():
    from saliency_audit.pipelines.reporting.report import method_warnings
    poor = {"mean_deletion_auc": 0.50, "mean_deletion_auc_random": 0.52, "constant_share": 0.0}
    good = {"mean_deletion_auc": 0.20, "mean_deletion_auc_random": 0.52, "constant_share": 0.0}
    (unsigned,) = method_warnings("sal", poor, signed=False)
    (signed,) = method_warnings("grad", poor, signed=True)
    assert "no better than a random map" in unsigned and "unsigned" in unsigned and "absolute false" in unsigned
    assert "no better than a random map" in signed and "unsigned" not in signed
    assert method_warnings("sal", good, signed=False) == []
    (empty,) = method_warnings("mask", {**good, "constant_share": 0.3, "empty_share": 0.25}, signed=False)
    assert empty == "mask: 30% of its maps are constant (25% all zero): they point nowhere."


def test_an_empty_map_a_method_gives_by_its_nature_is_explained_next_to_the_warning():
    """An empty anchor or lore rule, or a mask with nothing to delete, is an answer: the warning says so
    in the method's own words (Explainer.caveats, recorded in the manifest); other methods get none."""
    from saliency_audit.explainers import explainer_class
    from saliency_audit.pipelines.reporting.report import method_warnings
    empty = {"constant_share": 0.36, "empty_share": 0.36}
    for name in ("anchor", "lore", "mask"):
        words = explainer_class(name).caveats["constant"]
        (line,) = method_warnings(name, empty, signed=False, caveats={"constant": words})
        assert line == f"{name}: 36% of its maps are constant (36% all zero): they point nowhere. {words}"
    assert "answer, not a failure" in explainer_class("anchor").caveats["constant"]
    assert explainer_class("grad").caveats == {}
    (line,) = method_warnings("grad", empty, signed=True, caveats={})
    assert line.endswith("they point nowhere.")
