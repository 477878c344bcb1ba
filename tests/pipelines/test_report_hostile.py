"""Hostile values in an audit (image ids, sources, error reasons, paths in the manifest) reach
report.html and diff.html as text, never as markup; unreadable shards become placeholders."""
from __future__ import annotations

import logging
import tarfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from audit_fixtures import MODEL_ARGS
from conftest import DEMO_DATA, add_member

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting import audit_dir
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.diff import diff_audits
from saliency_audit.pipelines.reporting.figure import comparison_figure
from saliency_audit.pipelines.reporting.report import Report, write_report

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
# Tar member keys stop at the first dot of the file name, so none of these has one.
HOSTILE_IDS = [SCRIPT, IMG, "it's \"quoted\" 'twice'", "</style><style>body{display:none}",
               "javascript:alert(1)", "fish & chips &amp; &lt;b&gt;", "\u65e5\u672c-\u00e9-\u202eevil-\U0001f600",
               "x" * 300]
# An error reason with markup: a sample whose only member has a hostile extension, and a bad label.
BAD_EXTENSION = "<svg onload=alert(1)>"
BAD_LABEL = "<b onclick=alert(1)>"
METHODS = ("sal", "grad", "lime")


def build_shard(path: Path, ids: list[str], bad_names: tuple[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src, tarfile.open(path, "w") as dst:
        members = src.getmembers()
        for key, (image, label) in zip(ids, zip(members[0::2], members[1::2])):
            add_member(dst, f"{key}.png", src.extractfile(image).read())
            add_member(dst, f"{key}.cls", src.extractfile(label).read())
        add_member(dst, f"no-image.{bad_names[0]}", b"x")
        add_member(dst, "bad-label.png", src.extractfile(members[0]).read())
        add_member(dst, "bad-label.cls", bad_names[1].encode())
    return path


def run(root: Path, ids: list[str], bad_names: tuple[str, str]) -> Path:
    shard = build_shard(root / "shards" / "s.tar", ids, bad_names)
    output = root / "out"
    audit.run(["--input", str(shard), *MODEL_ARGS, "--methods", ",".join(METHODS), "--output", str(output),
               "--channels", "1", "--device", "cpu", "--batch-size", "16", "--metric-steps", "4",
               "--method-options", '{"lime": {"n_samples": 40}}'])
    return output


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """The same digits twice: under plain ids, and under hostile ids in a hostile directory."""
    clean = run(tmp_path_factory.mktemp("clean"), [f"img-{i}" for i in range(len(HOSTILE_IDS))],
                ("txt", "not a number"))
    hostile_root = tmp_path_factory.mktemp("hostile") / 'dir"><svg onload=alert(1)>&amp'
    hostile = run(hostile_root, HOSTILE_IDS, (BAD_EXTENSION, BAD_LABEL))
    return clean, hostile


class Markup(HTMLParser):
    """The elements of a page by tag, its (tag, attribute) pairs and links, and its text with
    entities resolved."""

    def __init__(self, document: str):
        super().__init__(convert_charrefs=True)
        self.pairs: set[tuple[str, str]] = set()
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []
        self.urls: list[str] = []
        self.feed(document)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        for name, value in attrs:
            self.pairs.add((tag, name))
            if name in ("src", "href", "action", "formaction", "xlink:href"):
                self.urls.append(value or "")

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def assert_inert(document: str, clean_document: str, expected: list[str]) -> None:
    page, clean = Markup(document), Markup(clean_document)
    assert "script" not in page.tags
    assert not [name for _, name in page.pairs if name.startswith("on")]
    # the same elements, but for histogram bars: ids seed lime's samples, so its metrics, and the
    # number of non-empty bins, differ between the two runs
    tags, clean_tags = page.tags - Counter(rect=page.tags["rect"]), clean.tags - Counter(rect=clean.tags["rect"])
    assert tags == clean_tags, (tags - clean_tags, clean_tags - tags)
    assert page.pairs <= clean.pairs, page.pairs - clean.pairs
    text = "".join(page.text)
    for value in expected:
        assert value in text, value[:60]
    # every link is an embedded image or an anchor on the page
    assert all(url.startswith(("data:image/png;base64,", "#")) for url in page.urls), page.urls


def test_report_shows_hostile_values_as_text(audits, tmp_path):
    clean, hostile = audits
    write_report(str(clean), str(tmp_path / "clean.html"), per_class=20, extremes=20)
    write_report(str(hostile), str(tmp_path / "hostile.html"), per_class=20, extremes=20)
    document = (tmp_path / "hostile.html").read_text()
    assert ">Worst and best by faithfulness</h2>" in document and ">Rules and exemplars</h2>" in document
    assert_inert(document, (tmp_path / "clean.html").read_text(),
                 [*HOSTILE_IDS, BAD_EXTENSION, BAD_LABEL, str(hostile.parent / "shards" / "s.tar")])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document


def test_diff_page_shows_hostile_values_as_text(audits, tmp_path):
    clean, hostile = audits
    diff_audits(str(clean), str(clean), str(tmp_path / "clean"), show=100)
    diff_audits(str(hostile), str(hostile), str(tmp_path / "hostile"), show=100)
    assert_inert((tmp_path / "hostile" / "diff.html").read_text(), (tmp_path / "clean" / "diff.html").read_text(),
                 [*HOSTILE_IDS, str(hostile)])


def test_figure_draws_hostile_ids(audits):
    _, hostile = audits
    image = comparison_figure(AuditDir(str(hostile)), HOSTILE_IDS, ["sal", "lime"], cell=32)
    assert image.size[1] == 24 + 32 * len(HOSTILE_IDS)


# ---- unreadable shards ----

class ClientError(Exception):
    """Shaped like botocore's: not an OSError."""


@pytest.mark.parametrize("failure", [PermissionError("Access Denied"), ClientError("NoSuchBucket"),
                                     RuntimeError("connection pool is closed")])
def test_unreachable_shards_become_placeholders(audits, tmp_path, monkeypatch, caplog, failure):
    clean, _ = audits

    def unreachable(url, storage_options=None, **kwargs):
        raise failure
        yield  # a generator, like the real reader

    monkeypatch.setattr(audit_dir, "read_shard", unreachable)
    with caplog.at_level(logging.WARNING, logger="saliency_audit"):
        write_report(str(clean), str(tmp_path / "r.html"))
        figure = comparison_figure(AuditDir(str(clean)), ["img-0", "img-1"], ["sal"], cell=32)
    assert figure.size == (150 + 2 * 32, 24 + 2 * 32)
    assert "img-0: image not readable" in (tmp_path / "r.html").read_text()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("s.tar" in w and str(failure) in w for w in warnings), warnings  # report, figure
    assert all("\n" not in w for w in warnings)


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_missing_or_corrupt_shard_gives_placeholders_and_one_warning(audits, tmp_path, caplog, damage):
    clean, _ = audits
    shard = clean.parent / "shards" / "s.tar"
    saved = shard.read_bytes()
    try:
        if damage == "deleted":
            shard.unlink()
        else:
            shard.write_bytes(b"\x00garbage" * 100)
        with caplog.at_level(logging.WARNING, logger="saliency_audit"):
            report = Report(AuditDir(str(clean)))
            document = report.html()
    finally:
        shard.write_bytes(saved)
    assert not report.thumbs.images and "img-0: image not readable" in document
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "s.tar" in warnings[0], warnings
