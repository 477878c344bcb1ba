"""Storage clients quote the values of storage options in their errors (botocore's "Invalid endpoint:
<endpoint_url>", "Provided region_name '<region>'", the endpoint URL of a connection that failed).
No such value may reach stdout, stderr or any file under the output, whatever the option is called:
each test runs the real command against a real backend (a closed port, a local HTTP server that
refuses, moto behind a proxy that drops connections) with canary values and looks for the canary
everywhere."""
import http.server
import json
import logging
import threading

import pytest
from conftest import DEMO_DATA

pytest.importorskip("s3fs")

from saliency_audit.pipelines import cli

CANARY = "CANARY-7f3a9c2e"
FAST = {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights",
         str(DEMO_DATA / "mnist_cnn.pt"), "--channels", "1", "--device", "cpu", "--torch-threads", "1",
         "--no-metrics", "--methods"]  # the methods follow


@pytest.fixture
def fresh(monkeypatch):
    """Test credentials (botocore looks for them before it connects) and logging as in a fresh process."""
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)


def leaks(capsys, out) -> list[str]:
    """Where the canary is: the captured streams, and every file under ``out`` (Parquet bytes included)."""
    captured = capsys.readouterr()
    found = [name for name, text in (("stdout", captured.out), ("stderr", captured.err)) if CANARY in text]
    return found + [str(p.relative_to(out)) for p in sorted(out.rglob("*"))
                    if p.is_file() and CANARY.encode() in p.read_bytes()]


def run_cli(argv, options, out, capsys):
    argv = [a.replace("OUT", str(out)) for a in argv] + ["--storage-options", json.dumps(options)]
    code = cli.main(argv)
    return code, leaks(capsys, out)


# Values botocore or aiobotocore quote back: an endpoint that is no URL (credentials given as user:pass
# without a scheme), an endpoint with a token in its query, an endpoint path, a region of a bad format.
ECHOED = {
    "endpoint-userinfo-no-scheme": {"endpoint_url": f"user:{CANARY}@127.0.0.1:1", **FAST},
    "endpoint-query-token": {"endpoint_url": f"http://127.0.0.1:1/?token={CANARY}", **FAST},
    "endpoint-path-token": {"endpoint_url": f"http://127.0.0.1:1/{CANARY}/", **FAST},
    "nested-client-kwargs": {"endpoint_url": "http://127.0.0.1:1", "client_kwargs": {"region_name": f"r {CANARY}"},
                             **FAST},
}
# Values no client is known to quote (kept as guards): credentials, an unknown option, one of the
# wrong type, user:password@ in an endpoint URL.
QUIET = {
    "credentials": {"endpoint_url": "http://127.0.0.1:1", "key": CANARY, "secret": CANARY, "token": CANARY, **FAST},
    "endpoint-userinfo": {"endpoint_url": f"http://user:{CANARY}@127.0.0.1:1/", **FAST},
    "unknown-option": {"password": CANARY, "bogus": CANARY},
    "wrong-type": {"key": [CANARY], "endpoint_url": "http://127.0.0.1:1", **FAST},
}


@pytest.mark.parametrize("options", [*ECHOED.values(), *QUIET.values()], ids=[*ECHOED, *QUIET])
def test_run_on_unreachable_s3_echoes_no_option_value(options, fresh, tmp_path, capsys):
    code, found = run_cli(["run", "--input", "s3://bucket/x/*.tar", *MODEL, "sal", "--output", "OUT/o"], options,
                          tmp_path, capsys)
    assert code == 2 and found == []


@pytest.mark.parametrize("command", [
    ["run", "--input", str(DEMO_DATA / "mnist-test-sample.tar"), *MODEL, "sal", "--output", "s3://bucket/out"],  # exit 3
    ["run", "--input", str(DEMO_DATA / "mnist-test-sample.tar"), *MODEL, "sal", "--baseline", "s3://bucket/base",
     "--output", "OUT/o"],
    ["run", "--input", str(DEMO_DATA / "mnist-test-sample.tar"), *MODEL, "abele", "--aae",
     "s3://bucket/aae.pt", "--output", "OUT/o"],
    ["report", "s3://bucket/audit", "--output", "OUT/r.html"],
    ["figure", "s3://bucket/audit", "--ids", "a", "--output", "OUT/f.png"],
    ["diff", "s3://bucket/audit", "s3://bucket/other", "--output", "OUT/diff"],
    ["check", "s3://bucket/audit"],
    ["history", "s3://bucket/audit"],
    ["train-classifier", "--input", "s3://bucket/x/*.tar", "--output", "OUT/m.pt"],
    ["train-aae", "--input", "s3://bucket/x/*.tar", "--output", "OUT/a.pt"],
], ids=["run-output", "run-baseline", "run-aae", "report", "figure", "diff", "check", "history", "train-classifier",
        "train-aae"])
def test_every_command_on_a_store_that_quotes_the_endpoint_echoes_nothing(command, fresh, tmp_path, capsys):
    code, found = run_cli(command, ECHOED["endpoint-userinfo-no-scheme"], tmp_path, capsys)
    assert code in (2, 3) and found == []


class _Refusing(http.server.BaseHTTPRequestHandler):
    """403 for /forbid/..., 500 for the rest: an HTTP store that refuses."""

    def do_GET(self):
        self.send_response(403 if self.path.startswith("/forbid/") else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def refusing():
    server = _serve(_Refusing)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("where", ["/forbid/s.tar", "/broken/s.tar", "closed"])
@pytest.mark.parametrize("options", [
    {"headers": {"Authorization": f"Bearer {CANARY}", "X-Api-Key": CANARY}},
    {"client_kwargs": {"headers": {"Authorization": CANARY}}},
    {"headers": CANARY},  # the wrong type
    {"token": CANARY},  # no option of HTTPFileSystem: the request refuses it by name
], ids=["headers", "client-kwargs", "wrong-type", "unknown"])
def test_http_store_that_refuses_echoes_no_option_value(where, options, refusing, fresh, tmp_path, capsys):
    url = "http://127.0.0.1:1/s.tar" if where == "closed" else refusing + where
    code, found = run_cli(["run", "--input", url, *MODEL, "sal", "--output", "OUT/o"], options, tmp_path, capsys)
    assert code == 2 and found == []


@pytest.mark.parametrize("url", [str(DEMO_DATA / "mnist-test-sample.tar"), "memory://nothing/*.tar"])
def test_local_and_memory_stores_echo_no_option_value(url, fresh, tmp_path, capsys):
    options = {"key": CANARY, "secret": CANARY, "password": CANARY, "client_kwargs": {"x": CANARY}}
    code, found = run_cli(["run", "--input", url, *MODEL, "sal", "--limit-per-shard", "2", "--output", "OUT/o"], options,
                          tmp_path, capsys)
    assert code in (0, 2) and found == []


@pytest.fixture(scope="module")
def dropping(tmp_path_factory):
    """moto (a real S3 server) behind a proxy whose endpoint URL holds the canary in its path, as a
    gateway's token may be: the proxy drops the connection of each read or write (GET, PUT) whose
    path holds one of ``drop`` (botocore's ConnectionClosedError then quotes the endpoint URL).
    Yields (moto's filesystem, the endpoint URL, the set of what to drop)."""
    import http.client

    from conftest import moto_s3
    drop: set[str] = set()

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if any(part in self.path for part in drop) and self.command in ("GET", "PUT"):
                self.close_connection = True
                self.connection.shutdown(2)
                return
            upstream = http.client.HTTPConnection(moto)
            upstream.request(self.command, self.path.replace(f"/{CANARY}", "", 1), body, dict(self.headers))
            reply = upstream.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            for name, value in reply.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", reply.getheader("Content-Length") or "0" if self.command == "HEAD"
                             else str(len(data)))
            self.end_headers()
            self.wfile.write(b"" if self.command == "HEAD" else data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        def log_message(self, *args):
            pass

    with pytest.MonkeyPatch.context() as mp, moto_s3(mp, "bkt") as (fs, endpoint):
        moto = endpoint.split("//", 1)[1]
        server = _serve(Proxy)
        yield fs, f"http://127.0.0.1:{server.server_address[1]}/{CANARY}/", drop
        server.shutdown()


@pytest.mark.slow  # end-to-end runs against a store that drops reads
def test_an_unreadable_shard_s_error_row_quotes_no_option_value(dropping, fresh, tmp_path, capsys, monkeypatch):
    import s3fs
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries only cost time here
    fs, endpoint, drop = dropping
    for name in ("a", "z"):
        fs.put(str(DEMO_DATA / "mnist-test-sample.tar"), f"bkt/shards/{name}.tar")
    drop.add("/shards/z.tar")  # listed and sized, never read
    try:
        # beside a readable shard it costs its own records: an errors/ row
        code, found = run_cli(["run", "--input", "s3://bkt/shards/*.tar", *MODEL, "sal", "--limit-per-shard", "2",
                               "--output", "OUT/o"], {"endpoint_url": endpoint, **FAST}, tmp_path, capsys)
        # alone, the input cannot be read at all: preflight's one line (exit 2) names the failed read
        alone, found_alone = run_cli(["run", "--input", "s3://bkt/shards/z*.tar", *MODEL, "sal", "--output", "OUT/z"],
                                     {"endpoint_url": endpoint, **FAST}, tmp_path, capsys)
    finally:
        drop.clear()
    from conftest import read_output
    errors = read_output(next((tmp_path / "o" / "errors").iterdir()))
    assert code == 0 and [e["stage"] for e in errors] == ["read"] and "ConnectionClosedError" in errors[0]["reason"]
    assert found == []
    assert alone == 2 and found_alone == [] and not (tmp_path / "z").exists()


@pytest.mark.slow  # end-to-end runs against a store that drops reads
def test_a_report_whose_history_cannot_be_listed_quotes_no_option_value(dropping, fresh, tmp_path, capsys,
                                                                         monkeypatch):
    import s3fs
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    fs, endpoint, drop = dropping
    assert cli.main(["run", "--input", str(DEMO_DATA / "mnist-test-sample.tar"), *MODEL, "sal", "--limit-per-shard",
                     "2", "--output", str(tmp_path / "audit")]) == 0
    fs.put(str(tmp_path / "audit"), "bkt/audit", recursive=True)
    drop.add("prefix=audit%2Fhistory")  # the report's history section lists history/: that listing fails
    try:
        code, found = run_cli(["report", "s3://bkt/audit", "--output", "OUT/r.html"],
                              {"endpoint_url": endpoint, **FAST}, tmp_path, capsys)
    finally:
        drop.clear()
    page = (tmp_path / "r.html").read_text()
    assert code == 0 and "The audit history is unreadable: ConnectionClosedError" in page
    assert found == []


def test_what_counts_as_a_secret_and_how_a_page_shows_it(monkeypatch):
    from saliency_audit.explainers.core import paths
    monkeypatch.setattr(paths, "_secrets", set())
    monkeypatch.setattr(paths, "_forms", ())
    paths.keep_secret({"profile": "default", "client_kwargs": {"region_name": "us-east-1"}, "key": "ab12",
                       "config_kwargs": {"s3": {"addressing_style": "virtual"}}, "endpoint_url": f"http://h/{CANARY}"})
    # a plain word under a name that is no credential's stays (it would garble every message holding it)
    assert paths.redact("default profile, virtual addressing") == "default profile, virtual addressing"
    assert paths.redact("region us-east-1, key ab12") == "region us-east-1, key <redacted>"  # a region is a name
    assert paths.redact(f"GET http://h/{CANARY}/b", "&lt;redacted&gt;") == "GET &lt;redacted&gt;/b"


@pytest.mark.slow  # two Beam worker processes started
def test_a_worker_process_s_storage_error_echoes_no_option_value(dropping, fresh, tmp_path):
    # --direct_running_mode multi_processing: the writes happen in SDK worker processes, which log the
    # failed bundle's traceback (botocore quoting the endpoint URL) to the stderr they inherited, where
    # the command's redaction does not reach. So the command runs as a process here, its workers its children
    import subprocess
    import sys

    from conftest import REPO
    fs, endpoint, drop = dropping
    drop.add("/mpo/saliency/")  # the workers' writes fail; the command's own (under mpo/) do not
    try:
        done = subprocess.run([sys.executable, "-m", "saliency_audit.pipelines.cli", "run", "--input",
                               str(DEMO_DATA / "mnist-test-sample.tar"), *MODEL, "sal", "--output", "s3://bkt/mpo",
                               "--storage-options", json.dumps({"endpoint_url": endpoint, **FAST}),
                               "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    finally:
        drop.clear()
    found = [name for name, text in (("stdout", done.stdout), ("stderr", done.stderr)) if CANARY in text]
    fs.invalidate_cache()
    found += [p for p in fs.find("bkt/mpo") if CANARY.encode() in fs.cat(p)]
    found += [str(p) for p in tmp_path.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert done.returncode == 3 and "ConnectionClosedError" in done.stderr  # the workers' writes failed
    assert found == []
