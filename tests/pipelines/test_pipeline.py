"""End-to-end DirectRunner runs over the bundled sample with planted corrupt records."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from conftest import DEMO_DATA, add_member, png_bytes, read_output

from saliency_audit.explainers import explainer_class, list_methods, method_parameters
from saliency_audit.pipelines import audit

pytestmark = pytest.mark.slow  # end-to-end audits of every method

rng = np.random.default_rng(0)
N_GOOD = 20


def runnable_methods():
    """Every registered method that needs no extra input (abele needs an AAE) and no attention
    layers (rollout, attention_grad: the demo CNN has none)."""
    import inspect
    return [m for m in list_methods() if not explainer_class(m).needs_attention
            and all(p is not inspect.Parameter.empty for p in method_parameters(m).values())]


METHODS = runnable_methods()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_shard):
    """One shard of real digits from the sample and one of planted bad records."""
    root = tmp_path_factory.mktemp("shards")
    with tarfile.open(demo_shard) as src, tarfile.open(root / "good.tar", "w") as dst:
        for member in src.getmembers()[: 2 * N_GOOD]:
            add_member(dst, member.name, src.extractfile(member).read())
    npy = io.BytesIO()
    np.save(npy, np.zeros((28, 28, 2), np.float32))
    with tarfile.open(root / "bad.tar", "w") as tar:
        add_member(tar, "bad-ok.png", png_bytes(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
        add_member(tar, "bad-corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
        add_member(tar, "bad-twochannels.npy", npy.getvalue())
        add_member(tar, "bad-huge.png", png_bytes(np.zeros((400, 400), np.uint8)))
        add_member(tar, "bad-colour.png", png_bytes(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)))
        add_member(tar, "bad-cut.png", png_bytes(rng.integers(0, 256, (200, 200), dtype=np.uint8)))
    data = (root / "bad.tar").read_bytes()
    cut = data.index(b"bad-cut.png") + 512 + 300
    (root / "bad.tar").write_bytes(data[:cut])  # the last member is truncated
    return root


EXPECTED_ERRORS = {  # image_id -> (stage, words in the reason)
    "bad-corrupt": ("decode", "cannot decode png"),
    "bad-twochannels": ("preprocess", "2 channels"),
    "bad-huge": ("decode", "over the limit"),
    "bad-colour": ("preprocess", "3 channels but the model takes 1"),
    "bad-cut": ("read", "truncated"),
}


def run_audit(shards, output, demo_model_args, methods, *extra):
    return audit.run(["--input", str(shards / "*.tar"), *demo_model_args, "--methods", ",".join(methods),
                      "--output", str(output), "--channels", "1", "--max-pixels", "100000",
                      "--batch-size", "16", *extra])


@pytest.fixture(scope="module")
def audited(shards, tmp_path_factory, demo_model_args):
    output = tmp_path_factory.mktemp("audit")
    methods = METHODS
    return output, run_audit(shards, output, demo_model_args, methods), methods


def test_counts_reconcile_per_method(audited):
    _, manifest, methods = audited
    assert manifest["reconciled"] and manifest["status"] == "succeeded"
    read = N_GOOD + 1 + len(EXPECTED_ERRORS)
    assert manifest["counts"] == {m: {"read": read, "explained": N_GOOD + 1, "errors": len(EXPECTED_ERRORS)}
                                  for m in methods}


def test_saliency_schema_and_values(audited):
    output, _, methods = audited
    table = ds.dataset(str(output / "saliency"), format="parquet").to_table()
    schema = table.schema
    for name, kind in [("image_id", pa.string()), ("source", pa.string()), ("label", pa.int64()),
                       ("method", pa.string()), ("target", pa.int64()), ("predicted", pa.int64()),
                       ("score", pa.float32()), ("height", pa.int32()), ("width", pa.int32()),
                       ("saliency", pa.list_(pa.float32()))]:
        assert schema.field(name).type == kind, name
    rows = table.to_pylist()
    assert len(rows) == (N_GOOD + 1) * len(methods)
    assert len({(r["image_id"], r["method"]) for r in rows}) == len(rows)
    for r in rows:
        assert len(r["saliency"]) == r["height"] * r["width"] == 28 * 28
        assert 0 <= r["score"] <= 1 and r["target"] == r["predicted"]  # --target predicted
        assert np.isfinite(r["saliency"]).all()
        assert r["saliency_sum"] == pytest.approx(float(np.sum(r["saliency"], dtype=np.float64)), rel=1e-4, abs=1e-6)
    for r in rows:
        for metric in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "gini"):
            assert 0 <= r[metric] <= 1, (metric, r[metric])
    real = [r for r in rows if r["image_id"].startswith("mnist-test")]
    assert all(r["label"] is not None and r["source"].endswith("good.tar") for r in real)
    accuracy = np.mean([r["label"] == r["predicted"] for r in real if r["method"] == methods[0]])
    assert accuracy >= 0.9  # the bundled model on its own sample


def test_maps_beat_the_random_order_on_deletion_and_insertion(audited):
    """Every explanation; the control maps are the levels to beat (random is one)."""
    output, _, methods = audited
    summary = [s for s in read_output(output / "summary") if s["target"] is None]
    assert {s["method"] for s in summary} >= {"random", "sobel"}
    for s in summary:
        if explainer_class(s["method"]).control:
            continue
        assert s["mean_deletion_auc"] < s["mean_deletion_auc_random"], s["method"]
        assert s["mean_insertion_auc"] > s["mean_insertion_auc_random"], s["method"]


def test_no_metrics_leaves_the_columns_null(shards, demo_model_args, tmp_path):
    run_audit(shards, tmp_path, demo_model_args, ["grad"], "--no-metrics")
    rows = read_output(tmp_path / "saliency")
    assert rows and all(r["deletion_auc"] is None and r["gini"] is None for r in rows)


def test_limit_per_shard_reads_the_first_records_of_each_shard(shards, demo_model_args, tmp_path):
    manifest = run_audit(shards, tmp_path, demo_model_args, ["sal"], "--no-metrics", "--limit-per-shard", "5")
    # good.tar's first 5 digits, and bad.tar's first 5 members: bad-ok and 4 bad records (not bad-cut)
    assert manifest["counts"] == {"sal": {"read": 10, "explained": 6, "errors": 4}}
    with tarfile.open(shards / "good.tar") as tar:
        first = sorted({m.name.split(".")[0] for m in tar.getmembers()[:10]})
    ids = sorted(r["image_id"] for r in read_output(tmp_path / "saliency"))
    assert ids == sorted(first + ["bad-ok"])
    errors = {r["image_id"] for r in read_output(tmp_path / "errors")}
    assert errors == set(EXPECTED_ERRORS) - {"bad-cut"}


def test_errors_have_stage_and_reason(audited):
    output, _, _ = audited
    errors = {r["image_id"]: r for r in read_output(output / "errors")}
    assert set(errors) == set(EXPECTED_ERRORS)
    for image_id, (stage, words) in EXPECTED_ERRORS.items():
        assert errors[image_id]["stage"] == stage and words in errors[image_id]["reason"], errors[image_id]
        assert errors[image_id]["source"].endswith("bad.tar") and errors[image_id]["method"] is None


def test_summary_per_method_and_class(audited):
    output, _, methods = audited
    summary = read_output(output / "summary")
    saliency = read_output(output / "saliency")
    for method in methods:
        overall = [s for s in summary if s["method"] == method and s["target"] is None]
        per_class = [s for s in summary if s["method"] == method and s["target"] is not None]
        assert len(overall) == 1 and overall[0]["count"] == N_GOOD + 1
        assert sum(s["count"] for s in per_class) == N_GOOD + 1
        mine = [r for r in saliency if r["method"] == method]
        assert overall[0]["mean_score"] == pytest.approx(np.mean([r["score"] for r in mine]), rel=1e-5)
        labelled = [r for r in mine if r["label"] is not None]
        assert overall[0]["accuracy"] == pytest.approx(np.mean([r["label"] == r["predicted"] for r in labelled]))


def test_manifest_records_the_run(audited):
    output, manifest, methods = audited
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    weights = DEMO_DATA / "mnist_cnn.pt"
    assert manifest["model"]["sha256"] == {str(weights): hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert set(manifest["methods"]) == set(methods)
    assert manifest["methods"]["intg"]["options"]["n_steps"] == 50
    assert {"torch", "apache-beam", "captum", "pyarrow"} <= set(manifest["versions"])
    assert manifest["started"] <= manifest["finished"]


def test_rerun_replaces_and_reproduces(audited, shards, demo_model_args, tmp_path):
    output, _, _ = audited
    before = sorted((r["image_id"], r["method"], r["saliency"]) for r in read_output(output / "saliency"))
    second = run_audit(shards, output, demo_model_args, METHODS)
    after = sorted((r["image_id"], r["method"], r["saliency"]) for r in read_output(output / "saliency"))
    assert after == before  # same values, no duplicates: the first run's folders are gone
    assert second["run_id"] != audited[1]["run_id"]
    for name in ("saliency", "summary", "errors", "sanity"):
        assert [p.name for p in (output / name).iterdir()] == [f"run={second['run_id']}"]
    assert sorted(p.name for p in (output / "_runs").iterdir()) == [second["run_id"], f"{second['run_id']}.json"]


def test_a_failed_run_leaves_the_previous_results_whole(shards, demo_model_args, tmp_path, monkeypatch):
    run_audit(shards, tmp_path, demo_model_args, ["sal"])
    before = sorted((r["image_id"], r["saliency"]) for r in read_output(tmp_path / "saliency"))
    manifest_before = (tmp_path / "manifest.json").read_text()

    from saliency_audit.transforms import parquet_sink
    original = parquet_sink._WriteRows.finish_bundle

    def fail_on_errors_output(self):
        if "/errors/" in self.directory:
            raise OSError("disk full (simulated)")
        yield from original(self)

    monkeypatch.setattr(parquet_sink._WriteRows, "finish_bundle", fail_on_errors_output)
    with pytest.raises(Exception, match="disk full"):
        run_audit(shards, tmp_path, demo_model_args, ["grad"])
    after = sorted((r["image_id"], r["saliency"]) for r in read_output(tmp_path / "saliency"))
    assert after == before and (tmp_path / "manifest.json").read_text() == manifest_before
    published = json.loads(manifest_before)["run_id"]
    for name in ("saliency", "summary", "errors", "sanity"):  # the failed run removed its folders
        assert [p.name for p in (tmp_path / name).iterdir()] == [f"run={published}"]


def test_an_output_folder_named_with_glob_characters_is_its_own_and_no_sibling(shards, demo_model_args, tmp_path):
    # 'out[1]' as a glob pattern is 'out1': the run's own files must be found under the literal name
    # (it failed: counts 0 explained), and publishing a second run must not delete 'out1's files
    sibling = tmp_path / "out1" / "saliency" / "part-legacy.parquet"
    sibling.parent.mkdir(parents=True)
    sibling.write_bytes(b"another audit's file")
    output = tmp_path / "out[1]"
    run_audit(shards, output, demo_model_args, ["sal"])
    manifest = run_audit(shards, output, demo_model_args, ["sal"])
    assert manifest["counts"]["sal"]["explained"] == N_GOOD + 1
    assert len(read_output(output / "saliency")) == N_GOOD + 1
    assert sibling.read_bytes() == b"another audit's file"


def test_target_label_sends_unlabelled_images_to_errors(shards, demo_model_args, tmp_path):
    manifest = run_audit(shards, tmp_path, demo_model_args, ["grad"], "--target", "label")
    errors = read_output(tmp_path / "errors")
    assert [e["image_id"] for e in errors if e["stage"] == "target"] == ["bad-ok"]
    assert manifest["counts"]["grad"]["explained"] == N_GOOD
    rows = read_output(tmp_path / "saliency")
    assert all(r["target"] == r["label"] for r in rows)


@pytest.mark.parametrize("args,message", [
    (["--methods", "sal,nope"], "unknown method(s) nope; known methods:"),
    (["--model", "/missing/model.pt"], "model file not found: /missing/model.pt"),
    (["--input", "/missing/dir/*.tar"], "no input files match /missing/dir/*.tar"),
    (["--method-options", '{"intg": {"steps": 3}}', "--methods", "intg"], "does not take option(s) steps"),
    (["--channels", "3"], "the model rejects input of shape [1, 3, 28, 28]"),
    # the contract's "unreadable inputs fail fast": it ran, exit 0, one errors/ row and nothing audited
    (["--input", "JUNK"], "no image of the input can be read: 1 record(s), the first file://"),
])
def test_bad_invocations_fail_fast_with_one_line(args, message, shards, demo_model_args, tmp_path):
    base = {"--input": str(shards / "good.tar"), "--methods": "sal", "--output": str(tmp_path / "out"),
            "--model": demo_model_args[1], "--weights": demo_model_args[3]}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    if base["--input"] == "JUNK":  # bytes that are no tar archive, under a shard's name
        base["--input"] = str(tmp_path / "junk.tar")
        (tmp_path / "junk.tar").write_bytes(bytes(range(256)) * 12)
    if base["--model"].startswith("/"):
        del base["--weights"]
    argv = [item for pair in base.items() for item in pair]
    proc = subprocess.run([sys.executable, "-m", "saliency_audit.pipelines.audit", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("saliency-audit")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
