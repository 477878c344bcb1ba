"""Prediction endpoints as models (--model http://HOST/v2/models/NAME, or a plain JSON URL): a
real HTTP server on 127.0.0.1 serves the reference CNN (KServe v2 and plain JSON), with injected
429s, 500s, slow answers, a record it always refuses and answers that are not logits. The
black-box methods give the in-process model's maps, counts reconcile, and no secret reaches the
manifest."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, read_output

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.training.reference_model import mnist_cnn

TORCH_MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
METHODS = "occlusion,lime"
OPTIONS = {"lime": {"n_samples": 150}, "occlusion": {"window": 7, "stride": 7}}
IMAGES = 3
TOKEN = "s3cr3t-token-value"


class Endpoint:
    """The reference CNN behind KServe v2 (/v2/models/cnn) and plain JSON (/predict), with faults:
    every ``fail_every``-th inference answers 429 or 500 in turn, every ``slow_every``-th waits
    ``slow_s``, an image whose pixels sum to ``poison`` always gets a 500, ``garbage`` answers
    that are not logits, ``trickle_headers`` sends its status and header lines a few bytes at a
    time, and ``redeployed_classes`` K answers K classes once a second client has read the
    metadata (a redeploy between preflight and the job's workers)."""

    def __init__(self, **faults):
        self.model = mnist_cnn()
        self.model.load_state_dict(torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True))
        self.model.eval()
        self.faults = {"fail_every": 0, "slow_every": 0, "slow_s": 0.0, "poison": None, "garbage": False,
                       "token": None, "probabilities": False, "redirect": None, "trickle": False,
                       "trickle_headers": False, "redeployed_classes": None, "one_logit": False, **faults}
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        self.posts = self.refused = self.gets = 0
        self.authorised = set()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.rstrip("/") != "/v2/models/cnn":
                    return self.answer(404, {"error": "no such model"})
                with endpoint.lock:
                    endpoint.gets += 1
                self.answer(200, {"name": "cnn", "versions": ["7"], "platform": "pytorch",
                                  "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                                  "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.seen.append(dict(self.headers))
                if endpoint.faults["redirect"]:
                    self.send_response(307)
                    self.send_header("Location", endpoint.faults["redirect"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if endpoint.faults["trickle_headers"]:
                    return self.trickle_headers()
                status, answer = endpoint.infer(self.path, body, self.headers.get("Authorization"))
                if endpoint.faults["trickle"]:  # a whole answer, one byte every 0.2 s
                    data = json.dumps(answer).encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for k in range(len(data)):
                        self.wfile.write(data[k:k + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                    return
                self.answer(status, answer)

            def trickle_headers(self):
                """The status line 2 bytes every 0.1 s, then a header line every 0.5 s for 40 s: each
                read gets something well within any timeout, the headers never end in time."""
                try:
                    for k in range(0, 17, 2):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n"[k:k + 2])
                        time.sleep(0.1)
                    for k in range(80):
                        self.wfile.write(f"X-Wait-{k}: {k}\r\n".encode())
                        time.sleep(0.5)
                except OSError:  # the client hung up: what a timeout should make it do
                    pass

            def answer(self, status, body):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def infer(self, path: str, body: dict, authorization: str | None) -> tuple[int, object]:
        f = self.faults
        if f["token"] and authorization != f"Bearer {f['token']}":
            return 401, {"error": "unauthorised"}
        with self.lock:
            self.posts += 1
            n = self.posts
        if f["fail_every"] and n % f["fail_every"] == 0:
            with self.lock:
                self.refused += 1
            return (429 if (n // f["fail_every"]) % 2 else 500), {"error": "injected"}
        if f["slow_every"] and n % f["slow_every"] == 0:
            time.sleep(f["slow_s"])
        if path == "/v2/models/cnn/infer":
            item = body["inputs"][0]
            if item["name"] != "images" or item["datatype"] != "FP32":
                return 400, {"error": "bad input"}
            images = torch.tensor(item["data"], dtype=torch.float32).reshape(item["shape"])
        elif path == "/predict":
            images = torch.tensor(body["instances"], dtype=torch.float32)
        else:
            return 404, {"error": "no such path"}
        if f["poison"] is not None and any(abs(float(x.sum()) - f["poison"]) < 1e-3 for x in images):
            return 500, {"error": "this image always fails"}
        if f["garbage"]:
            return 200, b"<html>not json</html>"
        with torch.no_grad():
            out = self.model(images)
        if f["redeployed_classes"] and self.gets >= 2:  # extra classes, winning every image
            out = torch.cat([out, torch.full((len(out), f["redeployed_classes"] - out.shape[1]), 100.0)], dim=1)
        if f["probabilities"]:
            out = torch.softmax(out, dim=1)
        if f["one_logit"]:  # a sigmoid head's single logit
            out = out[:, :1]
        if path == "/predict":
            return 200, {"predictions": out.tolist()}
        return 200, {"outputs": [{"name": "logits", "datatype": "FP32", "shape": list(out.shape),
                                  "data": out.reshape(-1).tolist()}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(request):
    server = Endpoint(**getattr(request, "param", {}))
    yield server
    server.close()


def audit_args(model_args, out, *extra, methods=METHODS) -> list[str]:
    return ["--input", str(DEMO_DATA / "mnist-test-sample.tar"), *model_args, "--methods", methods,
            "--channels", "1", "--limit-per-shard", str(IMAGES), "--batch-size", str(IMAGES),
            "--torch-threads", "1", "--output", str(out), *extra,
            "--method-options", json.dumps({m: o for m, o in OPTIONS.items() if m in methods.split(",")})]


def rows_of(out) -> dict:
    return {(r["image_id"], r["method"]): r for r in read_output(out / "saliency")}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("torch") / "out"
    audit.run(audit_args(TORCH_MODEL, out))
    return rows_of(out)


def assert_same_maps(rows: dict, reference: dict, keys=None) -> None:
    keys = set(reference) if keys is None else keys
    assert set(rows) == keys
    for key in keys:
        mine, theirs = np.asarray(rows[key]["saliency"]), np.asarray(reference[key]["saliency"])
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max(), err_msg=str(key))
        assert rows[key]["predicted"] == reference[key]["predicted"]


@pytest.mark.slow
def test_a_kserve_endpoint_gives_the_in_process_models_maps(endpoint, in_process, tmp_path):
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], tmp_path / "out"))
    assert_same_maps(rows_of(tmp_path / "out"), in_process)
    assert all(c == {"read": IMAGES, "explained": IMAGES, "errors": 0} for c in manifest["counts"].values())
    # cost: occlusion asks the model about each 7x7 window of a 28x28 digit, and the digit itself
    calls = manifest["model_calls"]
    assert calls["methods"]["occlusion"]["images_per_image"] == (28 // 7) ** 2 + 1
    assert calls["all"]["images"] > sum(m["images"] for m in calls["methods"].values())  # + predictions, metrics
    assert calls["http"]["requests"] >= calls["all"]["calls"] and calls["http"]["retries"] == 0
    assert endpoint.posts >= calls["http"]["requests"]  # the rest: preflight, on the launcher


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", [{"fail_every": 3, "slow_every": 7, "slow_s": 0.5, "token": TOKEN}],
                         indirect=True)
def test_429s_500s_and_slow_answers_are_retried_and_cost_nothing(endpoint, in_process, tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", TOKEN)
    options = json.dumps({"timeout": 0.3, "backoff": 0.01, "retries": 6, "max_batch": 2, "max_in_flight": 2})
    out = tmp_path / "out"
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], out, "--endpoint-options", options,
                                    methods="occlusion"))
    assert endpoint.refused > 0 and manifest["model_calls"]["http"]["retries"] > 0
    assert_same_maps(rows_of(out), in_process, {k for k in in_process if k[1] == "occlusion"})
    assert all(c == {"read": IMAGES, "explained": IMAGES, "errors": 0} for c in manifest["counts"].values())
    assert TOKEN not in (out / "manifest.json").read_text()


@pytest.fixture
def poisoned(in_process):
    """An endpoint that always refuses the second digit (matched by its pixel sum)."""
    from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    records = [r for r, _ in zip(read_shard(str(DEMO_DATA / "mnist-test-sample.tar")), range(IMAGES))]
    victim = records[1]
    pixels = preprocess(decode(victim, 4096 * 4096), Preprocessing(channels=1))
    server = Endpoint(poison=float(pixels.sum()))
    yield server, victim.image_id
    server.close()


@pytest.mark.slow
def test_a_record_the_endpoint_keeps_refusing_costs_that_record(poisoned, in_process, tmp_path):
    endpoint, victim = poisoned
    out = tmp_path / "out"
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], out, "--endpoint-options",
                                    json.dumps({"retries": 1, "backoff": 0.01})))
    assert all(c == {"read": IMAGES, "explained": IMAGES - 1, "errors": 1} for c in manifest["counts"].values())
    errors = read_output(out / "errors")
    assert [(e["image_id"], e["stage"]) for e in errors] == [(victim, "model")]
    assert_same_maps(rows_of(out), in_process, {k for k in in_process if k[0] != victim})


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", [{"probabilities": True}], indirect=True)
def test_a_plain_json_endpoint_that_answers_probabilities(endpoint, in_process, tmp_path):
    out = tmp_path / "out"
    audit.run(audit_args(["--model", f"{endpoint.base}/predict"], out, "--endpoint-options",
                         json.dumps({"output": "probabilities"})))
    rows = rows_of(out)
    assert rows.keys() == in_process.keys()
    for key, row in rows.items():  # the softmax of log-probabilities is the probabilities: same scores
        assert row["predicted"] == in_process[key]["predicted"]
        assert row["score"] == pytest.approx(in_process[key]["score"], abs=1e-5)


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("endpoint", [{"garbage": True}], indirect=True)
def test_answers_that_are_not_logits_fail_preflight_in_one_line(endpoint, tmp_path, capsys):
    argv = audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], tmp_path / "out", "--endpoint-options",
                      json.dumps({"retries": 0}))
    assert audit.main(argv) == 2
    assert "not JSON" in one_line(capsys)


def test_an_endpoint_that_is_down_fails_fast(tmp_path, capsys):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    argv = audit_args(["--model", f"http://127.0.0.1:{port}/v2/models/cnn"], tmp_path / "out", "--endpoint-options",
                      json.dumps({"retries": 1, "backoff": 0.05}))
    assert audit.main(argv) == 2
    assert re.search(r"model endpoint http://127\.0\.0\.1:\d+/v2/models/cnn: .*2 attempt\(s\) failed", one_line(capsys))
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--methods", "grad,occlusion"], r"grad need gradients"),
    (["--endpoint-options", '{"max_batch": 0}'], r"max_batch must be an integer >= 1"),
    (["--endpoint-options", '{"retires": 3}'], r"unknown key\(s\) retires"),
    (["--endpoint-options", '{"output": "softmax"}'], r"output must be logits or probabilities"),
])
def test_bad_endpoint_invocations_fail_in_one_line(endpoint, tmp_path, capsys, extra, expected):
    methods = extra[1] if extra[0] == "--methods" else METHODS
    extra = extra[2:] if extra[0] == "--methods" else extra
    argv = audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], tmp_path / "out", *extra, methods=methods)
    assert audit.main(argv) == 2
    assert re.search(expected, one_line(capsys))


@pytest.mark.slow
def test_credentials_in_the_options_never_reach_the_manifest(endpoint, tmp_path):
    endpoint.faults["token"] = TOKEN
    out = tmp_path / "out"
    options = json.dumps({"headers": {"Authorization": f"Bearer {TOKEN}"}})
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], out, "--endpoint-options", options,
                                    methods="occlusion"))
    assert manifest["counts"]["occlusion"]["explained"] == IMAGES
    assert TOKEN not in (out / "manifest.json").read_text()


def test_a_redirect_is_refused_and_carries_no_credentials(tmp_path, monkeypatch):
    """urllib would follow it with every header, the token included, to wherever it points."""
    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions, ModelCallError
    elsewhere = Endpoint()
    endpoint = Endpoint(redirect=f"{elsewhere.base}/v2/models/cnn/infer")
    try:
        monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", TOKEN)
        model = EndpointModel(f"{endpoint.base}/v2/models/cnn", EndpointOptions.parse({"retries": 0}))
        with pytest.raises(ModelCallError, match="redirects"):
            model(torch.zeros(1, 1, 28, 28))
        assert endpoint.seen and not elsewhere.seen
    finally:
        endpoint.close()
        elsewhere.close()


@pytest.mark.parametrize("endpoint", [{"trickle": True}], indirect=True)
def test_an_answer_that_trickles_in_is_cut_off_at_the_timeout(endpoint):
    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions, ModelCallError
    model = EndpointModel(f"{endpoint.base}/v2/models/cnn", EndpointOptions.parse({"retries": 0, "timeout": 1}))
    start = time.monotonic()
    with pytest.raises(ModelCallError, match="no whole answer within 1 s"):
        model(torch.zeros(1, 1, 28, 28))
    # a deadline, not a speed: without it the answer (200-odd bytes, one every 0.2 s) takes some 45 s
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1:9/v2/models/cnn", "http://127.0.0.1:9/predict?api_key=k1",
                                 "file:///etc/passwd"])
def test_credentials_in_the_url_are_refused_without_echoing_them(url, tmp_path, capsys):
    argv = audit_args(["--model", url], tmp_path / "out")
    assert audit.main(argv) == 2
    line = one_line(capsys)
    assert "pw" not in line.split("127.0.0.1")[0] and "k1" not in line


SECRET = "tok-SECRET-123"


def leaked_anywhere(secret: str, root, *texts: str) -> list[str]:
    """Where ``secret`` appears: in the texts, or in the raw bytes of any file under ``root``."""
    found = [f"text {k}" for k, text in enumerate(texts) if secret in text]
    return found + [str(path) for path in root.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


@pytest.mark.parametrize("how,value,named", [
    ("token", SECRET + "\n", "SALIENCY_AUDIT_ENDPOINT_TOKEN"),
    ("header", f"Bearer {SECRET}\r\n", "Authorization"),
    ("header", f"{SECRET}\x00more", "Authorization"),
])
def test_a_header_with_a_control_character_fails_in_one_line_that_hides_it(endpoint, tmp_path, monkeypatch, capsys,
                                                                          caplog, how, value, named):
    """http.client would refuse it with an error that quotes the value: b'Bearer tok...\\n'."""
    options = {"retries": 0}
    if how == "token":
        monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", value)
    else:
        options["headers"] = {"Authorization": value}
    argv = audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], tmp_path / "out", "--endpoint-options",
                      json.dumps(options), methods="occlusion")
    assert audit.main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and named in err[0] and "control character" in err[0], err
    assert not leaked_anywhere(SECRET, tmp_path, captured.out, captured.err, caplog.text)


def test_an_error_sending_a_request_never_carries_a_secret(endpoint, monkeypatch):
    """A worker's own environment may hold a token the launcher's preflight never saw: whatever
    the HTTP library raises about it is scrubbed of it, in every form (text, repr, bytes)."""
    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions, ModelCallError
    model = EndpointModel(f"{endpoint.base}/v2/models/cnn", EndpointOptions.parse({"retries": 0}))
    monkeypatch.setenv("SALIENCY_AUDIT_ENDPOINT_TOKEN", SECRET + "\n")
    with pytest.raises(ModelCallError) as raised:
        model(torch.zeros(1, 1, 28, 28))
    assert SECRET not in str(raised.value) and "control character" in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", [{"redeployed_classes": 12}], indirect=True)
def test_answers_with_another_class_count_than_preflights_cost_their_records(endpoint, tmp_path):
    out = tmp_path / "out"
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/v2/models/cnn"], out, "--endpoint-options",
                                    json.dumps({"retries": 0}), methods="occlusion"))
    assert endpoint.gets >= 2  # preflight's client, then the workers'
    assert manifest["model"]["num_classes"] == 10
    assert manifest["counts"]["occlusion"] == {"read": IMAGES, "explained": 0, "errors": IMAGES}
    errors = read_output(out / "errors")
    assert len(errors) == IMAGES and all(e["stage"] == "model" and "10" in e["reason"] for e in errors), errors


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", [{"trickle_headers": True}], indirect=True)
def test_headers_that_trickle_in_are_cut_off_at_the_timeout(endpoint):
    """urllib's timeout is per socket read: a server that sends a header line every 0.5 s would hold
    the request for 40 s. The timeout bounds the whole exchange."""
    from saliency_audit.transforms.model.endpoint import EndpointModel, EndpointOptions, ModelCallError
    timeout = 2
    model = EndpointModel(f"{endpoint.base}/v2/models/cnn", EndpointOptions.parse({"retries": 0, "timeout": timeout}))
    start = time.monotonic()
    with pytest.raises(ModelCallError, match=f"no whole answer within {timeout} s"):
        model(torch.zeros(1, 1, 28, 28))
    assert time.monotonic() - start < timeout + 15  # the headers alone would take 40 s


@pytest.mark.parametrize("endpoint", [{"one_logit": True}], indirect=True)
def test_an_endpoint_that_answers_a_single_logit_is_read_as_two_classes_by_the_workers_too(endpoint, tmp_path):
    # preflight reads its [B,1] as two classes; the workers' client must still expect the one column it answers
    out = tmp_path / "out"
    manifest = audit.run(audit_args(["--model", f"{endpoint.base}/predict"], out, "--endpoint-options",
                                    json.dumps({"retries": 0}), methods="occlusion"))
    assert manifest["model"]["num_classes"] == 2 and manifest["model"]["outputs"] == "binary_logit"
    assert manifest["counts"]["occlusion"] == {"read": IMAGES, "explained": IMAGES, "errors": 0}, \
        read_output(out / "errors")[:1]
