"""Findings of a hostile review of the trust fixes, each pinned:

* credentials in path-valued method options (abele's aae, expected_gradients' background) are
  refused at plan time without being repeated, and a method option file that cannot be read
  (an unreachable S3 background) fails preflight in one line;
* a top_k fraction that rounds to every pixel of a map is refused, by run and by check;
* a baseline corrupted in the middle of a file (footer intact) fails before any work, naming the
  file; ``check`` of an audit whose own files are unreadable fails, never passes;
* gates asked for that no method can be judged by (control maps only) fail, never vanish;
* a presigned model URL (a ?query) never crashes, is never printed, leaves no temporary file;
  an --input with a query is not printed with it;
* the output paths of check, report, figure and diff are refused with credentials in them.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_DATA

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.checks import gates

SHARD = DEMO_DATA / "mnist-test-sample.tar"
MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn",
         "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
SECRET = "SEKRET-51c0"


def argv(output: Path | str, *extra: str, methods: str = "sal,grad", model=MODEL) -> list[str]:
    return ["--input", str(SHARD), *model, "--methods", methods, "--channels", "1", "--device", "cpu",
            "--limit-per-shard", "4", "--batch-size", "4", "--torch-threads", "1", "--metric-steps", "4",
            "--output", str(output), *extra]


@pytest.fixture(scope="module")
def audits(tmp_path_factory) -> SimpleNamespace:
    """An audit of sal and grad, and two of the control maps only."""
    root = tmp_path_factory.mktemp("trust")
    for name, methods in (("base", "sal,grad"), ("ctrl", "random,sobel"), ("ctrl_base", "random,sobel")):
        assert audit.main(argv(root / name, methods=methods)) == 0
    return SimpleNamespace(root=root, base=root / "base", ctrl=root / "ctrl", ctrl_base=root / "ctrl_base")


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def leaked(capsys_text: str) -> bool:
    return SECRET in capsys_text


# --- 3. path-valued method options ---------------------------------------------------------------

@pytest.mark.parametrize("methods,options", [
    ("abele", {"abele": {"aae": f"s3://AKIA:{SECRET}@bucket/a.pt"}}),
    ("expected_gradients", {"expected_gradients": {"background": f"s3://AKIA:{SECRET}@bucket/bg.npy"}}),
    ("expected_gradients", {"expected_gradients": {"background": f"https://tok{SECRET}@host/bg.npy"}}),
])
def test_credentials_in_a_path_valued_method_option_are_refused_unrepeated(methods, options, tmp_path, capsys,
                                                                           caplog):
    code = audit.main(argv(tmp_path / "out", "--method-options", json.dumps(options), methods=methods))
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "credentials" in err[0], err
    assert SECRET not in captured.out + captured.err + caplog.text
    assert not (tmp_path / "out").exists()


def test_a_method_option_file_that_cannot_be_read_fails_preflight_in_one_line(tmp_path, capsys, monkeypatch):
    """An S3 background behind an endpoint nothing answers on: botocore's errors are no OSError."""
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    options = {"expected_gradients": {"background": "s3://bucket/bg.npy?X-Amz-Signature=" + SECRET, "n_samples": 2}}
    code = audit.main(argv(tmp_path / "out", "--method-options", json.dumps(options), methods="expected_gradients"))
    lines = error_lines(capsys)
    err = [line for line in lines if line.startswith("saliency-audit")]  # botocore logs its credential lookup
    assert code == 2 and len(err) == 1 and not any("Traceback" in line for line in lines), lines
    assert "background" in err[0] and "s3://bucket/bg.npy" in err[0], err
    assert SECRET not in "".join(lines)


# --- 4. a top_k fraction that is every pixel -------------------------------------------------------

def test_a_top_k_fraction_that_rounds_to_every_pixel_is_refused_by_run(tmp_path, capsys):
    assert audit.main(argv(tmp_path / "out", "--gate", "top_k=0.9995")) == 2  # round(0.9995 * 784) = 784
    err = error_lines(capsys)
    assert len(err) == 1 and "top_k" in err[0] and "784" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_top_k_fraction_that_rounds_to_every_pixel_is_refused_by_check(audits, capsys):
    assert cli.main(["check", str(audits.base), "--gate", "top_k=0.9995"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "top_k" in err[0], err
    assert cli.main(["check", str(audits.base), "--gate", "top_k=0.998"]) == 0  # 782 of 784: some left out


# --- 5. files corrupted in the middle -----------------------------------------------------------

def corrupt_maps(audit_dir: Path) -> str:
    """Garbage over the middle of the saliency column of the audit's first saliency file, its
    footer intact (it still opens as Parquet); returns the file, relative to the audit."""
    relative = json.loads((audit_dir / "manifest.json").read_text())["files"]["saliency"][0]
    path = audit_dir / relative
    metadata = pq.ParquetFile(path).metadata
    group = metadata.row_group(0)
    chunk = next(group.column(i) for i in range(group.num_columns)
                 if group.column(i).path_in_schema.split(".")[0] == "saliency")
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    size = chunk.total_compressed_size
    data = bytearray(path.read_bytes())
    data[start + size // 4:start + 3 * size // 4] = bytes((i * 151 + 7) % 256 for i in range(size // 2))
    path.write_bytes(bytes(data))
    assert "saliency" in pq.ParquetFile(path).schema_arrow.names  # the footer still reads
    return relative


def test_a_baseline_corrupted_in_the_middle_fails_before_any_work_naming_the_file(audits, tmp_path, capsys):
    baseline = tmp_path / "baseline"
    shutil.copytree(audits.base, baseline)
    relative = corrupt_maps(baseline)
    code = audit.main(argv(tmp_path / "out", "--baseline", str(baseline)))
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and relative in err[0], err
    assert not (tmp_path / "out").exists()


def test_check_of_an_audit_whose_own_maps_are_corrupt_fails_naming_the_file(audits, tmp_path, capsys):
    own = tmp_path / "own"
    shutil.copytree(audits.base, own)
    relative = corrupt_maps(own)
    assert cli.main(["check", str(own)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and relative in err[0], err


def test_a_verdict_that_cannot_be_evaluated_names_the_file_and_the_baselines_run(audits, tmp_path):
    """When the gates fail at the end of a run (the baseline damaged after the run started), the
    verdict still names the baseline's run (its manifest reads) and the file that does not."""
    baseline = tmp_path / "baseline"
    shutil.copytree(audits.base, baseline)
    relative = corrupt_maps(baseline)
    manifest = json.loads((audits.ctrl / "manifest.json").read_text())
    args = SimpleNamespace(gates=[("error_rate", 0.5)], baseline=str(baseline))
    code, verdict = gates.judge_run(manifest, args, None)
    assert code == gates.FAILED_CHECK and relative in verdict["error"]
    assert verdict["baseline"]["run_id"] == json.loads((baseline / "manifest.json").read_text())["run_id"]


# --- 6. asked-for gates on an audit of control maps only ------------------------------------------

def test_asked_gates_without_any_result_fail_as_cannot_be_judged(audits, capsys):
    code = cli.main(["check", str(audits.ctrl), "--gate", "deletion_vs_random=0.8", "--gate",
                     "rank_correlation=0.9", "--baseline", str(audits.ctrl_base)])
    out = capsys.readouterr().out
    assert code == 1, out
    verdict = json.loads((audits.ctrl / "verdict.json").read_text())
    assert {"deletion_vs_random", "rank_correlation"} <= set(verdict["failed"])
    for name in ("deletion_vs_random", "rank_correlation"):
        found = [g for g in verdict["gates"] if g["name"] == name]
        assert found and all(g["status"] == "fail" and "cannot be judged" in g["reason"] for g in found), found
    (audits.ctrl / "verdict.json").unlink()


# --- 8. presigned URLs ----------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    """A local HTTP server over a folder holding m.pt (the demo weights)."""
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(DEMO_DATA / "mnist_cnn.pt", folder / "m.pt")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def temporary_files() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir()}


def test_presigned_weights_fail_in_one_line_without_the_signature_or_a_temporary_file(served, tmp_path, capsys,
                                                                                      caplog):
    before = temporary_files()
    model = [*MODEL[:2], "--weights", f"{served}/m.pt?X-Amz-Signature={SECRET}"]
    code = audit.main(argv(tmp_path / "out", model=model))
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and f"{served}/m.pt" in err[0], err
    assert SECRET not in captured.out + captured.err + caplog.text
    assert not [name for name in temporary_files() - before if "X-Amz" in name or SECRET in name]


def test_a_local_copy_takes_its_suffix_from_the_path_and_is_always_removed(served):
    from saliency_audit.transforms.model.load import _local_copy
    before = temporary_files()
    with _local_copy(f"{served}/m.pt?X-Amz-Signature={SECRET}", None) as path:
        assert path.endswith(".pt") and SECRET not in path and Path(path).stat().st_size > 0
    with pytest.raises(Exception) as raised, _local_copy(f"{served}/gone.pt?X-Amz-Signature={SECRET}", None):
        pass
    assert SECRET not in str(raised.value)
    assert temporary_files() - before == set()


def test_an_input_with_a_query_is_named_without_it(tmp_path, capsys):
    code = audit.main(["--input", f"{tmp_path}/missing.tar?sig={SECRET}", *MODEL, "--methods", "sal",
                       "--channels", "1", "--output", str(tmp_path / "out")])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and "missing.tar" in err[0] and SECRET not in err[0], err


# --- 9. output paths of the other commands --------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["check", "{base}", "--verdict", "memory://u:{secret}@h/v.json"],
    ["report", "{base}", "--output", "memory://u:{secret}@h/r.html"],
    ["diff", "{base}", "{base}", "--output", "memory://u:{secret}@h/d"],
    ["figure", "{base}", "--ids", "mnist-test-000000", "--output", "memory://u:{secret}@h/f.png"],
], ids=["check", "report", "diff", "figure"])
def test_output_paths_with_credentials_are_refused_unrepeated(audits, command, capsys):
    memory = fsspec.filesystem("memory")
    argv = [part.format(base=audits.base, secret=SECRET) for part in command]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exit for report, figure and diff
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and "credentials" in captured.err, captured
    assert SECRET not in captured.out + captured.err
    assert not [p for p in memory.find("/") if "h/" in p or SECRET in p]
