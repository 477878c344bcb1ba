"""Review of the storage-option redaction (4695cdc, e5193e4): what it may not garble."""
import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from saliency_audit.explainers.core import paths
from saliency_audit.pipelines.reporting import report


def test_a_short_credential_value_does_not_break_the_report_s_embedded_images(monkeypatch, tmp_path):
    # "s3v4" under signature_version counts as a credential (4 characters are enough under such a name),
    # and any 4 characters occur by chance in about 6% of each MB of base64: a PNG there lost bytes
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    paths.keep_secret({"config_kwargs": {"signature_version": "s3v4"}})
    payload = "iVBORw0KGgoAAs3v4AAA"  # a PNG's base64 that happens to hold it
    base64.b64decode(payload, validate=True)
    document = f'<p>signature s3v4</p><img src="data:image/png;base64,{payload}">'

    class Page:
        def __init__(self, *args, **kwargs):
            pass

        def html(self):
            return document
    monkeypatch.setattr(report, "Report", Page)
    monkeypatch.setattr(report, "AuditDir", Page)
    out = report.write_report(str(tmp_path), str(tmp_path / "r.html"))
    page = open(out).read()
    assert f"base64,{payload}" in page and "signature &lt;redacted&gt;" in page  # the text still redacted


def test_a_log_line_through_a_handler_made_before_the_command_is_redacted(monkeypatch, capsys):
    # importing Beam leaves the root logger a StreamHandler on the stderr of that moment; only `run`
    # replaces it (basicConfig(force=True)): report, check, diff and history log through it
    import argparse
    import json
    import logging
    import sys

    from saliency_audit.pipelines import cli
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])

    def history(argv):  # as history.py's "history %s: %s is unreadable (%s)" of a storage error
        parser = argparse.ArgumentParser()
        cli._storage_options(parser)
        endpoint = parser.parse_args(argv).storage_options["endpoint_url"]
        logging.getLogger("saliency_audit").warning("history: run.json is unreadable (Connection was closed "
                                                    "before we received a valid response from endpoint URL: "
                                                    "'%s')", endpoint)
        return 0
    monkeypatch.setitem(cli.COMMANDS, "history", (history, "list the runs"))
    assert cli.main(["history", "--storage-options", json.dumps({"endpoint_url": "http://h/CANARY-7f3a9c2e/"})]) == 0
    err = capsys.readouterr().err
    assert "is unreadable" in err and "CANARY" not in err


def test_gcsfs_token_modes_are_no_secret(monkeypatch):
    # gcsfs's token takes a mode as well as a credential: {"token": "anon"} is how a public bucket is
    # read; as a 4-character credential "anon" was cut out of every word holding it
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    paths.keep_secret({"token": "anon", "other": {"token": "cloud"}})
    assert paths.redact("gs://b/canonical/x.tar: cloud storage") == "gs://b/canonical/x.tar: cloud storage"
    paths.keep_secret({"token": "ya29.a0AfH6SMC"})  # an access token stays a secret
    assert paths.redact("token ya29.a0AfH6SMC") == "token <redacted>"


def test_a_region_or_project_in_a_bucket_name_is_not_cut_out_of_paths(monkeypatch):
    # buckets are often named after their project or region; the paths in stdout, `history --json`
    # and the report then lose that part (valid JSON, a wrong path for a script that reads it)
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    paths.keep_secret({"project": "acme-ml-prod", "client_kwargs": {"region_name": "eu-west-1"}})
    for path in ("gs://acme-ml-prod-audits/run", "s3://data-eu-west-1/shards/a.tar"):
        assert paths.redact(path) == path


def test_a_worker_s_log_entry_as_the_launcher_prints_it_holds_no_secret(monkeypatch):
    # Beam's launcher logs each worker log entry as str(LogEntry): protobuf's text format, which escapes
    # quotes and writes non-ASCII bytes in octal, forms of a password that no other quoting gives
    from apache_beam.portability.api import beam_fn_api_pb2
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    monkeypatch.setattr(paths, "_redirect_streams", lambda: ((None, None), []))  # pytest owns the streams
    password = "pä'ss\"wörd\\€-123"
    paths.keep_secret({"secret": password})
    entry = beam_fn_api_pb2.LogEntry(message=f"ConnectionClosedError: http://user:{password}@host/b")
    line = str(entry).replace("\n", " ")
    assert password not in line and "123" in line  # the entry really holds it, escaped
    assert "123" not in paths.redact(line) and paths.REDACTED in paths.redact(line)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=24))
def test_the_text_format_escape_is_protobuf_s(text):
    from google.protobuf import text_encoding
    for utf8 in (False, True):
        assert paths._c_escaped(text, utf8) == text_encoding.CEscape(text.encode(), as_utf8=utf8)


def test_a_process_without_a_stderr_keeps_warning_and_logging_once_it_holds_a_secret():
    # pythonw, a service without a console: sys.stderr is None, which print, warnings and logging skip.
    # Registering a storage option outside a command wraps the streams for good: None must stay None
    import subprocess
    import sys
    code = ("import sys, warnings, logging; sys.stderr = None\n"
            "from saliency_audit.explainers.core.paths import keep_secret\n"
            "keep_secret({'key': 's3cr3t-value-123'})\n"
            "warnings.warn('a warning'); logging.getLogger('x').warning('a log line'); print('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr[-1000:]
