"""Incremental audits (``run --incremental --slot``) end to end: the real job on DirectRunner with
the demo model, over small tar shards cut from the bundled digits. Every expected figure comes
from the shards the test writes (which ids are new, which were explained, with which options)."""
from __future__ import annotations

import collections
import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from conftest import DEMO_DATA, add_member, read_output

from saliency_audit.pipelines import audit
from saliency_audit.transforms.io import history
from saliency_audit.transforms.io.publication import OUTPUTS, RUNS

MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
SAL_GRAD = ("sal", "grad")
SLOTS = ("2026-11-01", "2026-11-02", "2026-11-03")
PER_SHARD = 4


# --- helpers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(demo_shard) -> dict[str, list[tuple[str, bytes]]]:
    """image id -> its tar members (png and cls), the first 40 bundled digits in order."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(demo_shard) as src:
        for member in src.getmembers()[:80]:
            out.setdefault(member.name.rsplit(".", 1)[0], []).append((member.name, src.extractfile(member).read()))
    return out


def write_shard(path: Path, ids: list[str], digits) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as dst:
        for image_id in ids:
            for name, data in digits[image_id]:
                add_member(dst, name, data)
    return list(ids)


def audit_args(shards: Path, out: Path, *extra: str, methods: str = "sal,grad", model=MODEL) -> list[str]:
    return ["--input", str(shards / "*.tar"), *model, "--channels", "1", "--methods", methods,
            "--torch-threads", "1", "--batch-size", "4", "--output", str(out), *extra]


def incremental(shards: Path, out: Path, slot: str, *extra: str, **kw) -> dict:
    """One scheduled run; its published manifest."""
    code = audit.main(audit_args(shards, out, "--incremental", "--slot", slot, *extra, **kw))
    assert code == 0, f"run of slot {slot} exited {code}"
    return json.loads((out / "manifest.json").read_text())


def history_table(out: Path) -> list[dict]:
    """The history as pyarrow reads the folder: one table, sorted by slot."""
    return sorted(ds.dataset(str(out / "history"), format="parquet").to_table().to_pylist(), key=lambda r: r["slot"])


def maps(out: Path) -> list[dict]:
    columns = ["image_id", "method", "saliency", "score", "predicted", "model", "run"]
    return history.saliency_dataset(str(out)).to_table(columns=columns).to_pylist()


def explained_in(rows: list[dict], run_id: str) -> dict[str, set[str]]:
    """method -> image ids one run explained."""
    out: dict[str, set[str]] = collections.defaultdict(set)
    for r in rows:
        if r["run"] == run_id:
            out[r["method"]].add(r["image_id"])
    return out


def assert_each_once(out: Path) -> collections.Counter:
    """Every (model, method fingerprint, image, method) the history holds is there once; returns
    the counter of (model, fingerprint, method) -> images."""
    fingerprints = {(r["run_id"], m["method"]): m["fingerprint"] for r in history.read(str(out)) for m in r["methods"]}
    pairs = collections.Counter((r["model"], fingerprints[r["run"], r["method"]], r["image_id"], r["method"])
                                for r in maps(out))
    assert pairs and max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1][:5]
    return collections.Counter((m, fp, method) for m, fp, _, method in pairs)


def assert_reconciles(manifest: dict) -> None:
    for method, c in manifest["counts"].items():
        assert c["read"] == c["explained"] + c["errors"] + c["skipped"], (method, c)


def counts(manifest: dict, key: str) -> dict[str, int]:
    return {method: c[key] for method, c in manifest["counts"].items()}


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# --- a schedule over a growing input --------------------------------------------------------

@pytest.fixture(scope="module")
def growing(tmp_path_factory, digits):
    """Three slots over a growing input (one new shard each), then slot 2 again."""
    root = tmp_path_factory.mktemp("growing")
    shards, out = root / "shards", root / "out"
    ids = list(digits)
    state: dict = {"shards": shards, "out": out, "shard_ids": [], "manifests": []}
    for k, slot in enumerate(SLOTS):
        state["shard_ids"].append(write_shard(shards / f"part-{k}.tar", ids[k * PER_SHARD:(k + 1) * PER_SHARD], digits))
        state["manifests"].append(incremental(shards, out, slot))
    state["table"], state["maps"] = history_table(out), maps(out)
    state["rerun"] = incremental(shards, out, SLOTS[1])
    state["table_after"], state["maps_after"] = history_table(out), maps(out)
    return state


@pytest.fixture(scope="module")
def plain(growing, tmp_path_factory) -> dict:
    """A plain (non-incremental) audit of the same shards, same options: (id, method) -> values."""
    out = tmp_path_factory.mktemp("plain") / "out"
    audit.run(audit_args(growing["shards"], out))
    return {(r["image_id"], r["method"]): (r["saliency"], r["score"], r["predicted"])
            for r in read_output(out / "saliency")}


@pytest.mark.slow
def test_three_runs_over_a_growing_input_explain_each_image_once(growing):
    manifests, table, shard_ids = growing["manifests"], growing["table"], growing["shard_ids"]
    assert [r["slot"] for r in table] == list(SLOTS)
    assert [r["run_id"] for r in table] == [m["run_id"] for m in manifests]
    assert [r["read"] for r in table] == [len(ids) for ids in shard_ids]  # only the new shard is read
    assert [r["shards"] for r in table] == [1, 2, 3]
    assert [(r["shards_read"], r["shards_skipped"]) for r in table] == [(1, 0), (1, 1), (1, 2)]
    assert len({r["model"] for r in table}) == 1
    for k, (manifest, row) in enumerate(zip(manifests, table)):
        assert_reconciles(manifest)
        assert manifest["incremental"]["slot"] == SLOTS[k]
        assert manifest["incremental"]["shards_skipped"] == k
        assert counts(manifest, "explained") == {m: len(shard_ids[k]) for m in SAL_GRAD}
        assert counts(manifest, "skipped") == {m: 0 for m in SAL_GRAD}  # skipped shards are not even read
        assert {m["method"]: (m["read"], m["explained"], m["skipped"]) for m in row["methods"]} == \
            {m: (len(shard_ids[k]), len(shard_ids[k]), 0) for m in SAL_GRAD}
        assert explained_in(growing["maps"], manifest["run_id"]) == {m: set(shard_ids[k]) for m in SAL_GRAD}
    pairs = collections.Counter((r["image_id"], r["method"]) for r in growing["maps"])
    assert pairs == {(i, m): 1 for ids in shard_ids for i in ids for m in SAL_GRAD}
    assert {r["model"] for r in growing["maps"]} == {table[0]["model"]}


@pytest.mark.slow
def test_history_maps_equal_a_plain_audit_to_the_bit(growing, plain):
    history_values = {(r["image_id"], r["method"]): (r["saliency"], r["score"], r["predicted"])
                      for r in growing["maps"]}
    assert history_values.keys() == plain.keys()
    for key, values in history_values.items():
        assert values == plain[key], key


@pytest.mark.slow
def test_rerun_of_a_slot_replaces_its_run(growing):
    before, after, out = growing["table"], growing["table_after"], growing["out"]
    replaced, rerun = before[1]["run_id"], growing["rerun"]
    assert [r["slot"] for r in after] == list(SLOTS)
    assert after[1]["run_id"] == rerun["run_id"] != replaced
    assert [after[0]["run_id"], after[2]["run_id"]] == [before[0]["run_id"], before[2]["run_id"]]
    assert rerun["incremental"]["replaces"] == replaced
    assert_reconciles(rerun)
    # the slot's images are explained again, with the same values, and the earlier run is gone
    assert counts(rerun, "explained") == {m: PER_SHARD for m in SAL_GRAD}
    model = before[1]["model"]
    gone = [out / name / f"model={model}" / f"run={replaced}" for name in OUTPUTS]
    gone += [out / RUNS / replaced, out / RUNS / f"{replaced}.json"]
    assert not [p for p in gone if p.exists()]
    assert (out / "saliency" / f"model={model}" / f"run={rerun['run_id']}").is_dir()
    values = {(r["image_id"], r["method"]): r["saliency"] for r in growing["maps"]}
    assert {(r["image_id"], r["method"]): r["saliency"] for r in growing["maps_after"]} == values
    assert_each_once(out)


@pytest.fixture(scope="module")
def rewritten(growing, plain, digits):  # plain: the shards as they were, before they change here
    """Slot 4: shard 0 rewritten with its ids plus new ones; one id of shard 1 moved into a new
    shard 3 (with a new id), shard 1 rewritten without it; shard 2 untouched."""
    shards, out, old = growing["shards"], growing["out"], growing["shard_ids"]
    fresh = list(digits)[len(SLOTS) * PER_SHARD:]
    new0, new3 = fresh[:2], fresh[2:3]
    moved = old[1][0]
    write_shard(shards / "part-0.tar", old[0] + new0, digits)
    write_shard(shards / "part-1.tar", old[1][1:], digits)
    write_shard(shards / "part-3.tar", [moved] + new3, digits)
    manifest = incremental(shards, out, "2026-11-04")
    return {"manifest": manifest, "new": set(new0 + new3), "read": len(old[0]) + 2 + len(old[1]) - 1 + 2,
            "maps": maps(out)}


@pytest.mark.slow
def test_only_new_ids_of_rewritten_and_new_shards_are_explained(growing, rewritten):
    manifest = rewritten["manifest"]
    assert_reconciles(manifest)
    assert manifest["incremental"]["shards_read"] == 3 and manifest["incremental"]["shards_skipped"] == 1
    assert counts(manifest, "read") == {m: rewritten["read"] for m in SAL_GRAD}
    assert counts(manifest, "explained") == {m: len(rewritten["new"]) for m in SAL_GRAD}
    assert counts(manifest, "skipped") == {m: rewritten["read"] - len(rewritten["new"]) for m in SAL_GRAD}
    assert explained_in(rewritten["maps"], manifest["run_id"]) == {m: rewritten["new"] for m in SAL_GRAD}
    assert len(history_table(growing["out"])) == 4
    assert_each_once(growing["out"])


@pytest.fixture(scope="module")
def failed_once(tmp_path_factory, digits):
    """Slot 1 reads a shard whose third image fails to decode (its PNG bytes garbled); the bytes
    are then restored with the same size and mtime (a transient fault: the storage's fingerprint
    cannot tell), and slot 2 must still read the shard again for the failed record."""
    root = tmp_path_factory.mktemp("failed-once")
    shards, out = root / "shards", root / "out"
    path = shards / "part-0.tar"
    ids = write_shard(path, list(digits)[36:40], digits)
    intact = path.read_bytes()
    with tarfile.open(path) as tar:
        offset = tar.getmember(f"{ids[2]}.png").offset_data
    path.write_bytes(intact[:offset] + b"garbled!" + intact[offset + 8:])
    first = incremental(shards, out, "2026-11-01")
    garbled = path.stat().st_mtime_ns
    path.write_bytes(intact)
    os.utime(path, ns=(garbled, garbled))  # the fingerprint of the failed read, exactly
    return {"ids": ids, "first": first, "second": incremental(shards, out, "2026-11-02"), "maps": maps(out)}


@pytest.mark.slow
def test_an_image_that_failed_is_explained_once_its_shard_is_read_again(failed_once):
    first, second, ids = failed_once["first"], failed_once["second"], failed_once["ids"]
    assert counts(first, "errors") == {m: 1 for m in SAL_GRAD}
    assert explained_in(failed_once["maps"], first["run_id"]) == {m: set(ids) - {ids[2]} for m in SAL_GRAD}
    assert_reconciles(second)
    assert counts(second, "skipped") == {m: len(ids) - 1 for m in SAL_GRAD}
    assert explained_in(failed_once["maps"], second["run_id"]) == {m: {ids[2]} for m in SAL_GRAD}


# --- what counts as explained: methods, options, model, seed, sample limit ------------------

@pytest.fixture(scope="module")
def perturbed_weights(tmp_path_factory) -> Path:
    state = torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True)
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1e-3
    path = tmp_path_factory.mktemp("weights") / "perturbed.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def options_history(tmp_path_factory, digits, perturbed_weights):
    """Shard A (5 ids) read with --limit-per-shard 3 (its slot and --incremental from a spec
    file), then whole; shard B (2 new ids) added; then intg added, intg's options changed, and
    other weights."""
    root = tmp_path_factory.mktemp("options")
    shards, out = root / "shards", root / "out"
    ids = list(digits)
    a = write_shard(shards / "part-a.tar", ids[20:25], digits)
    spec = root / "audit.toml"
    spec.write_text('[history]\nincremental = true\nslot = "2026-11-01"\n')
    code = audit.main(["--config", str(spec), *audit_args(shards, out, "--limit-per-shard", "3")])
    runs = {"limited": json.loads((out / "manifest.json").read_text()),
            "whole": incremental(shards, out, "2026-11-02")}
    b = write_shard(shards / "part-b.tar", ids[25:27], digits)
    runs["intg"] = incremental(shards, out, "2026-11-03", methods="sal,grad,intg")
    runs["intg8"] = incremental(shards, out, "2026-11-04", "--method-options", '{"intg": {"n_steps": 8}}',
                                methods="sal,grad,intg")
    runs["weights"] = incremental(shards, out, "2026-11-05",
                                  model=[MODEL[0], MODEL[1], "--weights", str(perturbed_weights)])
    return {"root": root, "shards": shards, "out": out, "a": a, "b": b, "spec_code": code, "runs": runs,
            "maps": maps(out)}


@pytest.mark.slow
def test_a_spec_with_a_history_table_runs_incrementally(options_history):
    limited, out = options_history["runs"]["limited"], options_history["out"]
    assert options_history["spec_code"] == 0
    assert limited["incremental"]["slot"] == "2026-11-01"
    row = history_table(out)[0]
    assert (row["slot"], row["run_id"], row["read"]) == ("2026-11-01", limited["run_id"], 3)
    assert (out / "saliency" / f"model={row['model']}" / f"run={limited['run_id']}").is_dir()


@pytest.mark.slow
def test_a_limited_read_does_not_cover_a_whole_read(options_history):
    limited, whole, a = options_history["runs"]["limited"], options_history["runs"]["whole"], options_history["a"]
    assert counts(limited, "explained") == {m: 3 for m in SAL_GRAD}
    assert_reconciles(whole)
    assert whole["incremental"]["shards_read"] == 1
    assert counts(whole, "read") == {m: len(a) for m in SAL_GRAD}
    assert counts(whole, "skipped") == {m: 3 for m in SAL_GRAD}
    rows = options_history["maps"]
    assert explained_in(rows, limited["run_id"]) == {m: set(a[:3]) for m in SAL_GRAD}
    assert explained_in(rows, whole["run_id"]) == {m: set(a[3:]) for m in SAL_GRAD}


@pytest.mark.slow
def test_a_method_added_or_with_new_options_explains_only_that_method(options_history):
    runs, rows = options_history["runs"], options_history["maps"]
    old, new = set(options_history["a"]), set(options_history["b"])
    everything = old | new
    added, changed = runs["intg"], runs["intg8"]
    for manifest in (added, changed):
        assert_reconciles(manifest)
    # intg: every image; sal and grad only on the new shard's (shard A is not read for them)
    assert counts(added, "explained") == {"sal": len(new), "grad": len(new), "intg": len(everything)}
    assert counts(added, "skipped") == {"sal": len(old), "grad": len(old), "intg": 0}
    assert explained_in(rows, added["run_id"]) == {"sal": new, "grad": new, "intg": everything}
    assert counts(changed, "explained") == {"sal": 0, "grad": 0, "intg": len(everything)}
    assert counts(changed, "skipped") == {"sal": len(everything), "grad": len(everything), "intg": 0}
    assert explained_in(rows, changed["run_id"]) == {"intg": everything}
    fingerprints = [m["incremental"]["fingerprints"] for m in (added, changed)]
    assert fingerprints[0]["intg"] != fingerprints[1]["intg"]
    assert {m: fingerprints[0][m] for m in SAL_GRAD} == {m: fingerprints[1][m] for m in SAL_GRAD}


@pytest.mark.slow
def test_other_weights_explain_everything_again_in_their_own_partition(options_history):
    runs, rows = options_history["runs"], options_history["maps"]
    everything = set(options_history["a"]) | set(options_history["b"])
    other, model = runs["weights"]["incremental"]["model"], runs["whole"]["incremental"]["model"]
    assert other != model
    assert_reconciles(runs["weights"])
    assert counts(runs["weights"], "explained") == {m: len(everything) for m in SAL_GRAD}
    assert counts(runs["weights"], "skipped") == {m: 0 for m in SAL_GRAD}
    assert explained_in(rows, runs["weights"]["run_id"]) == {m: everything for m in SAL_GRAD}
    assert {r["model"] for r in rows if r["run"] == runs["weights"]["run_id"]} == {other}
    assert (options_history["out"] / "saliency" / f"model={other}" / f"run={runs['weights']['run_id']}").is_dir()
    # per model and fingerprint: each image once, with each method
    per_key = assert_each_once(options_history["out"])
    assert set(per_key.values()) == {len(everything)}


@pytest.mark.slow
def test_maps_carry_the_method_fingerprint_that_tells_option_changes_apart(options_history):
    """intg with default options (slot 3) and with n_steps 8 (slot 4): both sets of maps are in
    the history, each image twice for intg, told apart by the fingerprint the history recorded."""
    runs, out = options_history["runs"], options_history["out"]
    rows = history.saliency_dataset(str(out)).to_table(
        columns=["image_id", "method", "method_fingerprint", "run"], filter=ds.field("method") == "intg").to_pylist()
    recorded = {r["run_id"]: {m["method"]: m["fingerprint"] for m in r["methods"]} for r in history.read(str(out))}
    expected = {runs[name]["incremental"]["fingerprints"]["intg"] for name in ("intg", "intg8")}
    assert len(expected) == 2 and {r["method_fingerprint"] for r in rows} == expected
    assert all(r["method_fingerprint"] == recorded[r["run"]]["intg"] for r in rows)
    everything = set(options_history["a"]) | set(options_history["b"])
    per_fingerprint = collections.Counter((r["method_fingerprint"], r["image_id"]) for r in rows)
    assert per_fingerprint == {(fp, i): 1 for fp in expected for i in everything}


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--seed", "1"], ["--target", "label"]])
def test_another_seed_or_target_needs_every_pair_again(options_history, change):
    """The plan, not a run: every shard to read with every method. Another seed: no recorded file
    whose ids would skip any (a run of the plan explains everything, as the weights' run above
    shows). Another target: the recorded files still count, per (image, method, class): an image
    whose label is its predicted class skips (tests/pipelines/test_targets.py runs it)."""
    base = audit_args(options_history["shards"], options_history["out"], "--incremental", "--slot", "2026-11-07")
    same, other = audit.plan(base).work, audit.plan([*base, *change]).work
    assert same.needed == {} and set(same.skipped_shards) == set(same.shards)  # all in the history
    assert set(other.needed) == set(same.shards) and set(other.needed.values()) == {SAL_GRAD}
    assert same.history_files and other.history_files == (same.history_files if "--target" in change else {})
    assert other.model == same.model


# --- invocation -----------------------------------------------------------------------------

@pytest.mark.parametrize("slot", ["../x", "", "a/b", ".hidden", "x" * 200])
def test_bad_slot_names_fail_with_one_line(slot, tmp_path, capsys):
    code = audit.main(audit_args(tmp_path, tmp_path / "out", "--incremental", "--slot", slot))
    assert code == 2
    assert "slot" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_slot_without_incremental_fails_with_one_line(demo_shard, tmp_path, capsys):
    code = audit.main(audit_args(demo_shard.parent, tmp_path / "out", "--slot", "2026-11-01"))
    assert code == 2
    assert "--incremental" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_of_an_incremental_run_counts_only_the_shards_to_read(options_history, digits, capsys):
    """Shards A and B are in the history; a new one, C, beside them is all the run would read."""
    root, out = options_history["root"], options_history["out"]
    new = write_shard(root / "shards-more" / "part-c.tar", list(digits)[30:32], digits)
    before = (history_table(out), sorted(p.name for p in (out / RUNS).iterdir()), (out / "manifest.json").read_text())
    capsys.readouterr()
    argv = audit_args(root, out, "--incremental", "--slot", "2026-11-08", "--dry-run")
    argv[1] = str(root / "shards*" / "*.tar")
    code = audit.main(argv)
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(rf"3 shard\(s\), {len(new)} record\(s\)", printed), printed
    assert "incremental" in printed
    assert (history_table(out), sorted(p.name for p in (out / RUNS).iterdir()),
            (out / "manifest.json").read_text()) == before


@pytest.mark.slow
def test_rerunning_an_older_slot_loses_no_pair_another_slot_skipped_through_it(tmp_path, digits):
    """Slot 1 explains shard a; the input is re-sharded into b (a's ids and new ones), which slot
    2 reads, skipping a's ids through slot 1's maps. Rerunning slot 1 replaces those maps: slot 2's
    claim that b is done rested on them, so b must be read again, not left half explained."""
    shards, out = tmp_path / "shards", tmp_path / "out"
    ids = list(digits)
    write_shard(shards / "a.tar", ids[:PER_SHARD], digits)
    incremental(shards, out, "s1")
    (shards / "a.tar").unlink()
    write_shard(shards / "b.tar", ids[:2 * PER_SHARD], digits)
    second = incremental(shards, out, "s2")
    assert counts(second, "skipped") == {m: PER_SHARD for m in SAL_GRAD}
    rerun = incremental(shards, out, "s1")
    assert rerun["incremental"]["shards_read"] == 1 and counts(rerun, "explained") == {m: PER_SHARD for m in SAL_GRAD}
    later = incremental(shards, out, "s3")  # b is done again, resting on the runs that stand
    assert later["incremental"]["shards_read"] == 0
    assert {(r["image_id"], r["method"]) for r in maps(out)} == {(i, m) for i in ids[:2 * PER_SHARD] for m in SAL_GRAD}
    assert_each_once(out)
