"""The report holds a run to what --dry-run promised: preflight's warm timing of each method on the
sample image (the plan's "explain ms", kept in the manifest as methods.NAME.preflight_ms_per_image).
A run whose explanations took more than COST_TOLERANCE times that gets a warning in the report; one
that did not, or an older audit whose manifest holds no such figure, gets none."""
import json
import re

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.job import preflight
from saliency_audit.pipelines.reporting import report


def _run_and_report(tmp_path, monkeypatch, demo_shard, demo_model_args, promised_s: float,
                    edit=None) -> tuple[dict, str]:
    """A small audit (sal, 8 images) whose preflight timed every method at ``promised_s``, its
    manifest changed by ``edit``, and the warnings of its report (the escaped text of their items)."""
    monkeypatch.setattr(preflight, "_seconds", lambda call, device, threads=None: promised_s)
    monkeypatch.setattr(report, "COST_MIN_EXCESS_S", 0.0)  # 8 images cannot take a minute longer
    out = tmp_path / "out"
    manifest = audit.run(["--input", str(demo_shard), *demo_model_args, "--methods", "sal", "--channels", "1",
                          "--limit-per-shard", "8", "--no-metrics", "--device", "cpu", "--output", str(out)])
    if edit:
        manifest = edit(json.loads((out / "manifest.json").read_text()))
        (out / "manifest.json").write_text(json.dumps(manifest))
    page = tmp_path / "report.html"
    assert cli.main(["report", str(out), "--output", str(page)]) == 0
    box = re.search(r'<div class="warnings">.*?</div>', page.read_text(), re.S)
    return manifest, box.group(0) if box else ""


def test_a_run_slower_than_promised_is_warned_about(tmp_path, monkeypatch, demo_shard, demo_model_args,
                                                     one_torch_thread):
    manifest, warnings = _run_and_report(tmp_path, monkeypatch, demo_shard, demo_model_args, 1e-6)
    assert manifest["methods"]["sal"]["preflight_ms_per_image"] == 0.001  # the run records the promise
    # the figures to three digits, as the table shows them (the promise is not "0.0 ms"), and a cause the
    # manifest can name: the method's batches cut after running out of memory
    halved = {**manifest, "execution": {"batch_sizes_after_out_of_memory": {"sal": 2}}}
    lines = report.cost_warnings(halved, {"sal": {"mean_time_ms": 1.0}})
    assert lines[0].startswith("sal: explaining took 1 ms per image, 1,000 x the 0.001 ms preflight timed")
    assert lines[0].endswith("Its batches were cut to 2 image(s) after running out of memory.")
    assert "sal: explaining took" in warnings and "x the 0.001 ms preflight timed" in warnings
    assert "--dry-run&#x27;s explain ms" in warnings and "Usual causes:" in warnings  # escaped, with the causes


def test_a_run_within_its_promise_is_not(tmp_path, monkeypatch, demo_shard, demo_model_args, one_torch_thread):
    manifest, warnings = _run_and_report(tmp_path, monkeypatch, demo_shard, demo_model_args, 1000.0)
    assert manifest["methods"]["sal"]["preflight_ms_per_image"] == 1e6 and "explaining took" not in warnings


def test_an_older_audit_without_the_promise_reports_without_warning(tmp_path, monkeypatch, demo_shard,
                                                                    demo_model_args, one_torch_thread):
    def older(manifest):  # as runs wrote it before preflight timed the methods
        for info in manifest["methods"].values():
            del info["preflight_ms_per_image"]
        return manifest
    _, warnings = _run_and_report(tmp_path, monkeypatch, demo_shard, demo_model_args, 1e-6, older)
    assert "explaining took" not in warnings
