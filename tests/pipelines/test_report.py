"""The HTML report: its content, and a real headless Chromium that renders it and loads its images.

Without Chromium the browser tests are skipped, unless SALIENCY_AUDIT_REQUIRE_BROWSER is
set (CI sets it), in which case a missing browser is a failure.
"""
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from audit_fixtures import shared_audit
from PIL import Image

from saliency_audit.explainers.gradient.saliency import UNSIGNED_CLASS_BLIND
from saliency_audit.pipelines import cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless flags that keep Chromium off the (closed) network and out of the user's profile.
QUIET = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length, broken: broken, svgs: document.querySelectorAll("svg").length,
    sections: Array.from(document.querySelectorAll("section")).map(s => s.id)}));
});
</script>"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_audit(tmp_path_factory)


@pytest.fixture(scope="module")
def report(shared, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert cli.main(["report", str(shared.output), "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def browser():
    path = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if path is None:
        message = f"no Chromium found (looked for {', '.join(BROWSERS)})"
        if os.environ.get("SALIENCY_AUDIT_REQUIRE_BROWSER"):
            pytest.fail(message + " and SALIENCY_AUDIT_REQUIRE_BROWSER is set")
        pytest.skip(message + "; install chromium, or set SALIENCY_AUDIT_REQUIRE_BROWSER=1 to fail instead")
    return path


def chromium(browser, profile, *args):
    proc = subprocess.run([browser, *QUIET, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_is_self_contained_and_complete(report, shared):
    text = report.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text)   # nothing fetched from anywhere
    assert not re.search(r'<(link|script)\b', text)
    images = re.findall(r'<img src="([^"]*)"', text)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert len(images) < 400 and len(text) < 3_000_000      # galleries are capped
    for heading in ("Methods", "Per class", "Sanity check", "Galleries by class", "Worst and best by faithfulness",
                    "Metric distributions", "ABELE relevance curves", "Rules and exemplars", "Errors", "The run"):
        assert f">{heading}</h2>" in text, heading
    assert re.search(r"<td>edge</td>.*?FLAGGED", text, re.S)           # the model-blind method
    assert "top superpixels" in text and "r2 " in text                 # lime's explanation
    assert "broken" in text and "cannot decode png" in text            # the errors table
    assert shared.manifest["run_id"] in text and "normalised per image for display only" in text


def test_a_flag_raised_by_the_method_s_nature_comes_with_its_words(report, shared):
    """sal's |gradient| is class-blind by nature: its random logit flag carries the words that say so;
    the signed grad passes, and the edge detector's flags (a defect to catch) carry no excuse."""
    methods, verdicts = shared.manifest["methods"], shared.manifest["sanity"]["methods"]
    assert methods["sal"]["caveats"] == {"random_logit": UNSIGNED_CLASS_BLIND} and methods["grad"]["caveats"] == {}
    assert verdicts["sal"]["random_logit_flagged"] and not verdicts["grad"]["random_logit_flagged"]
    text = report.read_text()
    sanity = text.split('<section id="sanity">')[1].split("</section>")[0]
    rows = {re.match(r"<tr><td>([^<]*)</td>", row).group(1): row
            for row in re.findall(r"<tr><td>[^<]*</td>.*?</tr>", sanity)}
    words = html.escape(UNSIGNED_CLASS_BLIND)
    images = len(shared.manifest["sanity"]["images"])
    assert re.search(rf"FLAGGED: maps do not depend on the class \(on {images} images\)</span> <span class=\"note\">"
                     + re.escape(words), rows["sal"])
    assert f"passed (on {images} images)" in rows["grad"]  # every verdict says how many images it rests on
    assert "FLAGGED" in rows["edge"] and 'class="note"' not in rows["edge"] and 'class="note"' not in rows["grad"]
    assert sanity.count(words) == 1  # (the manifest shown at the end holds them too)


def test_chromium_renders_the_report_and_loads_every_image(browser, report, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(browser, tmp_path / "profile", "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-1000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["broken"] == [] and result["images"] > 100, result
    assert result["svgs"] >= 10 and "galleries" in result["sections"] and "sanity" in result["sections"]


def test_chromium_screenshot_of_the_report(browser, report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(browser, tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1600, 1280, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100       # text, tables and colours, not a blank page
    assert (image < 128).all(axis=2).mean() > 0.005                   # some dark ink


def test_flattened_exemplars_become_images():
    from saliency_audit.pipelines.reporting.render import flattened_images
    values = np.concatenate([np.zeros(6), np.arange(6.0)])  # two 2x3 grey images
    images = flattened_images(values, 2, 3)
    assert len(images) == 2 and images[0].shape == (2, 3, 3)
    assert images[0].max() == 0 and images[1][1, 2].tolist() == [255, 255, 255]
    assert flattened_images(values[:5], 2, 3) is None and flattened_images([], 2, 3) is None


def test_demo_defaults_run_the_literature_s_methods_with_the_bundled_aae(tmp_path, monkeypatch):
    from saliency_audit.pipelines import audit
    seen = []
    monkeypatch.setattr(audit, "main", lambda argv: seen.append(argv) or 3)  # stop before the run
    assert cli.main(["demo", "--output", str(tmp_path)]) == 3

    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    methods = value(seen[0], "--methods").split(",")
    assert methods[:6] == ["abele", "lime", "sal", "elrp", "grad", "intg"]  # ABELE's figure's columns
    assert {"anchor", "lore", "deeplift"} <= set(methods)
    assert value(seen[0], "--aae") == str(cli.DEMO_AAE) and cli.DEMO_AAE.is_file()
    # the default demo is small: 24 digits, a sanity check on 4, the black-box methods at small budgets
    assert value(seen[0], "--limit-per-shard") == "24" and value(seen[0], "--sanity-images") == "4"
    assert json.loads(value(seen[0], "--method-options")) == cli.DEMO_BUDGETS
    assert set(cli.DEMO_BUDGETS) == {"abele", "lime", "anchor", "lore"}
    assert cli.main(["demo", "--output", str(tmp_path), "--methods", "sal", "--limit-per-shard", "300"]) == 3
    assert "--aae" not in seen[1] and value(seen[1], "--limit-per-shard") == "300"
    assert "--method-options" not in seen[1]  # no budget for a method that is not run: run would refuse it
    # --full: today's comparison, every method at its defaults
    assert cli.main(["demo", "--output", str(tmp_path), "--full"]) == 3
    assert value(seen[2], "--limit-per-shard") == "100" and value(seen[2], "--sanity-images") == "8"
    assert "--method-options" not in seen[2] and value(seen[2], "--methods") == cli.DEMO_METHODS
    # the user's --method-options go over the demo's budgets, method by method
    assert cli.main(["demo", "--output", str(tmp_path), "--method-options", '{"lime": {"n_samples": 50}}']) == 3
    assert json.loads(value(seen[3], "--method-options"))["lime"] == {"n_samples": 50}
    assert json.loads(value(seen[3], "--method-options"))["abele"] == cli.DEMO_BUDGETS["abele"]


@pytest.mark.slow
def test_demo_ends_with_a_report_and_a_figure(tmp_path, capsys):
    assert cli.main(["demo", "--output", str(tmp_path), "--methods", "sal,grad", "--no-metrics",
                     "--no-sanity-check"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path}/report.html" in printed and f"figure: {tmp_path}/figure.png" in printed
    assert "<img" in (tmp_path / "report.html").read_text()
    from saliency_audit.pipelines.reporting.figure import figure_size
    assert Image.open(tmp_path / "figure.png").size == figure_size(2, 2, 112)  # a 9 and a 0, two methods


def test_cost_warnings_hold_the_run_to_preflights_figures():
    from saliency_audit.pipelines.reporting.report import cost_warnings
    manifest = {"model": {"device": "cpu", "device_check": "cpu"},
                "methods": {"sal": {"preflight_ms_per_image": 10.0}, "intg": {"preflight_ms_per_image": 100.0},
                            "grad": {}},
                "counts": {m: {"explained": 10_000} for m in ("sal", "intg", "grad")}}
    overall = {"sal": {"mean_time_ms": 40.0}, "intg": {"mean_time_ms": 120.0}, "grad": {"mean_time_ms": 5.0}}
    lines = cost_warnings(manifest, overall)
    # sal: 4 x its promise, 300 s over; intg: 1.2 x (within the tolerance); grad: no promise recorded
    assert len(lines) == 2 and lines[0].startswith("sal: explaining took 40 ms per image, 4 x the 10 ms")
    assert "5:00 longer than promised" in lines[0] and "In all, explaining took 26:40 against the 18:20" in lines[1]
    small = {**manifest, "counts": {m: {"explained": 100} for m in ("sal", "intg", "grad")}}
    assert cost_warnings(small, overall) == []  # 3 s over: a small run's cold first batch is no news
    elsewhere = {**manifest, "model": {"device": "cuda", "device_check": "cpu"}}
    assert cost_warnings(elsewhere, overall) == []  # timed on the launcher's CPU, run on the workers' GPU
