"""The report of an incremental audit shows its history: the slots, and per method the trend of
the statistics the gates judge (issue 14 point 3). History rows are other runs' writing: text only."""
from __future__ import annotations

import re
import shutil
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import add_member

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting.html import number
from saliency_audit.pipelines.reporting.report import HISTORY_STATISTICS, write_report
from saliency_audit.transforms.io import history, storage

pytestmark = pytest.mark.slow  # several incremental audits

SLOTS = ("2026-11-01", "2026-11-02", "2026-11-03")
METHODS = ("sal", "grad")
SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


def audit_args(shards: Path, output: Path, demo_model_args: list[str]) -> list[str]:
    return ["--input", str(shards / "*.tar"), *demo_model_args, "--methods", ",".join(METHODS), "--channels", "1",
            "--output", str(output), "--torch-threads", "1", "--batch-size", "8", "--metric-steps", "4"]


@pytest.fixture(scope="module")
def audits(tmp_path_factory, demo_shard, demo_model_args):
    """Three scheduled slots over a growing input (one new shard of 8 digits each), and a plain
    audit of the first shard."""
    root = tmp_path_factory.mktemp("history")
    shards, output = root / "shards", root / "out"
    shards.mkdir()
    manifests = []
    with tarfile.open(demo_shard) as src:
        members = src.getmembers()[:48]  # .png + .cls per digit
        for k, slot in enumerate(SLOTS):
            with tarfile.open(shards / f"part-{k}.tar", "w") as dst:
                for member in members[k * 16:(k + 1) * 16]:
                    add_member(dst, member.name, src.extractfile(member).read())
            manifests.append(audit.run([*audit_args(shards, output, demo_model_args), "--incremental",
                                        "--slot", slot]))
    plain = root / "plain"
    single = root / "single"
    single.mkdir()
    shutil.copy(shards / "part-0.tar", single / "part-0.tar")
    audit.run(audit_args(single, plain, demo_model_args))
    return {"root": root, "output": output, "plain": plain, "run_ids": [m["run_id"] for m in manifests]}


def report_of(directory: Path, name: str = "report.html") -> str:
    path = directory.parent / f"{directory.name}-{name}"
    write_report(str(directory), str(path))
    return path.read_text()


def history_section(page: str) -> str:
    found = re.search(r'<section id="history">.*?</section>', page, re.S)
    assert found, "the page has no History section"
    return found.group(0)


def slot_rows(section: str) -> list[str]:
    """The rows of the section's first table (one per slot)."""
    return re.findall(r"<tr><td>.*?</tr>", section.split("</table>")[0], re.S)


class Elements(HTMLParser):
    """A page's (tag, attribute) pairs and its text with entities resolved."""

    def __init__(self, document: str):
        super().__init__(convert_charrefs=True)
        self.pairs: set[tuple[str, str]] = set()
        self.text: list[str] = []
        self.feed(document)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.pairs |= {(tag, "")} | {(tag, name) for name, _ in attrs}

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def copy_of(audits, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(audits["output"], copy)
    return copy


def test_history_lists_the_slots_marks_this_run_and_charts_each_statistic_per_method(audits):
    rows = history.read(str(audits["output"]))
    page = report_of(audits["output"])
    section = history_section(page)
    assert page.index('id="history"') < page.index('id="methods"')  # right after the (absent) verdict
    shown = slot_rows(section)
    assert len(shown) == 3
    for row_html, slot, run_id in zip(shown, SLOTS, audits["run_ids"]):
        assert slot in row_html and run_id in row_html
    # The report shows the newest run: its slot, and only its, is marked; no model changed.
    assert ["(this report)" in r for r in shown] == [False, False, True]
    assert "model changed" not in section
    # Slot 3 read only its new shard and skipped the two explained before.
    assert ">1 / 2<" in shown[2] and ">1 / 0<" in shown[0]
    # One chart per statistic that some slot holds, one line per method; sanity was not run: no chart.
    charts = re.findall(r"<svg.*?</svg>", section, re.S)
    held = [(key, title) for key, title, _ in HISTORY_STATISTICS
            if any(m[key] is not None for r in rows for m in r["methods"])]
    assert "sanity_rank_correlation" not in dict(held) and len(held) >= 4
    assert len(charts) == len(held)
    for (key, title), chart in zip(held, charts):
        assert f"<title>{title}".replace("'", "&#x27;") in chart
        assert chart.count("<polyline") == len(METHODS)
        assert all(f">{m}</text>" in chart for m in METHODS)
        assert all(f">{slot}</text>" in chart for slot in SLOTS)
    # The numbers behind the lines, per slot and method.
    for r in rows:
        for m in r["methods"]:
            assert f"<td>{number(m['deletion_auc'])}</td>" in section


def test_history_section_only_where_a_history_is(audits):
    assert 'id="history"' not in report_of(audits["plain"])
    history_section(report_of(audits["output"]))


def test_hostile_history_row_is_shown_as_text(audits, tmp_path):
    copy = copy_of(audits, tmp_path)
    last = history.read(str(copy))[-1]
    methods = [dict(m) for m in last["methods"]]
    methods[0]["method"] = SCRIPT
    run_id = "20261201T000000-deadbeef"  # a run that explained nothing new: no files to point at
    history.record(str(copy), {**last, "slot": "2026-11-04", "run_id": run_id, "model": "f" * 64, "files": [],
                               "manifest": f"_runs/{run_id}/manifest.json", "input": SCRIPT, "verdict": IMG,
                               "gates_failed": [SCRIPT, "it's \"quoted\""], "methods": methods})
    clean = report_of(audits["output"])
    page = report_of(copy)
    section = history_section(page)
    # No element or attribute the clean page lacks; the hostile values are there as text.
    elements = Elements(page)
    assert elements.pairs <= Elements(clean).pairs, elements.pairs - Elements(clean).pairs
    text = "".join(elements.text)
    assert SCRIPT in text and IMG in text and "it's \"quoted\"" in text
    shown = slot_rows(section)
    assert len(shown) == 4 and run_id in shown[3]
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in shown[3]  # the verdict, flagged as not a pass
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, it&#x27;s &quot;quoted&quot;" in shown[3]
    assert ["model changed" in r for r in shown] == [False, False, False, True]
    assert ["(this report)" in r for r in shown] == [False, False, True, False]
    # The hostile method name is a legend entry and a table cell, escaped.
    assert section.count(">&lt;script&gt;alert(1)&lt;/script&gt;</text>") == len(re.findall("<svg", section))
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in section


def test_unreadable_history_files_cost_their_rows_only(audits, tmp_path):
    copy = copy_of(audits, tmp_path)
    (copy / "history" / "2026-11-04.parquet").write_bytes(b"PAR1 not a parquet file")
    shutil.copy(copy / "history" / "2026-11-01.parquet", copy / "history" / "2026-11-05.parquet")  # names slot 1
    section = history_section(report_of(copy))
    assert len(slot_rows(section)) == 3
    assert '<p class="flag">2 file(s) in history/ are left out' in section


def test_history_that_cannot_be_listed_is_a_note_not_a_failed_page(audits, tmp_path, monkeypatch):
    copy = copy_of(audits, tmp_path)
    filesystem = storage.filesystem

    def denied(url, options=None):  # an object store that refuses to list the history's prefix
        if url.rstrip("/").endswith("/history"):
            raise PermissionError("Access Denied <b>listing</b> history/")
        return filesystem(url, options)

    monkeypatch.setattr(storage, "filesystem", denied)
    page = report_of(copy)
    assert ('<p class="flag">The audit history is unreadable: PermissionError: Access Denied &lt;b&gt;listing&lt;/b&gt;'
            in history_section(page))
    assert 'id="methods"' in page and 'id="galleries"' in page
