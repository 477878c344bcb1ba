"""Gates against a baseline: each gate kind passes and fails on real audits of the bundled digits
(the demo model, and the same model with perturbed weights), ``check`` exits 0/1/2, a spec with
[gates] makes ``run`` exit 1 on a changed model and 0 on the same one, and the statistics match
independent references (scipy's Spearman, sklearn's nDCG)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from audit_fixtures import sample_shard
from conftest import DEMO_DATA
from scipy.stats import spearmanr
from sklearn.metrics import ndcg_score

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.checks.findings import SCORE_THRESHOLD
from saliency_audit.pipelines.config import spec
from saliency_audit.pipelines.config.options import UsageError
from saliency_audit.pipelines.reporting import diff
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.report import Report

N_IMAGES = 12
MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--device", "cpu", "--channels", "1"]
JOB = ["--methods", "sal,grad", "--batch-size", "12", "--metric-steps", "4"]  # the spec adds the sanity check
SPEC = """\
[input]
path = "shards/sample.tar"
[model]
path = "saliency_audit.pipelines.training.reference_model:mnist_cnn"
weights = "{weights}"
device = "cpu"
[preprocessing]
channels = 1
[explain]
methods = ["sal", "grad"]
batch_size = 12
[metrics]
steps = 4
[sanity_check]
enabled = true
images = 3
[gates]
error_rate = 0.1          # the shard holds one corrupt record of 13
[baseline]
path = "baseline"
"""


def perturbed_weights(path: Path, scale: float = 1.0) -> Path:
    """The demo model's weights with seeded noise of ``scale`` times each tensor's spread."""
    state = torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    changed = {k: v + scale * v.float().std().nan_to_num(0) * torch.randn(v.shape, generator=generator)
               if v.is_floating_point() and v.numel() > 1 else v for k, v in state.items()}
    torch.save(changed, path)
    return path


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """A baseline audit, then a spec with [gates] and [baseline] run on the same model and on a
    changed one (four real audits of 12 digits and one corrupt record)."""
    root = tmp_path_factory.mktemp("gates")
    sample_shard(root / "shards", N_IMAGES)
    changed = perturbed_weights(root / "changed.pt")
    base = ["--input", str(root / "shards" / "sample.tar"), *MODEL, *JOB]
    assert audit.main([*base, "--weights", str(DEMO_DATA / "mnist_cnn.pt"), "--output", str(root / "baseline")]) == 0
    config = root / "audit.toml"
    config.write_text(SPEC.format(weights=DEMO_DATA / "mnist_cnn.pt"))
    same = audit.main(["--config", str(config), "--output", str(root / "same")])
    changed_code = audit.main(["--config", str(config), "--weights", str(changed), "--output", str(root / "changed")])
    return SimpleNamespace(root=root, config=config, changed_weights=changed, same_code=same,
                           changed_code=changed_code, baseline=root / "baseline", same=root / "same",
                           changed=root / "changed")


@pytest.fixture(scope="module")
def changed_verdict(audits) -> dict:
    """The default gates on the changed model's audit against the baseline."""
    return evaluate(audits.changed, audits.baseline)


def verdict_of(folder: Path) -> dict:
    return json.loads((folder / "verdict.json").read_text())


def evaluate(audit_dir: Path, baseline: Path | None = None, **given) -> dict:
    return gates.evaluate(AuditDir(str(audit_dir)), AuditDir(str(baseline)) if baseline else None,
                          list(given.items()))


def only(verdict: dict, name: str, method: str | None = None) -> dict:
    found = [g for g in verdict["gates"] if g["name"] == name and g["method"] == method]
    assert len(found) == 1, (name, method, verdict["gates"])
    return found[0]


# --- run with [gates] -----------------------------------------------------------------------

def test_run_with_gates_passes_on_the_same_model_and_fails_on_a_changed_one(audits):
    assert audits.same_code == 0
    assert audits.changed_code == 1
    same, changed = verdict_of(audits.same), verdict_of(audits.changed)
    assert same["status"] == "pass" and not same["failed"]
    assert same["audit"]["run_id"] == json.loads((audits.same / "manifest.json").read_text())["run_id"]
    assert same["baseline"]["run_id"] == json.loads((audits.baseline / "manifest.json").read_text())["run_id"]
    assert changed["status"] == "fail"
    # the changed model loses a digit and moves its maps: named with the values, thresholds and worst images
    assert {"accuracy_drop", "ndcg"} <= set(changed["failed"])
    for g in changed["gates"]:
        if g["name"] in changed["failed"] and g["status"] == "fail":
            assert isinstance(g["value"], float) and isinstance(g["threshold"], float)
            assert 1 <= len(g["worst_images"]) <= gates.WORST
    rho = only(changed, "rank_correlation", "sal")
    assert only(same, "rank_correlation", "sal")["value"] == pytest.approx(1.0)
    assert rho["value"] < only(same, "rank_correlation", "sal")["value"]
    # the spec's own threshold is used and recorded in the resolved spec of the manifest
    assert only(same, "error_rate", "sal")["threshold"] == 0.1
    manifest = json.loads((audits.same / "manifest.json").read_text())
    assert manifest["spec"]["resolved"]["gates"] == {"error_rate": 0.1}
    assert manifest["spec"]["resolved"]["baseline"]["path"] == str(audits.baseline)


def test_a_run_without_gates_writes_no_verdict(audits):
    assert not (audits.baseline / "verdict.json").exists()


# --- each gate kind: its value from an independent computation, pass at it, fail beyond it ---

def _flip(name: str, value: float) -> float:
    return value - 1e-6 if gates.GATES[name].bound == "max" else value + 1e-6


@pytest.mark.parametrize("name, method", [("accuracy_drop", None), ("error_rate", "sal"), ("deletion_rise", "grad"),
                                          ("deletion_vs_random", "sal"), ("sanity", "sal"),
                                          ("rank_correlation", "grad"), ("top_k_overlap", "sal"), ("ndcg", "sal")])
def test_each_gate_passes_at_its_value_and_fails_beyond_it(audits, changed_verdict, name, method):
    value = only(changed_verdict, name, method)["value"]
    assert value is not None and math.isfinite(value)
    held = only(evaluate(audits.changed, audits.baseline, **{name: value}), name, method)
    broken = only(evaluate(audits.changed, audits.baseline, **{name: _flip(name, value)}), name, method)
    assert (held["status"], broken["status"]) == ("pass", "fail")
    assert broken["worst_images"] and len(broken["worst_images"]) <= gates.WORST


def _scalars(folder: Path) -> list[dict]:
    return AuditDir(str(folder)).rows("saliency", ["image_id", "method", "label", "predicted", "target",
                                                   "deletion_auc", "deletion_auc_random"])


def test_accuracy_error_and_faithfulness_values_match_the_tables(audits, changed_verdict):
    verdict = changed_verdict

    def accuracy(folder):
        rows = {r["image_id"]: r for r in _scalars(folder) if r["method"] == "sal"}
        return 100 * np.mean([r["label"] == r["predicted"] for r in rows.values()])

    drop = accuracy(audits.baseline) - accuracy(audits.changed)
    assert only(verdict, "accuracy_drop")["value"] == pytest.approx(drop)
    assert drop > 1, "the perturbed model should lose accuracy"
    assert only(verdict, "accuracy_drop")["status"] == "fail"
    error = only(verdict, "error_rate", "grad")
    assert error["value"] == pytest.approx(1 / (N_IMAGES + 1)) and error["worst_images"] == ["broken"]
    rows = [r for r in _scalars(audits.changed) if r["method"] == "sal"]
    ratio = sum(r["deletion_auc"] for r in rows) / sum(r["deletion_auc_random"] for r in rows)
    assert only(verdict, "deletion_vs_random", "sal")["value"] == pytest.approx(ratio)
    before = {r["image_id"]: r["deletion_auc"] for r in _scalars(audits.baseline) if r["method"] == "grad"}
    after = {r["image_id"]: r["deletion_auc"] for r in _scalars(audits.changed) if r["method"] == "grad"}
    rise = np.mean([after[i] - before[i] for i in after])
    assert only(verdict, "deletion_rise", "grad")["value"] == pytest.approx(rise)
    sanity = json.loads((audits.changed / "manifest.json").read_text())["sanity"]
    assert only(verdict, "sanity", "sal")["value"] == pytest.approx(sanity["methods"]["sal"]["rank_correlation"])
    assert only(verdict, "sanity", "sal")["threshold"] == sanity["threshold"]  # the run's own by default


def _maps(folder: Path, method: str) -> dict[str, tuple[int, np.ndarray]]:
    files = json.loads((folder / "manifest.json").read_text())["files"]["saliency"]
    table = ds.dataset([str(folder / f) for f in files], format="parquet").to_table(filter=ds.field("method") == method)
    return {r["image_id"]: (r["target"], np.asarray(r["saliency"], np.float64).reshape(r["height"], r["width"]))
            for r in table.to_pylist()}


@pytest.mark.parametrize("budget", [diff.MAP_BUDGET, 1])
def test_drift_matches_scipy_and_sklearn(audits, monkeypatch, budget):
    monkeypatch.setattr(diff, "MAP_BUDGET", budget)  # 1 byte: one image per chunk, streamed
    verdict = evaluate(audits.changed, audits.baseline, drift_quantile=0.25)
    for method in ("sal", "grad"):
        a, b = _maps(audits.changed, method), _maps(audits.baseline, method)
        rhos = [spearmanr(a[i][1].ravel(), b[i][1].ravel()).statistic for i in sorted(a)]
        assert only(verdict, "rank_correlation", method)["value"] == pytest.approx(
            np.quantile([r for r in rhos if np.isfinite(r)], 0.25), abs=1e-6)
        per_class = []
        for target in {t for t, _ in a.values()} & {t for t, _ in b.values()}:
            mean_a = np.mean([np.abs(m) for t, m in a.values() if t == target], axis=0).ravel()
            mean_b = np.mean([np.abs(m) for t, m in b.values() if t == target], axis=0).ravel()
            per_class.append(ndcg_score([mean_b], [mean_a]))
        assert only(verdict, "ndcg", method)["value"] == pytest.approx(min(per_class), abs=1e-9)


def test_ndcg_is_sklearns_with_and_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        relevance = rng.random(50)
        scores = rng.integers(0, 5, 50).astype(float) if rng.random() < 0.5 else rng.random(50)
        assert gates.ndcg(relevance, scores) == pytest.approx(ndcg_score([relevance], [scores]), abs=1e-12)
    assert gates.ndcg(np.arange(5.0), np.arange(5.0)) == pytest.approx(1.0)
    assert gates.ndcg(np.arange(5.0), -np.arange(5.0)) < 0.7
    assert math.isnan(gates.ndcg(np.zeros(5), np.arange(5.0)))  # no relevance: no verdict, not a pass


def test_gates_that_cannot_be_evaluated_are_skipped_with_the_reason(audits):
    verdict = evaluate(audits.changed)  # no baseline
    for name in ("accuracy_drop", "rank_correlation", "top_k_overlap", "ndcg"):
        g = only(verdict, name)
        assert (g["status"], g["reason"], g["value"]) == ("skipped", "no baseline", None)
    off = evaluate(audits.changed, audits.baseline, ndcg=False, sanity=False)
    assert not [g for g in off["gates"] if g["name"] in ("ndcg", "sanity")]


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    (to / "verdict.json").unlink(missing_ok=True)
    return to


def test_nan_metrics_are_skipped_not_passed(audits, tmp_path):
    broken = _copy(audits.changed, tmp_path / "nan")
    for f in json.loads((broken / "manifest.json").read_text())["files"]["saliency"]:
        table = pq.read_table(broken / f)
        nan = pa.array(np.full(table.num_rows, np.nan, np.float32))
        table = table.set_column(table.schema.get_field_index("deletion_auc"), "deletion_auc", nan)
        pq.write_table(table, broken / f)
    verdict = evaluate(broken, audits.baseline)
    for name in ("deletion_vs_random", "deletion_rise"):
        assert only(verdict, name, "sal")["status"] == "skipped"
    json.dumps(verdict, allow_nan=False)  # the verdict is strict JSON


def _replace_findings(audit: Path, table: pa.Table | None) -> None:
    """The audit's findings/ as the given table, or gone (as in audits made before findings)."""
    manifest = json.loads((audit / "manifest.json").read_text())
    shutil.rmtree(audit / "findings")
    del manifest["files"]["findings"], manifest["outputs"]["findings"]
    if table is not None:
        (audit / "findings").mkdir()
        pq.write_table(table, audit / "findings" / "part-0.parquet")
        manifest["files"]["findings"] = ["findings/part-0.parquet"]
    (audit / "manifest.json").write_text(json.dumps(manifest))


def test_findings_gate_on_the_runs_own_findings(audits, tmp_path):
    verdict = evaluate(audits.changed)
    for method in ("sal", "grad"):
        assert only(verdict, "findings", method)["status"] in ("pass", "fail")
        assert only(verdict, "findings", method)["threshold"] == SCORE_THRESHOLD
    old = _copy(audits.changed, tmp_path / "old")
    _replace_findings(old, None)
    g = only(evaluate(old), "findings")
    assert g["status"] == "skipped" and "not computed" in g["reason"]


def test_findings_gate(audits, tmp_path):
    copy = _copy(audits.changed, tmp_path / "findings")
    _replace_findings(copy, pa.table({"method": ["sal", "sal", "grad"], "class": [3, 7, 1],
                             "kind": ["concentration", "spray_cluster", "concentration"],
                             "score": [0.05, 0.3, float("nan")],
                             "images": [["a"], ["w1", "w2", "w3", "w4", "w5", "w6"], ["z"]]}))
    g = only(evaluate(copy), "findings", "sal")
    assert (g["status"], g["value"]) == ("pass", 0.3)  # under the default threshold
    g = only(evaluate(copy, findings=0.1), "findings", "sal")
    assert (g["status"], g["value"], g["threshold"]) == ("fail", 0.3, 0.1)
    assert g["worst_images"] == ["w1", "w2", "w3", "w4", "w5"] and "class 7" in g["reason"]
    assert only(evaluate(copy, findings=0.5), "findings", "sal")["status"] == "pass"
    assert not [x for x in evaluate(copy)["gates"] if x["name"] == "findings" and x["method"] == "grad"]  # NaN only


# --- check: exit codes, the spec, hostile input ------------------------------------------------

def test_check_exit_codes(audits, tmp_path, capsys):
    verdict = tmp_path / "v.json"
    assert cli.main(["check", str(audits.same), "--baseline", str(audits.baseline), "--gate", "error_rate=0.1",
                     "--verdict", str(verdict)]) == 0
    assert json.loads(verdict.read_text())["status"] == "pass"
    assert cli.main(["check", str(audits.changed), "--baseline", str(audits.baseline), "--gate", "error_rate=0.1",
                     "--verdict", str(verdict)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "verdict: fail" in out
    # the spec's [gates] and [baseline], overridden by the flags
    assert cli.main(["check", str(audits.changed), "--config", str(audits.config), "--verdict", str(verdict)]) == 1
    assert json.loads(verdict.read_text())["baseline"]["path"] == str(audits.baseline)
    lenient = ["--gate", "accuracy_drop=100", "--gate", "rank_correlation=-1", "--gate", "top_k_overlap=0",
               "--gate", "ndcg=0", "--gate", "deletion_rise=1", "--gate", "deletion_vs_random=10", "--gate", "sanity=1"]
    assert cli.main(["check", str(audits.changed), "--config", str(audits.config), *lenient,
                     "--verdict", str(verdict)]) == 0


@pytest.mark.parametrize("argv, named", [
    (["--gate", "accuracy_dorp=1"], "accuracy_dorp"),
    (["--gate", "ndcg=nan"], "ndcg"),
    (["--gate", "ndcg=2"], "ndcg"),
    (["--gate", "error_rate=lots"], "error_rate"),
    (["--gate", "ndcg"], "NAME=VALUE"),
    (["--gate", "drift_quantile=off"], "drift_quantile"),
    (["--gates", "ndcg=1"], "--gates"),
])
def test_bad_gates_fail_in_one_line(audits, capsys, argv, named):
    assert cli.main(["check", str(audits.changed), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_a_baseline_that_is_not_an_audit(audits, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "manifest.json").write_text("[1, 2]")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "manifest.json").write_text("{not json")
    for folder in ("empty", "list", "garbled"):
        assert cli.main(["check", str(audits.changed), "--baseline", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "baseline" in err and folder in err
    # gone by the time a run that was checked against it is published: the check fails (1), in a
    # verdict of the run saying why; the run is published, so it is no usage error (2)
    published = _copy(audits.changed, tmp_path / "published")
    manifest = json.loads((published / "manifest.json").read_text())
    manifest["options"]["output"] = str(published)
    args = SimpleNamespace(gates=None, baseline=str(tmp_path / "empty"))
    assert gates.decide(manifest, args, None) == 1
    verdict = verdict_of(published)
    assert verdict["status"] == "fail" and "empty: no manifest.json" in verdict["error"]
    assert verdict["audit"]["run_id"] == manifest["run_id"]


@pytest.mark.parametrize("text, key", [
    ('[gates]\naccuracy_drop = "x"\n', "gates.accuracy_drop"),
    ("[gates]\nndcg = [0.9]\n", "gates.ndcg"),
    ("[gates]\nndcg = nan\n", "gates.ndcg"),
    ("[gates]\nndgc = 0.9\n", "gates.ndgc"),
    ("[baseline]\npath = 3\n", "baseline.path"),
    ("gates = 3\n", "gates"),
])
def test_bad_gates_in_a_spec_fail_naming_the_key(audits, tmp_path, capsys, text, key):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        spec.parse_invocation(["--config", str(config), "--input", "x.tar", "--model", "m.pt", "--output", "o"])
    assert cli.main(["check", str(audits.changed), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err


def test_gate_values_in_yaml_and_on_the_command_line(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text("gates: {ndcg: 0.8, sanity: true, findings: false}\nbaseline: {path: prev}\n")
    args, _ = spec.parse_invocation(["--config", str(config), "--input", "x.tar", "--model", "m.pt", "--output", "o",
                                     "--gate", "ndcg=0.7"])
    assert gates.thresholds(args.gates)["ndcg"] == 0.7  # the command line wins
    assert gates.thresholds(args.gates)["findings"] is False and gates.thresholds(args.gates)["sanity"] is None
    assert args.baseline == str(tmp_path / "prev")  # relative to the spec's folder
    assert spec.resolved(args, [])["gates"] == {"ndcg": 0.7, "sanity": True, "findings": False}


# --- the report's verdict section ------------------------------------------------------------

def test_report_leads_with_the_verdict(audits):
    page = Report(AuditDir(str(audits.changed))).html()
    verdict = verdict_of(audits.changed)
    assert page.index('id="verdict"') < page.index('id="methods"')
    assert "Gates: FAIL" in page
    failed = next(g for g in verdict["gates"] if g["status"] == "fail")
    assert failed["worst_images"][0] in page


def test_report_shows_a_hostile_verdict_as_text(audits, tmp_path):
    copy = _copy(audits.same, tmp_path / "hostile")
    run_id = json.loads((copy / "manifest.json").read_text())["run_id"]  # of this run: shown, as text
    (copy / "verdict.json").write_text(json.dumps({
        "status": "<script>alert(1)</script>", "failed": 7, "audit": {"run_id": run_id},
        "gates": [{"name": "<b>ndcg</b>", "method": ["x"], "value": "NaN", "threshold": {"a": 1},
                   "status": "fail", "worst_images": ["<img src=x onerror=alert(1)>"], "reason": 3}, "junk", 7]}))
    page = Report(AuditDir(str(copy))).html()
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>ndcg" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    (copy / "verdict.json").write_text("[1]")
    assert "not a verdict" in Report(AuditDir(str(copy))).html()


# --- review fixes: self-comparison, dead maps, shared images, a deep verdict ----------------------

def test_a_baseline_that_is_the_runs_own_output_is_refused_before_any_work(audits, tmp_path, capsys):
    out = _copy(audits.same, tmp_path / "out")
    before = (out / "manifest.json").read_text()
    run = ["--config", str(audits.config), "--output", str(tmp_path / "x" / ".." / "out")]
    assert audit.main([*run, "--baseline", str(out) + "/"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "own --output" in err
    assert (out / "manifest.json").read_text() == before  # nothing ran, nothing published
    assert audit.main(["--config", str(audits.config), "--output", str(tmp_path / "new"),
                       "--baseline", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--baseline" in err and "missing" in err
    assert not (tmp_path / "new").exists()


def test_an_audit_compared_with_itself_is_a_usage_error(audits, capsys):
    with pytest.raises(gates.GateError, match="the baseline is the audit itself"):
        evaluate(audits.same, audits.same)
    assert cli.main(["check", str(audits.same), "--baseline", str(audits.same)]) == 2
    assert "the baseline is the audit itself" in capsys.readouterr().err


def _rewrite_maps(folder: Path, method: str, ids: set[str] | None = None, keep_ids: set[str] | None = None) -> None:
    """The audit's maps of ``method`` on ``ids`` made constant (a dead method), and/or its saliency
    rows limited to ``keep_ids``."""
    for f in json.loads((folder / "manifest.json").read_text())["files"]["saliency"]:
        table = pq.read_table(folder / f)
        if keep_ids is not None:
            table = table.filter(pa.array([i in keep_ids for i in table.column("image_id").to_pylist()]))
        if ids:
            field = table.schema.field("saliency")
            maps = [np.zeros_like(np.asarray(m)).tolist() if i in ids and m_ == method else m
                    for i, m_, m in zip(table.column("image_id").to_pylist(), table.column("method").to_pylist(),
                                        table.column("saliency").to_pylist())]
            table = table.set_column(table.schema.get_field_index("saliency"), field, pa.array(maps, field.type))
        pq.write_table(table, folder / f)


def test_a_method_gone_dead_fails_the_rank_correlation(audits, tmp_path):
    ids = sorted({r["image_id"] for r in _scalars(audits.same)})
    dead = _copy(audits.same, tmp_path / "dead")
    _rewrite_maps(dead, "sal", set(ids[:9]))  # 9 of 12 maps constant: the median image has no correlation
    g = only(evaluate(dead, audits.baseline), "rank_correlation", "sal")
    assert (g["status"], g["value"]) == ("fail", 0.0)
    assert set(g["worst_images"]) <= set(ids[:9])
    # constant in both audits: no verdict on those images, and the reason says how many were left out
    base = _copy(audits.baseline, tmp_path / "base")
    _rewrite_maps(base, "sal", set(ids[:9]))
    g = only(evaluate(dead, base), "rank_correlation", "sal")
    assert g["status"] == "pass" and "9 (75%) left out" in g["reason"] and "over 3 of 12" in g["reason"]


def test_comparisons_need_shared_images(audits, tmp_path):
    ids = sorted({r["image_id"] for r in _scalars(audits.changed)})
    few = _copy(audits.baseline, tmp_path / "few")
    _rewrite_maps(few, "sal", keep_ids=set(ids[:3]))  # the baseline holds 3 of the audit's 12 images
    verdict = evaluate(audits.changed, few)
    g = only(verdict, "shared_images")
    assert (g["status"], g["value"], g["threshold"]) == ("fail", 0.25, 0.5)
    assert g["worst_images"] == ids[3:3 + gates.WORST]
    for name, method in (("accuracy_drop", None), ("rank_correlation", None), ("ndcg", None),
                         ("deletion_rise", "sal")):
        assert only(verdict, name, method)["status"] == "skipped"
        assert only(verdict, name, method)["reason"] == "the audits share 3 of 12 images"
    # allowed a smaller share: the accuracy drop is measured on the labelled images both hold
    verdict = evaluate(audits.changed, few, shared_images=0.2)
    assert only(verdict, "shared_images")["status"] == "pass"
    rows = {r["image_id"]: r for r in _scalars(audits.changed) if r["method"] == "sal"}
    base = {r["image_id"]: r for r in _scalars(audits.baseline) if r["method"] == "sal"}
    drop = 100 * np.mean([base[i]["label"] == base[i]["predicted"] for i in ids[:3]]) - \
        100 * np.mean([rows[i]["label"] == rows[i]["predicted"] for i in ids[:3]])
    assert only(verdict, "accuracy_drop")["value"] == pytest.approx(drop)


def test_accuracy_drop_compares_the_same_images(audits, tmp_path):
    """A baseline that holds only the images the audit gets right must not hide the audit's mistakes
    behind a different sample: both accuracies are on the images both hold."""
    rows = {r["image_id"]: r for r in _scalars(audits.changed) if r["method"] == "sal"}
    wrong = {i for i, r in rows.items() if r["label"] != r["predicted"]}
    assert wrong, "the changed model should get some digit wrong"
    kept = set(rows) - set(sorted(wrong)[:1])  # the baseline lacks one image the changed model gets wrong
    partial = _copy(audits.baseline, tmp_path / "partial")
    _rewrite_maps(partial, "sal", keep_ids=kept)
    base = {r["image_id"]: r for r in _scalars(audits.baseline) if r["method"] == "sal"}
    drop = 100 * np.mean([base[i]["label"] == base[i]["predicted"] for i in kept]) - \
        100 * np.mean([rows[i]["label"] == rows[i]["predicted"] for i in kept])
    assert only(evaluate(audits.changed, partial), "accuracy_drop")["value"] == pytest.approx(drop)


def test_report_survives_a_deeply_nested_verdict(audits, tmp_path):
    copy = _copy(audits.same, tmp_path / "deep")
    (copy / "verdict.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "verdict.json is unreadable" in Report(AuditDir(str(copy))).html()


def test_control_maps_are_not_judged():
    """random and sobel ignore the model by design: judged, they would fail every quality gate."""
    from saliency_audit.pipelines.checks.gates import Side

    class Audit:
        methods = ["grad", "random", "sobel"]

        @staticmethod
        def control(method):
            return method in ("random", "sobel")

        @staticmethod
        def scan(name, columns):
            return iter(())

    assert Side(Audit()).methods == ["grad"]


# --- round three: verdicts and exit codes that mean what the docs say ----------------------------

def _cheap_run(audits, output: Path, *extra: str) -> int:
    """A real run of the 12 digits with one cheap method, into ``output``."""
    return audit.main(["--input", str(audits.root / "shards" / "sample.tar"), *MODEL, "--weights",
                       str(DEMO_DATA / "mnist_cnn.pt"), "--methods", "sal", "--batch-size", "12",
                       "--metric-steps", "4", "--output", str(output), *extra])


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _copy_with_verdict(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


@pytest.mark.slow
def test_an_ungated_run_leaves_no_verdict_of_the_run_before(audits, tmp_path):
    out = _copy_with_verdict(audits.same, tmp_path / "out")
    assert verdict_of(out)["status"] == "pass"  # the earlier, gated run's
    assert _cheap_run(audits, out) == 0
    assert not (out / "verdict.json").exists()  # removed with the publication of the run after it
    assert "Gates:" not in Report(AuditDir(str(out))).html()
    assert _manifest(out)["verdict"] is None  # this run has no gates: no verdict belongs to it


@pytest.mark.slow
def test_a_run_whose_gates_crash_fails_with_its_own_verdict(audits, tmp_path, monkeypatch, capsys):
    out = _copy_with_verdict(audits.same, tmp_path / "out")

    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gates, "evaluate", crash)
    assert _cheap_run(audits, out, "--gate", "error_rate=0.1") == 1  # published, and the check failed
    verdict, manifest = verdict_of(out), _manifest(out)
    assert manifest["verdict"] == "verdict.json"
    assert verdict["audit"]["run_id"] == manifest["run_id"]
    assert verdict["status"] == "fail" and "disk on fire" in verdict["error"]
    assert "disk on fire" in capsys.readouterr().out


def test_report_ignores_a_verdict_of_another_run(audits, tmp_path):
    copy = _copy_with_verdict(audits.changed, tmp_path / "stale")
    verdict = verdict_of(copy)
    assert verdict["status"] == "fail"
    verdict["audit"]["run_id"] = "20200101T000000-00000000"
    (copy / "verdict.json").write_text(json.dumps(verdict))
    page = Report(AuditDir(str(copy))).html()
    assert "Gates: FAIL" not in page and "not of the run this report shows" in page
    assert verdict["gates"][0]["reason"] not in page


@pytest.mark.slow
def test_an_asked_for_gate_that_cannot_be_judged_fails_the_run(audits, tmp_path, capsys):
    config = tmp_path / "gates.toml"
    config.write_text("[gates]\nsanity = true\nerror_rate = 0.1\n")  # sanity asked for; the run has no sanity check
    out = tmp_path / "out"
    assert _cheap_run(audits, out, "--config", str(config)) == 1
    printed = capsys.readouterr().out
    g = only(verdict_of(out), "sanity")
    assert g["status"] == "fail" and "cannot be judged" in g["reason"] and "not run" in g["reason"]
    assert verdict_of(out)["failed"] == ["sanity"]
    assert "gate sanity FAILED" in printed and "verdict: fail" in printed and "cannot be judged" in printed


def _nan_deletion(folder: Path) -> None:
    for f in _manifest(folder)["files"]["saliency"]:
        table = pq.read_table(folder / f)
        nan = pa.array(np.full(table.num_rows, np.nan, np.float32))
        pq.write_table(table.set_column(table.schema.get_field_index("deletion_auc"), "deletion_auc", nan), folder / f)


def test_asked_for_faithfulness_on_nan_metrics_fails_and_defaults_stay_skipped(audits, tmp_path, capsys):
    broken = _copy(audits.same, tmp_path / "nan")
    _nan_deletion(broken)
    default = evaluate(broken, audits.baseline, error_rate=0.1)
    assert only(default, "deletion_vs_random", "sal")["status"] == "skipped"  # on by default only
    asked = evaluate(broken, audits.baseline, error_rate=0.1, deletion_vs_random=0.8)
    g = only(asked, "deletion_vs_random", "sal")
    assert g["status"] == "fail" and g["value"] is None and "cannot be judged" in g["reason"]
    assert "deletion_vs_random" in asked["failed"] and asked["status"] == "fail"
    assert only(asked, "deletion_rise", "sal")["status"] == "skipped"
    assert cli.main(["check", str(broken), "--gate", "deletion_vs_random=on", "--verdict",
                     str(tmp_path / "v.json")]) == 1
    assert "gate deletion_vs_random[sal] FAILED" in capsys.readouterr().out


def test_asked_for_accuracy_drop_without_shared_labels_fails(audits, tmp_path):
    unlabelled = _copy(audits.baseline, tmp_path / "unlabelled")
    for f in _manifest(unlabelled)["files"]["saliency"]:
        table = pq.read_table(unlabelled / f)
        index = table.schema.get_field_index("label")
        field = table.schema.field(index)
        table = table.set_column(index, field, pa.nulls(table.num_rows, field.type))
        pq.write_table(table, unlabelled / f)
    assert only(evaluate(audits.same, unlabelled), "accuracy_drop")["status"] == "skipped"
    g = only(evaluate(audits.same, unlabelled, accuracy_drop=1.0), "accuracy_drop")
    assert g["status"] == "fail" and "no labelled image in both audits" in g["reason"]


@pytest.mark.parametrize("damage", ["truncated", "missing", "no maps"])
def test_a_bad_baseline_is_refused_before_the_run(audits, tmp_path, capsys, damage):
    base = _copy(audits.baseline, tmp_path / "base")
    part = base / _manifest(base)["files"]["saliency"][0]
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    elif damage == "missing":
        part.unlink()
    else:
        pq.write_table(pq.read_table(part).drop_columns(["saliency"]), part)
    out = tmp_path / "out"
    assert _cheap_run(audits, out, "--baseline", str(base)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--baseline" in err and part.name in err
    assert not out.exists()  # nothing ran, nothing published
    assert cli.main(["check", str(audits.same), "--baseline", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and part.name in err


@pytest.mark.parametrize("top_k", ["1e300", "784"])
def test_a_top_k_of_every_pixel_is_refused(audits, tmp_path, capsys, top_k):
    out = tmp_path / "out"
    assert _cheap_run(audits, out, "--baseline", str(audits.baseline), "--gate", f"top_k={top_k}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_k" in err and "784" in err
    assert not out.exists()
    assert cli.main(["check", str(audits.changed), "--baseline", str(audits.baseline), "--gate", f"top_k={top_k}",
                     "--verdict", str(tmp_path / "v.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_k" in err and "784" in err
    assert cli.main(["check", str(audits.same), "--baseline", str(audits.baseline), "--gate", "top_k=783",
                     "--gate", "error_rate=0.1", "--verdict", str(tmp_path / "v.json")]) == 0


def _swapped_shard(directory: Path, n_images: int, swapped: int) -> Path:
    """The sample shard's ids with other digits (and their labels) under the first ``swapped`` of them."""
    import tarfile

    from conftest import add_member
    directory.mkdir(parents=True)
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src:
        data = {m.name: src.extractfile(m).read() for m in src.getmembers()[: 2 * (n_images + 50)]}
    path = directory / "sample.tar"
    with tarfile.open(path, "w") as dst:
        for i in range(n_images):
            source = f"mnist-test-{i + 50 if i < swapped else i:06d}"
            for ext in ("png", "cls"):
                add_member(dst, f"mnist-test-{i:06d}.{ext}", data[f"{source}.{ext}"])
    return path


def _with_content_hashes(folder: Path, shard: Path) -> None:
    """Add content_sha256 (sha256 of each image's bytes in the shard) where the job did not write it."""
    import hashlib
    import tarfile
    with tarfile.open(shard) as tar:
        digest = {m.name.rsplit(".", 1)[0]: hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                  for m in tar.getmembers() if m.name.endswith(".png")}
    for f in _manifest(folder)["files"]["saliency"]:
        table = pq.read_table(folder / f)
        if "content_sha256" not in table.column_names:
            hashes = [digest.get(i) for i in table.column("image_id").to_pylist()]
            pq.write_table(table.append_column("content_sha256", pa.array(hashes, pa.string())), folder / f)


@pytest.mark.slow
def test_a_baseline_with_other_images_under_the_same_ids_is_not_blamed_on_the_model(audits, tmp_path, capsys):
    shard = _swapped_shard(tmp_path / "shards", N_IMAGES, swapped=4)
    other = tmp_path / "other"
    assert audit.main(["--input", str(shard), *MODEL, "--weights", str(DEMO_DATA / "mnist_cnn.pt"), *JOB,
                       "--output", str(other)]) == 0
    mine = _copy(audits.same, tmp_path / "mine")
    _with_content_hashes(mine, audits.root / "shards" / "sample.tar")
    _with_content_hashes(other, shard)
    swapped = [f"mnist-test-{i:06d}" for i in range(4)]
    verdict = evaluate(mine, other, drift_quantile=0.1, error_rate=0.1)
    assert verdict["unshared_content"]["images"] == 4
    assert verdict["unshared_content"]["examples"] == swapped
    for name in ("rank_correlation", "top_k_overlap", "ndcg"):
        for method in ("sal", "grad"):
            assert only(verdict, name, method)["status"] == "pass", only(verdict, name, method)
    assert "over 8 of 8 shared image(s)" in only(verdict, "rank_correlation", "sal")["reason"]
    assert only(verdict, "shared_images")["value"] == pytest.approx(8 / 12)
    assert set(only(verdict, "shared_images")["worst_images"]) == set(swapped)
    assert verdict["status"] == "pass"
    assert cli.main(["check", str(mine), "--baseline", str(other), "--gate", "drift_quantile=0.1",
                     "--gate", "error_rate=0.1", "--verdict", str(tmp_path / "v.json")]) == 0
    assert "unshared content: 4 image(s)" in capsys.readouterr().out
    # an older audit without content hashes is compared by id, as before: the other digits look like drift
    for f in _manifest(other)["files"]["saliency"]:
        pq.write_table(pq.read_table(other / f).drop_columns(["content_sha256"]), other / f)
    by_id = evaluate(mine, other, drift_quantile=0.1, error_rate=0.1)
    assert by_id["unshared_content"] is None
    assert only(by_id, "rank_correlation", "sal")["status"] == "fail"


@pytest.mark.slow
def test_the_gates_never_hold_an_audits_rows(tmp_path, monkeypatch):
    """``check`` scans an audit a record batch of a few columns at a time: the Python heap's peak
    (tracemalloc, which sees numpy's buffers too) while the gates judge 20,000 rows is about that of
    2,000 rows, not ten times it (gates.Side held every row as a dict)."""
    import sys
    import tracemalloc
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from report_check_memory import build_audit

    from saliency_audit.pipelines.reporting import audit_dir
    monkeypatch.setattr(audit_dir, "BATCH_ROWS", 500, raising=False)
    peaks = {}
    for rows in (2_000, 20_000):
        folder = AuditDir(str(build_audit(tmp_path / str(rows), rows)))
        tracemalloc.start()
        verdict = gates.evaluate(folder, None, [("deletion_vs_random", 10.0), ("error_rate", 0.5)])
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert only(verdict, "deletion_vs_random", "sal")["status"] == "pass"
        assert only(verdict, "error_rate", "sal")["status"] == "pass"
    assert peaks[20_000] < 1.5 * peaks[2_000], peaks
