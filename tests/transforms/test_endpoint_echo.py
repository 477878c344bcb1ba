"""A server (or a gateway in front of it) that echoes the request's credentials in an error answer:
whatever form the echo takes (JSON with escaped slashes, URL-encoded, Go's \\u0026 escapes, base64,
or cut in the middle by a length limit), no part of the token reaches what the run writes or prints.
The endpoint module keeps no server-controlled text in an error (the status code and its standard
phrase only), so no form of echo can leak. And scrubbing leaves short header values that cannot be
secrets alone (a header value "2" would otherwise garble every error text holding a 2)."""
from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO_DATA

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.training.reference_model import mnist_cnn

# Six-character chunks that cannot occur by chance (not even in a report's base64 images) between
# the characters each encoding treats differently: / (JSON's \/), + and = (URL encoding), & (Go's \u0026).
CHUNKS = ("Zq7Xw3", "Kp9Lm2", "Vt8Yr4", "Qs6Hn1")
TOKEN = f"{CHUNKS[0]}/{CHUNKS[1]}+{CHUNKS[2]}&{CHUNKS[3]}="
IMAGES = 2


def echoed(form: str, authorization: str) -> bytes:
    """An error body that quotes the request's Authorization header in ``form``."""
    if form == "plain":
        return json.dumps({"error": f"denied: {authorization}"}).encode()
    if form == "json_slashes":  # PHP's and some gateways' JSON: "\/" for "/"
        return json.dumps({"error": f"denied: {authorization}"}).replace("/", "\\/").encode()
    if form == "url_encoded":
        return f"denied; header={urllib.parse.quote(authorization, safe='')}".encode()
    if form == "go_escapes":  # Go's encoding/json: & < > as \u0026 \u003c \u003e
        return json.dumps({"error": f"denied: <{authorization}>"}).replace("&", "\\u0026").replace(
            "<", "\\u003c").replace(">", "\\u003e").encode()
    if form == "base64":
        return json.dumps({"error": "denied", "echo": base64.b64encode(authorization.encode()).decode()}).encode()
    if form == "truncated":  # the token straddles byte 300, where a body used to be cut before scrubbing
        return json.dumps({"error": " " * 272 + authorization}).encode()
    raise ValueError(form)


FORMS = ("plain", "json_slashes", "url_encoded", "go_escapes", "base64", "truncated")


class EchoingEndpoint:
    """The reference CNN behind KServe v2 (/v2/models/cnn); inference answers 400 with a body
    quoting the Authorization header in ``form``: from the start, or (``after_preflight``) only
    once a second client has read the model's metadata (the job's workers, after preflight)."""

    def __init__(self, form: str, after_preflight: bool):
        self.model = mnist_cnn()
        self.model.load_state_dict(torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True))
        self.model.eval()
        self.gets, self.echoes, self.lock = 0, 0, threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with endpoint.lock:
                    endpoint.gets += 1
                self.answer(200, json.dumps({"name": "cnn", "versions": ["1"],
                                             "inputs": [{"name": "images", "datatype": "FP32"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not after_preflight or endpoint.gets >= 2:
                    with endpoint.lock:
                        endpoint.echoes += 1
                    # the reason phrase echoes it too: a server controls its status line as well
                    return self.answer(400, echoed(form, self.headers.get("Authorization", "")),
                                       phrase=f"Bad {self.headers.get('Authorization', '')}")
                item = body["inputs"][0]
                with torch.no_grad():
                    out = endpoint.model(torch.tensor(item["data"], dtype=torch.float32).reshape(item["shape"]))
                self.answer(200, json.dumps({"outputs": [{"name": "logits", "datatype": "FP32",
                                                          "shape": list(out.shape),
                                                          "data": out.reshape(-1).tolist()}]}).encode())

            def answer(self, status, data, phrase=None):
                self.send_response(status, phrase)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/models/cnn"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def token_forms() -> set[str]:
    """The token and every encoding of it the server uses, and its chunks (a cut leaves some)."""
    header = f"Bearer {TOKEN}"
    return {TOKEN, *CHUNKS, json.dumps(TOKEN)[1:-1].replace("/", "\\/"), urllib.parse.quote(header, safe=""),
            urllib.parse.quote(TOKEN, safe=""), TOKEN.replace("&", "\\u0026"),
            base64.b64encode(header.encode()).decode(), base64.b64encode(TOKEN.encode()).decode()}


def texts_written(root) -> list[tuple[str, str]]:
    """(where, text) for every file under ``root``: its raw bytes, and for Parquet every value
    decoded (compression may hide a string from the raw bytes)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found.append((str(path), path.read_bytes().decode("latin-1")))
        if path.suffix == ".parquet":
            found.append((f"{path} (decoded)", json.dumps(pq.read_table(path).to_pylist(), default=repr)))
    return found


def leaks(texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(where, form) for where, text in texts for form in token_forms() if form in text]


@pytest.mark.parametrize("form", FORMS)
def test_an_echo_at_preflight_reaches_no_output_and_no_line(form, tmp_path, monkeypatch, capsys, caplog):
    endpoint = EchoingEndpoint(form, after_preflight=False)
    monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", TOKEN)
    try:
        code = audit.main(argv(endpoint.url, tmp_path / "out"))
    finally:
        endpoint.close()
    captured = capsys.readouterr()
    assert code == 2 and endpoint.echoes
    assert "HTTP 400" in captured.err
    assert leaks([("stdout", captured.out), ("stderr", captured.err), ("log", caplog.text),
                  *texts_written(tmp_path)]) == []


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_an_echo_after_preflight_reaches_no_error_row_and_no_report(form, tmp_path, monkeypatch, capsys, caplog):
    """Preflight passes; the workers' requests get the echo: each image costs an error row whose
    reason, and the report's errors table, keep the status and no part of the token."""
    from saliency_audit.pipelines.reporting.report import write_report
    endpoint = EchoingEndpoint(form, after_preflight=True)
    monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", TOKEN)
    out = tmp_path / "out"
    try:
        code = audit.main(argv(endpoint.url, out))
    finally:
        endpoint.close()
    assert code == 0 and endpoint.gets >= 2 and endpoint.echoes
    write_report(str(out), str(tmp_path / "report.html"))
    captured = capsys.readouterr()
    assert leaks([("stdout", captured.out), ("stderr", captured.err), ("log", caplog.text),
                  *texts_written(tmp_path)]) == []
    reasons = [r["reason"] for f in (out / "errors").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert len(reasons) == IMAGES and all("HTTP 400 Bad Request" in r for r in reasons), reasons


def argv(url: str, out) -> list[str]:
    return ["--input", str(DEMO_DATA / "mnist-test-sample.tar"), "--model", url, "--methods", "occlusion",
            "--channels", "1", "--device", "cpu", "--limit-per-shard", str(IMAGES), "--batch-size", str(IMAGES),
            "--torch-threads", "1", "--no-metrics", "--output", str(out),
            "--method-options", json.dumps({"occlusion": {"window": 14, "stride": 14}}),
            "--endpoint-options", json.dumps({"retries": 0})]


def test_short_header_values_that_cannot_be_secrets_do_not_garble_errors():
    """A header value such as "2" is no secret: replacing every "2" in an error would garble it.
    The token, authorization-like headers and long values are still scrubbed."""
    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions
    model = EndpointModel.__new__(EndpointModel)  # no server: only the scrubbing is under test
    torch.nn.Module.__init__(model)
    model.options = EndpointOptions.parse({"headers": {"X-Shard": "2", "X-Api-Key": "k9", "X-Tenant": "acme-corp-7",
                                                       "Authorization": "Basic dXNlcjpw"}})
    said = model._described(ValueError("expected 2 outputs, got 12; key k9, tenant acme-corp-7, auth dXNlcjpw"))
    assert "expected 2 outputs, got 12" in said
    assert "k9" not in said and "acme-corp-7" not in said and "dXNlcjpw" not in said


def test_a_status_line_that_echoes_the_token_is_not_quoted(monkeypatch):
    """A server whose status line is not HTTP and quotes the request's header (URL-encoded):
    http.client's BadStatusLine carries the line; only the error's kind is kept."""
    import socket

    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions, ModelCallError
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                request = connection.recv(65536).decode("latin-1")
                header = next((line.split(":", 1)[1].strip() for line in request.split("\r\n")
                               if line.lower().startswith("authorization:")), "")
                connection.sendall(f"XTTP/9 {urllib.parse.quote(header, safe='')}\r\n\r\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", TOKEN)
    try:
        model = EndpointModel(f"http://127.0.0.1:{listener.getsockname()[1]}/predict",
                              EndpointOptions.parse({"retries": 0}))
        with pytest.raises(ModelCallError) as raised:
            model(torch.zeros(1, 1, 28, 28))
    finally:
        listener.close()
    assert "BadStatusLine" in str(raised.value)
    assert [form for form in token_forms() if form in str(raised.value)] == []
