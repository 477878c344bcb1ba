"""Progress of a running audit, on runners whose workers are other processes or other machines.

Workers count what they read and explain, and each worker process writes its counts to a small
JSON file of its own in the run's private folder (``_runs/<id>/progress/``): at most every
``WRITE_S`` seconds while a bundle runs, and at the end of each bundle. The launcher polls the
files, sums them and shows one updating line on a terminal, or a plain line every ``LOG_S``
seconds otherwise (written to the stream itself, whatever the logging setup). Beam's metrics
cannot serve: the in-process runner runs the job synchronously, and remote runners do not
report them while the job runs.

Retried bundles: the reader's counts are kept per shard and the poller takes one attempt per
shard, so records read are never counted twice; the explain step's counts are capped at the
records read. Progress is best effort: a failed write or poll is logged once, never raised.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, TextIO

from saliency_audit.transforms.io import storage

log = logging.getLogger("saliency_audit")

WRITE_S = 5.0  # a worker's puts at most this often while a bundle runs (each is a request on S3)
POLL_S = 2.0  # how often the terminal line polls the files
LOG_S = 30.0  # how often a plain line is written (and the files polled) when stderr is not a terminal
RATE_WINDOW_S = 60.0  # the rate (and so the ETA) is measured over this last stretch


@dataclasses.dataclass(frozen=True)
class Sink:
    """Where a run's workers write their progress files."""

    url: str
    storage_options: dict[str, Any] | None = dataclasses.field(default=None, hash=False)


def sink_for(run) -> Sink:
    """The progress folder of a ``publication.Run``."""
    return Sink(run.private("progress"), run.storage_options)


# ---------------------------------------------------------------- worker side

class _Worker:
    """This process's counts for one run, and its progress file."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.url = storage.join(sink.url, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
        self.lock, self.write_lock = threading.Lock(), threading.Lock()
        self.shards: dict[str, list] = {}  # shard url -> [records read, of them failed, shard complete]
        self.explained = 0
        self.asked: dict[str, int] = {}  # images the model was asked, per method and in all ("*")
        self.version = self.written_version = 0
        self.written_at = float("-inf")
        self.warned = False

    def add(self, shard: str | None = None, read: int = 0, failed: int = 0, complete: bool = False,
            restart: bool = False, explained: int = 0, asked: dict[str, int] | None = None) -> None:
        with self.lock:
            for key, n in (asked or {}).items():
                self.asked[key] = self.asked.get(key, 0) + n
            if shard is not None:
                entry = [0, 0, False] if restart else self.shards.get(shard, [0, 0, False])
                self.shards[shard] = [entry[0] + read, entry[1] + failed, entry[2] or complete]
            self.explained += explained
            self.version += 1
            due = time.monotonic() - self.written_at >= WRITE_S
        if due:
            self.write(wait=False)

    def write(self, wait: bool) -> None:
        """Put the counts if they changed; ``wait=False`` skips when another thread is writing."""
        if not self.write_lock.acquire(blocking=wait):
            return
        try:
            with self.lock:
                if self.version == self.written_version:
                    return
                version = self.version
                body = {"shards": {url: list(entry) for url, entry in self.shards.items()},
                        "explained": self.explained, "asked": dict(self.asked),
                        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            self.written_at = time.monotonic()
            storage.write_json_atomic(self.url, body, self.sink.storage_options)
            self.written_version = version
        except Exception as e:  # progress is only for show: the run goes on without it
            if not self.warned:
                self.warned = True
                log.warning("could not write progress to %s (the run goes on): %s: %s", self.url, type(e).__name__, e)
        finally:
            self.write_lock.release()


_workers: dict[str, _Worker] = {}
_workers_lock = threading.Lock()


def _worker(sink: Sink) -> _Worker:
    with _workers_lock:
        if sink.url not in _workers:
            _workers[sink.url] = _Worker(sink)
        return _workers[sink.url]


def shard_started(sink: Sink | None, shard: str) -> None:
    """A (re)read of a shard starts: its counts in this process start again."""
    if sink is not None:
        _worker(sink).add(shard, restart=True)


def record_read(sink: Sink | None, shard: str, failed: bool = False) -> None:
    """One record read from ``shard``; ``failed``: it became an error before the explain step."""
    if sink is not None:
        _worker(sink).add(shard, read=1, failed=int(failed))


def shard_finished(sink: Sink | None, shard: str) -> None:
    if sink is not None:
        _worker(sink).add(shard, complete=True)


def images_explained(sink: Sink | None, n: int) -> None:
    """``n`` images went through the explain step (rows or errors)."""
    if sink is not None:
        _worker(sink).add(explained=n)


def model_asked(sink: Sink | None, what: str, images: int) -> None:
    """The model was asked ``images`` images by method ``what`` ("*": all the step asked)."""
    if sink is not None and images:
        _worker(sink).add(asked={what: images})


def flush(sink: Sink | None) -> None:
    """At the end of a bundle: put the counts if they changed since the last put."""
    if sink is not None:
        _worker(sink).write(wait=True)


# ---------------------------------------------------------------- launcher side

@dataclasses.dataclass(frozen=True)
class Totals:
    read: int = 0  # records read so far
    failed: int = 0  # of them, errors before the explain step
    explained: int = 0  # images through the explain step
    shards_read: int = 0  # shards read to the end
    records_in_read_shards: int = 0
    asked: dict[str, int] = dataclasses.field(default_factory=dict)  # images the model was asked ("*": all)

    @property
    def done(self) -> int:
        """Images finished, capped at the records read: a retried bundle may count twice."""
        return min(self.explained + self.failed, self.read)


def poll(sink: Sink) -> Totals:
    """The sum of the workers' files. Per shard, the attempt that read it to the end (or read
    most) counts, so a shard read again after a failure counts once."""
    fs, path = storage.filesystem(sink.url, sink.storage_options)
    fs.invalidate_cache()
    try:
        files = storage.glob_in(fs, path, "*.json")  # temporary names (*.json.tmp-*) do not match
    except FileNotFoundError:
        files = []
    shards: dict[str, tuple[bool, int, int]] = {}
    explained, asked = 0, {}
    for data in fs.cat(files, on_error="omit").values() if files else ():  # concurrent on object stores
        try:
            body = json.loads(data)
            count = int(body["explained"])
            for key, n in (body.get("asked") or {}).items():
                asked[str(key)] = asked.get(str(key), 0) + int(n)
            attempts = {url: (bool(complete), int(read), int(failed))
                        for url, (read, failed, complete) in body["shards"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not a progress file
        explained += count
        for url, attempt in attempts.items():
            shards[url] = max(shards.get(url, attempt), attempt)
    complete = [a for a in shards.values() if a[0]]
    return Totals(read=sum(a[1] for a in shards.values()), failed=sum(a[2] for a in shards.values()),
                  explained=explained, shards_read=len(complete), records_in_read_shards=sum(a[1] for a in complete),
                  asked=asked)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def describe(totals: Totals, shards: int, rate: float | None, limit_per_shard: int | None = None) -> str:
    """One line: images explained of the records read so far, the rate, the shards read, and
    the time left: exact once every shard is read, else estimated from the shards read (or,
    before any is, from --limit-per-shard)."""
    known = totals.shards_read >= shards
    done, total = totals.done, totals.read
    if known:
        head = f"explained {done:,}/{total:,} images ({100 * done / total if total else 100:.0f}%)"
    else:
        head = f"explained {done:,}/{total:,}+ images"
    parts = [head, f"{rate:.1f} images/s" if rate is not None else "- images/s",
             f"{min(totals.shards_read, shards)}/{shards} shards read"]
    if known:
        expected = total
    elif totals.shards_read:
        expected = totals.records_in_read_shards / totals.shards_read * shards
    else:
        expected = limit_per_shard * shards if limit_per_shard else None
    if expected is None or not rate:
        parts.append("ETA -")
    else:
        parts.append(f"ETA {'' if known else '~'}{duration(max(0.0, expected - done) / rate)}")
    if totals.asked.get("*"):
        parts.append(f"model asked {totals.asked['*']:,} images")
    return " | ".join(parts)


def asked_per_image(totals: Totals) -> str:
    """Per method, the images the model was asked per image explained (the cost of a black box)."""
    if not totals.explained or not totals.asked:
        return ""
    shown = [f"{key if key != '*' else 'in all'} {n / totals.explained:,.1f}" for key, n in totals.asked.items()]
    return "; model asked per image: " + ", ".join(shown[1:] + shown[:1] if shown[0].startswith("in all") else shown)


class Display:
    """Polls the workers' progress files while the job runs and shows them: one updating line
    when ``stream`` is a terminal, else a plain line at most every ``log_s`` seconds.

        with progress.Display(progress.sink_for(run), len(shards), limit_per_shard), beam.Pipeline(...) as p:

    (the Display first: the pipeline runs when its ``with`` exits)."""

    def __init__(self, sink: Sink, shards: int, limit_per_shard: int | None = None, stream: TextIO | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic, poll_s: float = POLL_S,
                 log_s: float = LOG_S):
        self.sink, self.shards, self.limit_per_shard = sink, shards, limit_per_shard
        self.clock, self.log_s = clock, log_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.poll_s = poll_s if self.tty else log_s
        self.started = clock()
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])
        self.totals = Totals()
        self.logged_at = self.started
        self.warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rate(self) -> float | None:
        (t0, done0), (t1, done1) = self.samples[0], self.samples[-1]
        return (done1 - done0) / (t1 - t0) if t1 > t0 else None

    def refresh(self) -> float:
        """Poll once (a failure keeps the last totals); returns the time of the poll."""
        try:
            self.totals = poll(self.sink)
        except Exception as e:  # the job itself is not affected
            self._warn(f"could not read progress from {self.sink.url}: {type(e).__name__}: {e}")
        now = self.clock()
        self.samples.append((now, self.totals.done))
        # Keep the window long enough to hold a change: with batches slower than the window the
        # rate would otherwise drop to 0 between two batches. A stall still lowers it, as time grows.
        while (len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S
               and self.samples[1][1] < self.samples[-1][1]):
            self.samples.popleft()
        return now

    def tick(self) -> None:
        """Poll once and show the result (on a terminal; elsewhere once ``log_s`` has passed)."""
        now = self.refresh()
        if self.tty:
            self._show(self.line(), end="")
        elif now - self.logged_at >= self.log_s:
            self.logged_at = now
            self._show(self.line())

    def line(self) -> str:
        return describe(self.totals, self.shards, self.rate(), self.limit_per_shard)

    def _show(self, line: str, end: str = "\n") -> None:
        """On a terminal, replace the line; elsewhere, one plain line each time."""
        self.stream.write(f"\r{line}\x1b[K{end}" if self.tty else f"progress: {line}{end}")
        self.stream.flush()

    def finish(self, succeeded: bool) -> None:
        """The last line: after a finished job every record read is done, whatever the files say
        (a worker's last put may lag, and repeated ids never reach the explain step)."""
        elapsed = self.refresh() - self.started
        if succeeded and self.totals.read:
            read = self.totals.read
            line = (f"done: {read:,} images in {duration(elapsed)} ({read / elapsed if elapsed > 0 else 0:.1f} images/s)"
                    + asked_per_image(self.totals))
        elif succeeded:  # no worker's counts arrived
            line = f"done in {duration(elapsed)}"
        else:
            line = f"stopped after {duration(elapsed)}: {self.line()}"
        self._show(line)

    def __enter__(self) -> "Display":
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as e:  # a stream that cannot be written: the job goes on
                self._warn(f"could not show progress: {type(e).__name__}: {e}")

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.finish(succeeded=exc_type is None)
        except Exception as e:  # never let the display fail (or mask the failure of) the run
            self._warn(f"could not show progress: {type(e).__name__}: {e}")

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning("%s", message)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except Exception:
        return False
