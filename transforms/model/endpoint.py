"""Prediction endpoints as models (``--model http(s)://HOST/v2/models/NAME`` or any other URL):
the classifier in production, audited through its HTTP API as a forward-only black box.

Two protocols, chosen by the URL:

* KServe v2 / Open Inference Protocol (a path ``.../v2/models/NAME[/versions/V]``): POST
  ``URL/infer`` with ``{"inputs": [{"name", "shape": [B,C,H,W], "datatype": "FP32", "data"}]}``,
  the first output ``[B,K]`` back; the input's name and the model's version come from ``GET URL``.
* plain JSON (any other URL): POST ``{"instances": [image, ...]}`` (each ``[C,H,W]`` nested lists),
  ``{"predictions": [[K floats], ...]}`` back (TensorFlow Serving's and TorchServe's form).

Per worker process: batches of at most ``max_batch`` images per request, at most ``max_in_flight``
requests at once, at most ``rate`` requests a second, a ``timeout`` per request, and ``retries``
with exponential backoff (and Retry-After) on 429, 5xx, timeouts and dropped connections. A
request that still fails raises ``ModelCallError``: the images it carried cost one error row each
(stage ``model``), never the run. Credentials: ``headers`` in the endpoint options, or a bearer
token from the environment variable named by ``token_env`` (default
``SALIENCY_AUDIT_ENDPOINT_TOKEN``); neither reaches the manifest, and no error text quotes them.
An error answer is kept as its status code and the code's standard phrase only: never its body
or its reason phrase, which a gateway may use to echo the request's headers in any form (JSON- or
URL-encoded, escaped, base64, cut short) that no scrubbing could be sure to find.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http
import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from saliency_audit.transforms.model.load import read_as_log_probabilities

TOKEN_ENV = "SALIENCY_AUDIT_ENDPOINT_TOKEN"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
ANSWER_BYTES = 1 << 20, 64 << 10  # an answer is at most 1 MiB + 64 KiB per image: logits, not a dump
BREAKER = 3, 30.0  # after 3 requests in a row that exhausted their retries, fail fast for 30 s
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token (RFC 9110)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REDACTED = "<redacted>"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # a version as the manifest records it


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the credentials to another place (urllib copies the headers) and
    turn the POST into a GET: refused."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ModelCallError(f"{req.get_method()} {_shown(req.full_url)}: the endpoint redirects (HTTP {code}); "
                             f"give the final URL")


class _Deadline:
    """Ends an exchange at its deadline. urllib's timeout bounds each socket read only, so a server
    that sends a byte now and then (status line, headers, body, TLS handshake) would hold a request
    for as long as it likes; at the deadline a duplicate of the connection's socket is shut down,
    which ends any read blocked on it at once."""

    def __init__(self, seconds: float):
        self.expired = False
        self._lock, self._sockets = threading.Lock(), []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            spare = sock.dup()  # the same connection: a TLS wrapper detaches the original object
            self._sockets.append(spare)
            if self.expired:
                self._shut(spare)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for spare in self._sockets:
                self._shut(spare)

    @staticmethod
    def _shut(spare: socket.socket) -> None:
        with contextlib.suppress(OSError):
            spare.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        with self._lock:
            for spare in self._sockets:
                spare.close()


class _WatchedConnections:
    """Handlers whose connections report their socket to the request's ``deadline``."""

    def do_open(self, http_class, req, **kwargs):
        deadline = getattr(req, "deadline", None)

        def connection(*args, **connection_kwargs):
            made = http_class(*args, **connection_kwargs)
            create = made._create_connection  # http.client's hook for making the socket (proxies, TLS use it too)
            made._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))
            return made
        return super().do_open(connection if deadline else http_class, req, **kwargs)


class _HTTPHandler(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedConnections, urllib.request.HTTPSHandler):
    pass


class _ErrorStatus(Exception):
    """An answer with an error status: its code and its Retry-After. Nothing else the server sent
    is kept (not its body, not its reason phrase): a gateway may echo the request's headers in any
    form (JSON- or URL-encoded, escaped, base64, cut short), which no scrubbing can find for sure,
    and errors reach errors/, the report and the terminal. ``text`` is the code's standard phrase."""

    def __init__(self, code: int, retry_after: str | None):
        super().__init__(code)
        self.code, self.retry_after = code, retry_after
        try:
            self.text = http.HTTPStatus(code).phrase
        except ValueError:
            self.text = "(a status with no standard phrase)"


_OPENER = urllib.request.build_opener(_NoRedirect, _HTTPHandler, _HTTPSHandler)


def value_problem(value: str) -> str | None:
    """What makes ``value`` unsendable as a header value, in words that never quote it (it is
    usually a credential), or None. http.client would refuse CR and LF with an error that quotes
    the whole value, and send NUL and the other control characters as they are."""
    if _CONTROL.search(value):
        return "a control character (CR, LF, NUL or another; a trailing newline?)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "a character outside Latin-1"
    return None


def header_problem(name: str, value: str) -> str | None:
    """Why the header ``name: value`` cannot be sent, naming at most its name, or None."""
    if not _FIELD_NAME.fullmatch(name):
        return "a header name is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~ only)"
    problem = value_problem(value)
    return f"header {name} has {problem} in its value" if problem else None


def scrubbed(text: str, secrets) -> str:
    """``text`` with every secret replaced, in each form an error of this process may quote it: as
    is, stripped, escaped (repr, as in b'Bearer tok\\n'; JSON, with and without escaped slashes),
    URL-encoded, and its long words (a message whose whitespace was folded no longer holds the whole
    value; the short ones are scheme names such as Bearer). Text from the server is never scrubbed
    and kept: no error quotes it (``_ErrorStatus``), since an echo may take any form, or be cut."""
    forms = set()
    for secret in filter(None, secrets):
        for value in {secret, secret.strip(), *(word for word in secret.split() if len(word) >= 8)}:
            escaped = json.dumps(value)[1:-1]
            forms |= {value, repr(value)[1:-1], escaped, escaped.replace("/", "\\/"),
                      urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value, safe=""),
                      *(repr(value.encode(codec, "replace"))[2:-1] for codec in ("latin-1", "utf-8"))}
    for form in sorted(filter(None, forms), key=len, reverse=True):
        text = text.replace(form, REDACTED)
    return text


# Header names whose values are credentials whatever their length; any other header value counts as
# one from SECRET_LENGTH characters (a short value such as "2" or "json" is none, and replacing it
# would garble every error text that holds it).
SECRET_HEADER = re.compile(r"auth|token|key|secret|password|passwd|cookie|session|signature|credential", re.IGNORECASE)
SECRET_LENGTH = 8


def _shown(url: str) -> str:
    """The URL without what may be a credential (user info, query)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", "")) if parts.port is None \
        else urllib.parse.urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}", parts.path, "", ""))


class ModelCallError(RuntimeError):
    """The model could not be asked (an endpoint that keeps failing): costs the images, stage model."""

    stage = "model"


@dataclasses.dataclass(frozen=True)
class EndpointOptions:
    max_batch: int = 32
    max_in_flight: int = 4
    rate: float | None = None  # requests per second per worker process; None: unlimited
    timeout: float = 30.0
    retries: int = 4
    backoff: float = 0.5  # seconds before the first retry, doubled each time (at most 30 s)
    output: str = "logits"  # or "probabilities": turned into log-probabilities, whose softmax they are
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    token_env: str = TOKEN_ENV

    @classmethod
    def parse(cls, given: dict[str, Any] | None) -> "EndpointOptions":
        """Checked options, or ValueError naming the bad key in one line."""
        given = dict(given or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"--endpoint-options: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = cls(**given)
        for name in ("max_batch", "max_in_flight", "retries"):
            value = getattr(options, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "retries" else 1):
                raise ValueError(f"--endpoint-options: {name} must be an integer >= {0 if name == 'retries' else 1}")
        for name in ("timeout", "backoff", "rate"):
            value = getattr(options, name)
            if value is None and name == "rate":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e6:
                raise ValueError(f"--endpoint-options: {name} must be a positive number of seconds"
                                 + (" (requests per second)" if name == "rate" else ""))
        if options.output not in ("logits", "probabilities"):
            raise ValueError("--endpoint-options: output must be logits or probabilities")
        if not isinstance(options.headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                            for k, v in options.headers.items()):
            raise ValueError("--endpoint-options: headers must be a table of strings")
        for name, value in options.headers.items():
            problem = header_problem(name, value)
            if problem:
                raise ValueError(f"--endpoint-options: {problem}")
        return options


def is_endpoint(model: str) -> bool:
    return model.lower().startswith(("http://", "https://"))


class _RateLimit:
    """At most ``rate`` starts a second, spaced evenly, across the worker's threads."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class Calls:
    """What the model was asked, for the manifest's cost figures (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.images = self.retries = 0

    def add(self, requests: int = 0, images: int = 0, retries: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.images += images
            self.retries += retries

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.requests, self.images, self.retries


class EndpointModel(torch.nn.Module):
    """A forward-only module that asks an HTTP endpoint for logits."""

    differentiable = False

    def __init__(self, url: str, options: EndpointOptions, classes: int | None = None):
        """``classes``: the class count preflight saw, which every answer must have (None: the
        first answer's)."""
        super().__init__()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{_shown(url)}: an endpoint is an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query:
            raise ValueError(f"{_shown(url)}: no credentials or query in the URL (they would reach the manifest "
                             f"and the logs); give them as --endpoint-options headers or token_env")
        self.url, self.options = url.rstrip("/"), options
        self.classes = classes  # K: every answer must match (from the first answer where not given)
        self._headers()  # a bad token fails here, at preflight, not on every request
        self._failures, self._failed_at = 0, 0.0
        self.kserve = "/v2/models/" in self.url
        self.calls = Calls()
        self._limit = _RateLimit(options.rate)
        self._pool = ThreadPoolExecutor(max_workers=options.max_in_flight, thread_name_prefix="endpoint")
        self.input_name, self.version = "input-0", None
        if self.kserve:  # the input's name and the model's version, from the model's metadata
            metadata = self._call("GET", self.url, None, 0)
            inputs = metadata.get("inputs") if isinstance(metadata, dict) else None
            if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) and isinstance(inputs[0].get("name"), str):
                self.input_name = inputs[0]["name"]
            versions = metadata.get("versions") if isinstance(metadata, dict) else None
            self.version = self._recorded_version(
                str(metadata.get("version") or (versions[-1] if isinstance(versions, list) and versions else "")))

    def _recorded_version(self, version: str) -> str | None:
        """The version the server reports, as the manifest may record it: a plain version name as
        it is; anything else (a gateway's echo of the request may hold the token) by its hash."""
        if not version:
            return None
        if _VERSION.fullmatch(version) and scrubbed(version, self._secrets()) == version:
            return version
        return "sha256:" + hashlib.sha256(version.encode("utf-8", "replace")).hexdigest()[:16]

    def identity(self) -> str:
        """What names the model behind the endpoint (the manifest's and the history's model)."""
        return f"{self.url} version {self.version}" if self.version else self.url

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().to("cpu", torch.float32).numpy()
        step = self.options.max_batch
        chunks = [array[i:i + step] for i in range(0, len(array), step)]
        try:
            answers = list(self._pool.map(self._ask, chunks))
        except ModelCallError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the answer did, it costs these images, stage model
            raise ModelCallError(f"{_shown(self.url)}: {self._described(e)}") from None
        out = np.concatenate(answers) if answers else np.zeros((0, self.classes or 0), np.float32)
        logits = torch.from_numpy(out.astype(np.float32)).to(images.device)
        if self.options.output == "probabilities":  # the reading of a loaded model that answers probabilities
            logits = read_as_log_probabilities(self, (images,), logits)
        return logits

    def _ask(self, chunk: np.ndarray) -> np.ndarray:
        if self.kserve:
            body = {"inputs": [{"name": self.input_name, "shape": list(chunk.shape), "datatype": "FP32",
                                "data": chunk.reshape(-1).tolist()}]}
            answer = self._call("POST", f"{self.url}/infer", body, len(chunk))
            outputs = answer.get("outputs") if isinstance(answer, dict) else None
            if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], dict):
                raise ModelCallError(f"{_shown(self.url)}: the answer has no outputs")
            data, shape = outputs[0].get("data"), outputs[0].get("shape")
        else:
            answer = self._call("POST", self.url, {"instances": chunk.tolist()}, len(chunk))
            data = answer.get("predictions") if isinstance(answer, dict) else None
            shape = None
        try:
            values = np.asarray(data, dtype=np.float64)
            values = values.reshape(shape) if shape is not None else values
        except (TypeError, ValueError):
            raise ModelCallError(f"{_shown(self.url)}: the answer's outputs are not numbers of one shape") from None
        if values.ndim != 2 or values.shape[0] != len(chunk) or (self.classes or values.shape[1]) != values.shape[1]:
            raise ModelCallError(f"{_shown(self.url)}: expected outputs [{len(chunk)}, {self.classes or 'K'}] for "
                                 f"{len(chunk)} image(s), got shape {list(values.shape)}")
        self.classes = values.shape[1]
        return values.astype(np.float32)

    def _headers(self) -> dict[str, str]:
        """The request's headers. The token is read from this process's environment (a worker's
        may differ from the launcher's) and refused, unquoted, when a header cannot carry it."""
        options = self.options
        headers = {"Content-Type": "application/json", "Accept": "application/json", **options.headers}
        token = os.environ.get(options.token_env)
        if token and not any(k.lower() == "authorization" for k in headers):
            problem = value_problem(token)
            if problem:
                raise ModelCallError(f"the token in ${options.token_env} has {problem}; it cannot be sent")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _secrets(self) -> list[str]:
        """What an error must not quote: the token, the values of headers named like credentials,
        and any other header value of SECRET_LENGTH characters or more."""
        return [os.environ.get(self.options.token_env, ""),
                *(value for name, value in self.options.headers.items()
                  if SECRET_HEADER.search(name) or len(value.strip()) >= SECRET_LENGTH)]

    def _described(self, error: BaseException) -> str:
        """An exception as one line that holds no secret (errors of the HTTP library quote headers).
        The HTTP library's errors about the answer (http.client.HTTPException: a bad status line, a
        header line too long...) quote what the server sent: only their kind is kept."""
        if isinstance(error, http.client.RemoteDisconnected):
            return f"{type(error).__name__}: the endpoint closed the connection without an answer"
        if isinstance(error, http.client.IncompleteRead):
            return f"{type(error).__name__}: the answer was cut short"
        if isinstance(error, http.client.HTTPException):
            return f"{type(error).__name__}: the answer is not valid HTTP"
        return f"{type(error).__name__}: {' '.join(scrubbed(str(error), self._secrets()).split())[:200]}"

    def _call(self, method: str, url: str, body: dict | None, images: int) -> Any:
        """One request with retries; the decoded JSON answer, or ModelCallError. Each attempt has
        ``timeout`` seconds in all (not per read: a server that trickles is cut off)."""
        options = self.options
        headers = self._headers()
        if self._failures >= BREAKER[0] and time.monotonic() - self._failed_at < BREAKER[1]:
            raise ModelCallError(f"{method} {_shown(url)}: {self._failures} requests in a row failed; not asking "
                                 f"again for {BREAKER[1]:.0f} s")
        data = json.dumps(body).encode() if body is not None else None
        limit = ANSWER_BYTES[0] + ANSWER_BYTES[1] * images
        last = ""
        for attempt in range(options.retries + 1):
            self._limit.wait()
            self.calls.add(requests=1, images=images, retries=1 if attempt else 0)
            delay = min(30.0, options.backoff * 2 ** attempt)
            try:
                raw = self._attempt(method, url, data, headers, limit)
                self._failures = 0
                try:
                    return json.loads(raw)
                except (ValueError, RecursionError):
                    raise ModelCallError(f"{_shown(url)}: the answer is not JSON") from None
            except ModelCallError:
                raise
            except _ErrorStatus as e:
                last = f"HTTP {e.code} {e.text}"  # the standard phrase: never the server's words
                if e.code not in RETRY_STATUS:
                    raise ModelCallError(f"{method} {_shown(url)}: {last}") from None
                if e.retry_after and e.retry_after.strip().isdigit():
                    delay = min(30.0, float(e.retry_after))
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as e:
                last = self._described(getattr(e, "reason", e))[:160]
            except Exception as e:  # noqa: BLE001 - building or sending the request failed: asking again won't help
                raise ModelCallError(f"{method} {_shown(url)}: {self._described(e)}") from None
            if attempt < options.retries:
                time.sleep(delay)
        self._failures, self._failed_at = self._failures + 1, time.monotonic()
        raise ModelCallError(f"{method} {_shown(url)}: {options.retries + 1} attempt(s) failed; last: {last}")

    def _attempt(self, method: str, url: str, data: bytes | None, headers: dict, limit: int) -> bytes:
        timeout = self.options.timeout
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        request.deadline = _Deadline(timeout)  # read by the handlers, which make the connection
        with request.deadline:
            try:
                answer = self._exchange(request, limit)
            except Exception:
                if not request.deadline.expired:
                    raise
        if request.deadline.expired:  # whatever the shut socket made the read say, or a body cut short
            raise TimeoutError(f"no whole answer within {timeout:g} s")
        return answer

    def _exchange(self, request: urllib.request.Request, limit: int) -> bytes:
        """The answer's body, at most ``limit`` bytes; _ErrorStatus for an error status."""
        try:
            response = _OPENER.open(request, timeout=self.options.timeout)
        except urllib.error.HTTPError as e:  # its body is never read: no error may quote it
            with e:
                raise _ErrorStatus(e.code, e.headers.get("Retry-After") if e.headers else None) from None
        with response:
            parts, size = [], 0
            while chunk := response.read1(1 << 16):  # what has arrived: read() would wait for it all
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise ModelCallError(f"{_shown(request.full_url)}: the answer is larger than {limit >> 10} KiB")
        return b"".join(parts)
