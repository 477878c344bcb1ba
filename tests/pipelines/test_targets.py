"""Several targets per image (``--target predicted,label,top3,7``): the parser, the choice of classes
and ranks, and the job end to end on bundled digits (one record without a label): rows per distinct
class with their rank against the model's own logits, the predicted row equal to a single-target
run's to the bit, a failed target costing only itself, counts that reconcile, the summary, the
report, gates and diff pairing maps by class, and an audit history that explains only new targets."""
from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, add_member, read_output
from hypothesis import given, settings
from hypothesis import strategies as st

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.config.kinds import spec_target
from saliency_audit.pipelines.config.options import UsageError, parse_run_args
from saliency_audit.pipelines.job.preflight import check_target
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.diff import diff_audits
from saliency_audit.pipelines.reporting.report import write_report
from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
from saliency_audit.transforms.io.readers import read_shard
from saliency_audit.transforms.model.targets import TargetError, normalise, parse_targets, resolve

BASE = ["--input", "x.tar", "--model", "m.pt", "--output", "out"]
MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights",
         str(DEMO_DATA / "mnist_cnn.pt")]
METHODS = ("grad", "gradcam")
DIGITS = 6
NO_LABEL = "nolabel<i>&"  # a record without a label, its id full of markup


# --- the parser -------------------------------------------------------------------------------

ITEM = st.one_of(st.sampled_from(["predicted", "label"]),
                 st.tuples(st.integers(1, 50), st.integers(0, 2)).map(lambda t: f"top{'0' * t[1]}{t[0]}"),
                 st.tuples(st.integers(0, 999), st.integers(0, 2)).map(lambda t: f"{'0' * t[1]}{t[0]}"))


def canonical(item: str) -> str:
    return f"top{int(item[3:])}" if item.startswith("top") else str(int(item)) if item.isdigit() else item


@settings(max_examples=200, deadline=None)
@given(st.lists(ITEM, min_size=1, max_size=6, unique_by=canonical), st.lists(st.sampled_from(["", " "]), min_size=12,
                                                                               max_size=12))
def test_a_list_of_targets_parses_to_its_items_in_order(items, spaces):
    text = ",".join(f"{spaces[2 * k]}{item}{spaces[2 * k + 1]}" for k, item in enumerate(items))
    expected = tuple(canonical(i) for i in items)
    assert parse_targets(text) == expected
    assert parse_targets(normalise(text)) == expected  # the recorded form reads back the same
    as_spec = [int(i) if i.isdigit() else i for i in items]  # a spec's list: class ids as integers
    assert parse_targets(spec_target(as_spec)) == expected == parse_targets(spec_target(text))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.lists(ITEM | st.sampled_from(["", "top0", "top", "x", "-1", "1.5"]), max_size=4)
       .map(",".join))
def test_any_text_parses_or_fails_in_one_short_line(text):
    try:
        requests = parse_targets(text)
    except TargetError as e:
        assert "\n" not in str(e) and len(str(e)) < 200
        return
    assert requests and len(set(requests)) == len(requests) and normalise(",".join(requests)) == ",".join(requests)


@pytest.mark.parametrize("text,message", [
    ("", "empty item in ''"), ("predicted,,label", "empty item"), ("label,", "empty item"),
    ("top0", "'top0': topN needs N of at least 1"), ("first", "must be predicted, label or a class index >= 0"),
    ("top", "must be predicted"), ("-1", "must be predicted"), ("label,label", "'label' given twice"),
    ("7,07", "'7' given twice"), ("top3,top03", "'top3' given twice"),
])
def test_a_bad_target_list_fails_at_parse_time_in_one_line(text, message):
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, "--target", text])
    assert f"--target: {message}" in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=50, deadline=None)
@given(st.integers(25, 6000), st.sampled_from(["", "top", "0"]))
def test_a_huge_class_index_or_topn_fails_in_one_short_line(digits, prefix):
    # past 4300 digits int() raised a bare ValueError, which argparse echoed whole (thousands of characters)
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, "--target", "predicted," + prefix + "9" * digits])
    assert "is too long for a target" in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("text,message", [
    ("predicted,10", "--target 10 is not a class of the model, which has 10 (0 to 9)"),
    ("label,top11", "--target top11 asks for more classes than the model's 10"),
])
def test_classes_beyond_the_model_are_refused_by_preflight(text, message):
    with pytest.raises(UsageError) as info:
        check_target(text, 10)
    assert str(info.value) == message
    check_target(text.replace("10", "9").replace("top11", "top10"), 10)  # the last class, all classes: fine


def test_a_spec_gives_targets_as_a_list_or_the_same_string():
    assert spec_target(["predicted", "label", "top3", 7]) == "predicted,label,top3,7" == spec_target(
        "predicted,label,top3,7")
    assert spec_target(7) == "7"
    with pytest.raises(Exception, match="a list of them"):
        spec_target(["predicted", 1.5])


# --- choosing classes -------------------------------------------------------------------------

def test_classes_ranks_duplicates_and_failures_of_a_batch():
    logits = torch.tensor([[0.0, 5.0, 3.0, 4.0, 1.0],     # order 1, 3, 2, 4, 0
                           [2.0, 0.0, 1.0, 9.0, 8.0]])    # order 3, 4, 0, 2, 1
    choices, failures = resolve(("predicted", "label", "top3", "2"), logits, logits.argmax(dim=1), [3, None])
    assert [(c.cls, c.rank, c.source) for c in choices[0]] == [(1, 1, "predicted"), (3, 2, "label"),
                                                                (2, 3, "top3")]  # 2: top3's third and the class
    assert [(c.cls, c.rank, c.source) for c in choices[1]] == [(3, 1, "predicted"), (4, 2, "top3"), (0, 3, "top3"),
                                                                (2, 4, "2")]
    assert failures[0] == [] and [(f.source, f.reason) for f in failures[1]] == [
        ("label", "--target label, but the record has no label")]


def test_a_choice_within_the_rounding_noise_is_made_on_logits_computed_alone():
    """Classes 2 and 3 tie within the tolerance in the batch: top2 would follow the batch's noise,
    so the row is recomputed alone and its answer decides; a row far from any tie is not."""
    batched = torch.tensor([[9.0, 1.0, 5.0, 5.0 + 1e-6], [9.0, 1.0, 5.0, 3.0]])
    alone = torch.tensor([[9.0, 1.0, 5.0 + 1e-3, 5.0]])
    asked = []

    def recompute(rows):
        asked.append(rows.tolist())
        return alone

    choices, _ = resolve(("top2",), batched, torch.tensor([0, 0]), [None, None], recompute)
    assert asked == [[0]]
    assert [c.cls for c in choices[0]] == [0, 2] and [c.cls for c in choices[1]] == [0, 2]


# --- the job end to end -----------------------------------------------------------------------

def write_digits(path: Path) -> None:
    """The first DIGITS bundled digits, then the first digit again without a label under NO_LABEL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src, tarfile.open(path, "w") as dst:
        members = src.getmembers()[: 2 * DIGITS]
        for member in members:
            add_member(dst, member.name, src.extractfile(member).read())
        first = next(m for m in members if m.name.endswith(".png"))
        add_member(dst, f"{NO_LABEL}.png", src.extractfile(first).read())


def run(shard: Path, out: Path, target: str, *extra: str) -> dict:
    code = audit.main(["--input", str(shard), *MODEL, "--channels", "1", "--device", "cpu", "--methods",
                       ",".join(METHODS), "--torch-threads", "1", "--target", target, "--output", str(out), *extra])
    assert code == 0
    return json.loads((out / "manifest.json").read_text())


def published(out: Path, name: str) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return read_output(out / manifest["outputs"][name])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One shard; an incremental history of ``predicted`` then ``predicted,top2``; a plain run of
    ``predicted,label,top3``."""
    root = tmp_path_factory.mktemp("targets")
    shard = root / "shards" / "digits.tar"
    write_digits(shard)
    history = root / "history"
    out = {"shard": shard, "history": history, "several": root / "several",
           "single": run(shard, history, "predicted", "--incremental", "--slot", "a")}
    out["single_rows"] = published(history, "saliency")
    out["added"] = run(shard, history, "predicted,top2", "--incremental", "--slot", "b")
    out["manifest"] = run(shard, out["several"], "predicted,label,top3")
    return out


def logits_of(shard: Path) -> dict[str, np.ndarray]:
    """image id -> the model's logits of it, computed here, one image at a time."""
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    model = load_model(ModelSpec(MODEL[1], MODEL[3]))
    out = {}
    with torch.no_grad():
        for record in read_shard(str(shard)):
            x = torch.from_numpy(preprocess(decode(record, 1 << 24), Preprocessing(channels=1)))[None]
            out[record.image_id] = model(x)[0].numpy()
    return out


@pytest.mark.slow
def test_each_image_gets_a_row_per_distinct_class_with_its_rank(runs):
    rows = published(runs["several"], "saliency")
    logits = logits_of(runs["shard"])
    assert {r["image_id"] for r in rows} == set(logits)
    per_pair = collections.defaultdict(list)
    for r in rows:
        per_pair[(r["image_id"], r["method"])].append(r)
    for (image_id, method), mine in per_pair.items():
        order = list(np.argsort(-logits[image_id], kind="stable"))
        label = mine[0]["label"]
        expected = list(dict.fromkeys([order[0], *([label] if label is not None else []), *order[:3]]))
        assert sorted(r["target"] for r in mine) == sorted(expected), (image_id, method)  # one row per class
        for r in mine:
            assert r["target_rank"] == order.index(r["target"]) + 1 and r["predicted"] == order[0]
        sources = {r["target"]: r["target_source"] for r in mine}
        assert sources[order[0]] == "predicted"  # the first request that names a class is credited
        if label is not None and label != order[0]:
            assert sources[label] == "label"


@pytest.mark.slow
def test_the_predicted_row_equals_a_single_target_run_to_the_bit(runs):
    single = {(r["image_id"], r["method"]): r for r in runs["single_rows"]}
    several = [r for r in published(runs["several"], "saliency") if r["target_source"] == "predicted"]
    assert len(several) == len(single) == (DIGITS + 1) * len(METHODS)
    varies = {"time_ms", "method_fingerprint"}  # the clock; set in an audit history only
    for r in several:
        other = single[(r["image_id"], r["method"])]
        assert np.asarray(r["saliency"]).tobytes() == np.asarray(other["saliency"]).tobytes()
        assert {k: v for k, v in r.items() if k not in varies | {"saliency"}} == {
            k: v for k, v in other.items() if k not in varies | {"saliency"}}


@pytest.mark.slow
def test_a_record_without_a_label_loses_only_its_label_target_and_the_counts_reconcile(runs):
    rows = [r for r in published(runs["several"], "saliency") if r["image_id"] == NO_LABEL]
    assert {(r["method"], r["target_source"]) for r in rows} == {(m, s) for m in METHODS for s in ("predicted", "top3")}
    assert len(rows) == 3 * len(METHODS)
    errors = published(runs["several"], "errors")
    assert [(e["image_id"], e["stage"], e["method"], e["target_source"]) for e in errors] == [
        (NO_LABEL, "target", None, "label")]
    counts = runs["manifest"]["counts"]
    wrong = sum(1 for r in published(runs["several"], "saliency")
                if r["method"] == "grad" and r["target_source"] == "label")  # labels the model gets wrong
    pairs = (DIGITS + 1) * 3 + wrong + 1  # predicted + top3's other two, wrong labels, the failed label
    for method in METHODS:
        c = counts[method]
        assert (c["read"], c["targets"], c["errors"]) == (DIGITS + 1, pairs, 1)
        assert c["targets"] == c["explained"] + c["errors"]


@pytest.mark.slow
def test_the_summary_has_a_part_per_request_and_the_report_one_section_each(runs, tmp_path):
    summary = [s for s in published(runs["several"], "summary") if s["target"] is None]
    counts = {(s["method"], s["target_source"]): s["count"] for s in summary}
    rows = published(runs["several"], "saliency")
    labelled = sum(1 for r in rows if r["method"] == "grad" and r["target"] == r["label"])
    assert counts == {(m, q): n for m in METHODS
                      for q, n in (("predicted", DIGITS + 1), ("label", labelled), ("top3", 3 * (DIGITS + 1)))}
    page = write_report(str(runs["several"]), str(tmp_path / "report.html"))
    html = Path(page).read_text()
    assert "Other targets" in html and "<h3>--target label</h3>" in html and "<h3>--target top3</h3>" in html
    assert "nolabel&lt;i&gt;&amp;" in html and NO_LABEL not in html  # ids are text, never markup
    # the main view holds one map per image and method: its class galleries show each image once
    main = AuditDir(str(runs["several"])).main_view()
    seen = collections.Counter((b["image_id"], b["method"]) for batch in main.scan("saliency", ["image_id", "method"])
                               for b in batch.to_pylist())
    assert set(seen.values()) == {1} and len(seen) == (DIGITS + 1) * len(METHODS)
    # and so do the Clever-Hans findings: each image's map counts once in its class (grad's maps are never empty)
    per_method = collections.Counter()
    for f in published(runs["several"], "findings"):
        per_method[f["method"]] += f["class_images"] if f["kind"] == "concentration" else 0
    assert per_method["grad"] == DIGITS + 1 and max(per_method.values()) <= DIGITS + 1


@pytest.mark.slow
def test_a_run_adding_top2_explains_only_the_new_targets(runs):
    added, single = runs["added"], runs["single"]
    assert single["incremental"]["fingerprints"] == added["incremental"]["fingerprints"]
    rows = published(runs["history"], "saliency")
    assert {(r["target_source"], r["target_rank"]) for r in rows} == {("top2", 2)}
    assert len(rows) == (DIGITS + 1) * len(METHODS)  # the second class of each image, nothing again
    for method in METHODS:
        c = added["counts"][method]
        assert (c["explained"], c["skipped"], c["errors"], c["targets"]) == (DIGITS + 1, DIGITS + 1, 0, 2 * (DIGITS + 1))


@pytest.mark.slow
def test_gates_and_diff_pair_two_multi_target_runs_map_by_class(runs, tmp_path):
    """The history's newest run (its top2 maps) against the three-target run: every pair is the
    same image, method and class; a row of another class is never compared."""
    several, added = AuditDir(str(runs["several"])), AuditDir(str(runs["history"]))
    mine = {(r["image_id"], r["method"], r["target"]) for r in published(runs["history"], "saliency")}
    theirs = {(r["image_id"], r["method"], r["target"]) for r in published(runs["several"], "saliency")}
    expected = mine & theirs
    assert expected and len(expected) == len(mine)  # top3 holds every top2 class
    pairs = gates.pair_up(gates.Side(added), gates.Side(several))
    assert pairs.by_class and pairs.rows.num_rows == len(expected)
    assert set(zip(*(pairs.rows[c].to_pylist() for c in ("image_id", "method", "target")))) == expected
    assert pairs.rows["target"].to_pylist() == pairs.rows["target_b"].to_pylist()
    drift = gates.measure_drift(pairs, gates.Side(added), gates.Side(several), 0.1)
    assert sum(drift.pairs.values()) == len(expected)
    assert np.allclose(np.concatenate([drift.statistic(m, "rank_correlation") for m in METHODS]), 1.0)  # same maps
    info = diff_audits(str(runs["history"]), str(runs["several"]), str(tmp_path / "diff"))
    table = read_output(tmp_path / "diff" / "diff")
    assert info["pairs"] == len(expected) and info["only_b"] == len(theirs) - len(expected)
    assert {(r["image_id"], r["method"], r["target_a"]) for r in table} == expected
    assert all(r["target_a"] == r["target_b"] and r["rank_correlation"] == pytest.approx(1.0) for r in table)
