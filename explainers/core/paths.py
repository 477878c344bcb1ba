"""Paths and URLs as messages may show them: without what may hold credentials (a query, user info).
Here, in the lowest layer, because methods that read files (abele's autoencoder, a background
file) report on paths too; transforms.io.storage uses the same."""
from __future__ import annotations

import contextlib
import re
import sys
import threading

# A query (?key=value..., a presigned signature, an Azure SAS token) or a fragment with a value: from
# the first ? or # followed by a name and '=' before any '/' (a glob's ? is followed by no '=').
_QUERY = re.compile(r"[?#][^/?#=]*=.*$", re.DOTALL)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
REDACTED = "<redacted>"


def shown(url: str) -> str:
    """A path or URL as a message may print it: without a query or user info, which may hold
    credentials (a glob's ``?`` stays)."""
    return _USERINFO.sub(r"\1", _QUERY.sub("", str(url)))


def has_query(url: str) -> bool:
    """Whether a path or URL carries a query (?key=value): a presigned signature, a SAS token."""
    return bool(_QUERY.search(str(url)))


def _query_values(url: str) -> list[str]:
    """The values of the query (or fragment) of ``url``, each of which a client may quote alone."""
    query = _QUERY.search(url)
    return [part.partition("=")[2] for part in re.split(r"[?#&;]", query.group(0))] if query else []


def unquoted(text: str, url: str) -> str:
    """``text`` (an error's message) with ``url``, its query, and each value of the query wherever
    it appears alone (a client may quote the URL re-encoded), replaced by what ``shown`` keeps."""
    url = str(url)
    text = str(text).replace(url, shown(url))
    query = _QUERY.search(url)
    if query:
        text = text.replace(query.group(0), "")
    for value in _query_values(url):
        if len(value) >= 4:
            text = text.replace(value, REDACTED)
    return text


# --- storage-option values in messages ------------------------------------------------------------
# Storage clients quote the values they were given in their errors (botocore: "Invalid endpoint:
# <endpoint_url>", "Provided region_name '<region>'", the endpoint URL of a failed connection), and
# any option may hold a credential whatever it is called. So every string value of the storage
# options this process was given is a secret: redact() takes it out of a message, in each form a
# message may quote it, where the message leaves the process (the standard streams, the reasons of
# error rows, the report page). The values are kept per process: each process that opens storage
# (a Beam worker too) registers the options it opens with.
# A value under such a name is a secret from MIN_CREDENTIAL characters; any other from MIN_SECRET, unless
# it is a plain word or a lowercase name ("auto", a profile "default", an addressing style "virtual", a
# region "eu-west-1", a project "acme-ml-prod"): buckets and paths are named after those, and cutting
# them out garbled every path, message and report holding them; no credential looks like one.
_CREDENTIAL_NAME = re.compile(r"auth|token|key|secret|password|passwd|cookie|session|signature|credential|sas",
                              re.IGNORECASE)
MIN_CREDENTIAL, MIN_SECRET = 4, 6
_PLAIN_WORD = re.compile(r"[A-Za-z]{1,15}|[a-z0-9][a-z0-9._-]{0,62}")
# gcsfs's token names how to authenticate as well as holding a credential ({"token": "anon"} reads a
# public bucket): a mode is no secret, and "anon" or "cloud" cut out of every word holding them garbled paths
GCSFS_TOKEN_MODES = ("anon", "browser", "cache", "cloud", "google_default")
_secrets: set[str] = set()
_lock = threading.Lock()  # readers on several threads register at once
_forms: tuple[str, ...] = ()  # every quoted form of every secret, longest first (rebound whole: threads read it)


def keep_secret(options, name: str = "") -> None:
    """Register the string values of storage options (nested objects and lists included), and the
    user info, password and query values of the URLs among them, which a client may quote alone."""
    if isinstance(options, dict):
        for key, value in options.items():
            keep_secret(value, str(key))
    elif isinstance(options, (list, tuple)):
        for value in options:
            keep_secret(value, name)
    elif isinstance(options, str) and options.strip():
        parts = [options]
        userinfo = re.match(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://)?([^/?#@]*)@", options)
        if userinfo:
            parts += [userinfo.group(1), userinfo.group(1).partition(":")[2]]
        parts += _query_values(options)
        if name == "token" and options.strip() in GCSFS_TOKEN_MODES:
            new = set()
        elif _CREDENTIAL_NAME.search(name):
            new = {p for p in parts if len(p.strip()) >= MIN_CREDENTIAL}
        else:
            new = {p for p in parts if len(p.strip()) >= MIN_SECRET and not _PLAIN_WORD.fullmatch(p.strip())}
        if not new <= _secrets:
            with _lock:
                _remember(_secrets | new)
                if not isinstance(sys.stderr, RedactingStream):
                    # no command redacts this process's streams: a Beam worker's own process (multi_processing,
                    # a worker pool), whose log lines and tracebacks go to the stderr it inherited. Its
                    # secrets are for good, so are its redacted streams (set once: the check is under the lock)
                    _redirect_streams()


def _remember(secrets: set[str]) -> None:
    global _forms
    _secrets.clear()
    _secrets.update(secrets)
    _forms = tuple(sorted(_quoted_forms(secrets), key=len, reverse=True))


def _quoted_forms(secrets) -> set[str]:
    import html
    import json
    import urllib.parse
    forms = set()
    for secret in secrets:
        # as is, as a one-line message folds it, and its long words (a message may break it at whitespace)
        for value in {secret, secret.strip(), " ".join(secret.split()), *(w for w in secret.split() if len(w) >= 8)}:
            escaped = json.dumps(value)[1:-1]
            forms |= {value, repr(value)[1:-1], escaped, escaped.replace("/", "\\/"), html.escape(value),
                      urllib.parse.quote(value), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
                      _c_escaped(value, False), _c_escaped(value, True)}
    return {f for f in forms if f}


_C_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "'": "\\'", "\\": "\\\\"}


def _c_escaped(value: str, utf8: bool) -> str:
    """``value`` as protobuf's text format writes a string (Beam's launcher logs its workers' log
    entries so): quotes, backslashes and control characters escaped, non-ASCII bytes in octal unless
    ``utf8``."""
    if utf8:
        return "".join(_C_ESCAPES.get(c, c if 32 <= ord(c) != 127 else f"\\{ord(c):03o}") for c in value)
    return "".join(_C_ESCAPES.get(chr(b), chr(b) if 32 <= b < 127 else f"\\{b:03o}") for b in value.encode())


def redact(text: str, placeholder: str = REDACTED) -> str:
    """``text`` without any registered storage-option value (see keep_secret); ``placeholder`` in
    their place (HTML takes it escaped)."""
    text = str(text)
    for form in _forms:
        if form in text:
            text = text.replace(form, placeholder)
    return text


class RedactingStream:
    """A text stream that redacts what is written through it (see redacted_streams)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact(text) if _forms else text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding...: the stream's own
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_streams():
    """stdout and stderr redacted while a command runs: its prints, its log lines (a handler made
    meanwhile writes through the wrapper, and keeps redacting after) and tracebacks, whichever
    layer raised the message."""
    secrets = set(_secrets)
    saved, handlers = _redirect_streams()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for handler, stream in handlers:
            handler.stream = stream
        if not isinstance(saved[1], RedactingStream):  # the outermost command: its secrets end with it
            with _lock:
                _remember(secrets)


def _redirect_streams():
    """stdout, stderr and the log handlers writing to them redacting; returns what to restore."""
    saved = (sys.stdout, sys.stderr)
    # None stays None (pythonw, a service without a console): print and warnings skip it, a wrapper would raise
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, RedactingStream) else RedactingStream(s) for s in saved)
    # a handler made before holds the bare stream (importing Beam leaves the root logger one on stderr,
    # which every command but run logs through, and a Beam worker all its log lines): it writes through the wrapper
    wrapped = dict(zip(map(id, saved), (sys.stdout, sys.stderr)))
    handlers = [(h, h.stream) for h in _stream_handlers() if id(h.stream) in wrapped and h.stream is not None]
    for handler, stream in handlers:
        handler.stream = wrapped[id(stream)]
    return saved, handlers


def _stream_handlers() -> list:
    import logging
    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(lg, logging.Logger))]
    # (the stream an attribute of its own: logging's lastResort reads sys.stderr through a property)
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler) and "stream" in vars(h)]
