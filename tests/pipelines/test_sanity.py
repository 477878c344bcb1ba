"""The sanity check of `run` flags a method that ignores the model and passes `sal`;
ABELE's metrics and the summary's quantiles come out of the same shared audit."""
import math

import pytest
from audit_fixtures import METHODS, N_IMAGES, shared_audit
from conftest import read_output

from saliency_audit.explainers.metrics import metric_columns
from saliency_audit.transforms.io.rows import METRIC_COLUMNS

ABELE_COLUMNS, ROAD_COLUMNS, LOCALISATION_COLUMNS = (metric_columns(name) for name in ("abele", "road", "localisation"))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    shared = shared_audit(tmp_path_factory)
    return shared.output, shared.manifest


def test_sanity_check_flags_the_edge_detector_and_passes_sal(audited):
    output, manifest = audited
    verdicts = manifest["sanity"]["methods"]
    assert verdicts["edge"]["flagged"] and verdicts["edge"]["rank_correlation"] > 0.99
    assert verdicts["edge"]["ssim"] > 0.99
    assert verdicts["sal"]["flagged"] is False and verdicts["sal"]["rank_correlation"] < 0.5
    assert manifest["sanity"]["layers_top_first"] == ["fc2", "fc1", "conv2", "conv1"]
    summary = read_output(output / "summary")
    for row in summary:
        assert row["sanity_flagged"] == verdicts[row["method"]]["flagged"]
        assert row["random_logit_flagged"] == verdicts[row["method"]]["random_logit_flagged"]


def test_random_logit_test_flags_the_class_blind_edge_detector(audited):
    """The edge detector gives the same map whatever class it is asked about; sal's maps for
    another class differ."""
    output, manifest = audited
    verdicts = manifest["sanity"]["methods"]
    assert verdicts["edge"]["random_logit_flagged"] and verdicts["edge"]["random_logit_rank_correlation"] > 0.99
    assert verdicts["sal"]["random_logit_rank_correlation"] < verdicts["edge"]["random_logit_rank_correlation"]
    rows = [r for r in read_output(output / "sanity") if r["check"] == "random_logit"]
    assert len(rows) == len(METHODS) * len(manifest["sanity"]["images"])
    assert all(r["step"] == 0 and r["layer"] is None for r in rows)


def test_sanity_rows_per_method_layer_and_image(audited):
    output, manifest = audited
    rows = read_output(output / "sanity")
    images = manifest["sanity"]["images"]
    assert len(images) == 8 and images == sorted(images)
    assert len(rows) == len(METHODS) * (4 + 1) * len(images)  # four layers and the random logit
    rows = [r for r in rows if r["check"] == "cascading"]
    sal = {r["step"]: [] for r in rows}
    for r in rows:
        if r["method"] == "sal":
            sal[r["step"]].append(r["rank_correlation"])
    means = [sum(v) / len(v) for _, v in sorted(sal.items())]
    assert means[0] > means[-1]  # randomising more layers moves sal's maps further away
    assert all(r["rank_correlation"] == pytest.approx(1.0) for r in rows if r["method"] == "edge")


def test_abele_metrics_per_image(audited):
    output, manifest = audited
    rows = [r for r in read_output(output / "saliency")]
    assert len(rows) == N_IMAGES * len(METHODS)
    for r in rows:
        for v in (0, 127, 255):
            assert 0 <= r[f"relevance_{v}"] <= 1
        assert len(r["relevance_curve"]) == 3 * 21 and set(r["relevance_curve"]) <= {0.0, 1.0}
        assert r["relevance_curve"][0] == 0.0  # the "min" step blanks no pixel
        assert r["stability_mean"] is None or 0 <= r["stability_mean"] <= r["stability_max"]
        assert r["coherence_mean"] is None or 0 <= r["coherence_mean"] <= r["coherence_max"]
    assert sum(r["coherence_mean"] is not None for r in rows) > len(rows) / 2
    assert sum(r["stability_mean"] is not None for r in rows) > len(rows) / 2
    edge = [r["stability_mean"] for r in rows if r["method"] == "edge" and r["stability_mean"] is not None]
    assert edge and all(math.isfinite(v) for v in edge)
    assert "salt-and-pepper" in manifest["conventions"]["abele_metrics"]


def test_summary_has_mean_and_quantiles_of_every_metric(audited):
    output, _ = audited
    summary = read_output(output / "summary")
    overall = {s["method"]: s for s in summary if s["target"] is None}
    assert set(overall) == set(METHODS)
    for s in overall.values():
        assert s["count"] == N_IMAGES and s["accuracy"] >= 0.9 and s["mean_time_ms"] > 0
        for metric in METRIC_COLUMNS:
            if metric.startswith("coherence"):
                continue  # per class, coherence may have no neighbour in the batch
            if metric in ROAD_COLUMNS + LOCALISATION_COLUMNS:  # not asked for (--road), no ground truth
                assert s[f"mean_{metric}"] is None and s[f"p90_{metric}"] is None, metric
                continue
            assert s[f"p10_{metric}"] <= s[f"median_{metric}"] <= s[f"p90_{metric}"], metric
    assert all(f"mean_{m}" in overall["sal"] for m in ABELE_COLUMNS)


def test_a_method_that_fails_on_a_random_model_gets_no_verdict():
    from saliency_audit.pipelines.checks.sanity import verdicts
    rows = [{"method": "sal", "check": "cascading", "step": s, "layer": "x", "image_id": "a", "rank_correlation": r,
             "rank_correlation_abs": r, "ssim": r} for s, r in ((1, 0.9), (2, 0.2))]
    result = verdicts(rows, ["sal", "lrp"], 0.5, {"lrp": "model randomised down to fc2: overflow"})
    assert result["sal"]["flagged"] is False and result["sal"]["rank_correlation"] == 0.2
    assert result["lrp"]["flagged"] is None and "overflow" in result["lrp"]["error"]


def test_random_other_classes_are_uniform_over_the_other_classes_and_seeded():
    import torch

    from saliency_audit.explainers.metrics import random_other_classes
    targets = torch.arange(1000) % 10
    others = random_other_classes(targets, 10, torch.arange(1000))
    assert (others != targets).all() and set(others.tolist()) == set(range(10))
    counts = torch.bincount((others - targets) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 70  # offsets 1..9, about 111 each
    assert torch.equal(others[:5], random_other_classes(targets[:5], 10, torch.arange(5)))  # the seed decides
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_other_classes(targets[:1], 1, [0])
