"""Publishing a run's results on storage that has no atomic directory rename (S3, GCS, ...).

Layout under an audit's ``--output``::

    manifest.json                      the pointer: the published run's manifest, written last in one put
    verdict.json                       the gates' verdict, naming its run (removed before each pointer put)
    saliency/run=<id>/part-*.parquet   every run writes its outputs into folders of its own (hive-style
    summary/run=<id>/  errors/run=<id>/  sanity/run=<id>/   names, so pyarrow.dataset on OUTPUT/saliency reads them)
    saliency/model=<sha256>/run=<id>/  the same for a run of an audit history (--incremental), by model
    history/<slot>.parquet             an audit history's runs, one row per slot (saliency_audit.transforms.io.history)
    _runs/<id>.json                    the run's state: running (with a heartbeat) | published | failed
    _runs/<id>/                        the run's private files: the read count, committed file lists, its manifest

Nothing is ever moved or copied. A run becomes the result when its manifest replaces
``manifest.json``; one put of one small object is atomic on object stores, and on local disks
the pointer is written to a temporary name of its own and renamed. Readers follow the pointer's
``outputs`` (``saliency_audit.pipelines.reporting.AuditDir`` does), so they see exactly one run's complete
result at every moment: before the put the previous run, after it the new one.

Folders of runs that lost (a failed run, a killed one, a run superseded by a later put) are
removed by ``reclaim``, which every run calls after publishing. It deletes a run's folders only
when neither the pointer nor the history names it (a history file that does not parse may name
any run: while one is there, no run of the history is removed) and the run is finished
(published or failed: those states are written after the run's last put, its history row
included) or its heartbeat is stale (killed). The markers are listed *before* the pointer and the history are read: a run seen
as published then had put its pointer and row before those reads, so if neither names it, it was
superseded for good.
"""
from __future__ import annotations

import datetime
import json
import logging
import posixpath
import threading
import time
import uuid
from typing import Any, Callable

from saliency_audit.explainers.core.paths import redact
from saliency_audit.transforms.io import history, storage

log = logging.getLogger("saliency_audit")

POINTER = "manifest.json"
VERDICT = "verdict.json"  # the gates' verdict of the published run (saliency_audit.pipelines.checks.gates), next to the pointer
RUNS = "_runs"
OUTPUTS = ("saliency", "summary", "errors", "sanity", "findings")
HEARTBEAT_S = 60.0
DEFAULT_STALE_S = 30 * 60.0  # a run whose heartbeat is older than this was killed
MIN_STALE_S = 2 * HEARTBEAT_S  # shorter, and a live run could be taken for a killed one
# A run that failed while putting its pointer keeps its files this long: a put the client gave up
# on may still land, and the pointer must not name removed files.
LATE_PUT_GRACE_S = 2 * HEARTBEAT_S


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_run_id() -> str:
    """Sortable by start time (to the second), then random: two runs never share one."""
    return now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class Run:
    """One run's places under an audit's output: its output folders, its private folder, its marker."""

    def __init__(self, output: str, run_id: str, storage_options: dict[str, Any] | None = None,
                 model: str | None = None):
        self.output, self.run_id = output.rstrip("/"), run_id
        self.storage_options = storage_options or {}
        self.model = model  # a history's run: its folders are partitioned by model too

    def relative(self, name: str) -> str:
        """The output ``name``'s folder of this run, relative to the output directory."""
        return f"{name}/model={self.model}/run={self.run_id}" if self.model else f"{name}/run={self.run_id}"

    def folder(self, name: str) -> str:
        """Where the run writes the output ``name`` (saliency, summary, errors, sanity)."""
        return storage.join(self.output, self.relative(name))

    def private(self, *parts: str) -> str:
        return storage.join(self.output, RUNS, self.run_id, *parts)

    @property
    def marker(self) -> str:
        return storage.join(self.output, RUNS, f"{self.run_id}.json")

    def relative_outputs(self, names=OUTPUTS) -> dict[str, str]:
        """The manifest's ``outputs``: folders relative to the output directory."""
        return {name: f"{self.relative(name)}/" for name in names}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def read_pointer(output: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The published manifest, or None when nothing was published yet."""
    try:
        return json.loads(storage.read_bytes(storage.join(output, POINTER), storage_options))
    except FileNotFoundError:
        return None


def published_run(manifest: dict | None) -> str | None:
    return (manifest or {}).get("run_id") if (manifest or {}).get("layout") == "run-folders" else None


class Heartbeat:
    """Keeps the run's marker fresh while the job runs, so reclaim never takes a live run for a
    killed one."""

    def __init__(self, run: Run, interval: float = HEARTBEAT_S):
        self.run, self.interval = run, interval
        self.started = now().isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        write_marker(self.run, "running", started=self.started)

    def __enter__(self) -> "Heartbeat":
        self.beat()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{self.run.run_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # a missed beat only makes the run look older
                log.warning("heartbeat of run %s failed: %s", self.run.run_id, e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def write_marker(run: Run, state: str, **fields: Any) -> None:
    body = {"run_id": run.run_id, "state": state, "heartbeat": now().isoformat(timespec="seconds"),
            "model": run.model, **fields}
    storage.write_bytes_atomic(run.marker, _json(body), run.storage_options)


def commit(run: Run, manifest: dict, after_pointer: Callable[[], None] | None = None) -> None:
    """Make the run the audit's result: its manifest becomes the pointer (one put), then
    ``after_pointer`` runs (the gates, the history's row), then its marker says published, which
    lets later runs reclaim it once superseded. Raises only if the pointer was not written; once
    it is, the run is the result whatever happens next.

    The previous run's verdict.json is removed before the pointer is put: there is no atomic pair
    of puts, so a verdict could otherwise sit beside a manifest it does not judge. A verdict
    names its run (``audit.run_id``) and the manifest says whether its run writes one
    (``verdict``), so a reader can tell a missing or foreign verdict even when runs race."""
    body = _json(manifest)
    storage.write_bytes_atomic(run.private(POINTER), body, run.storage_options)
    storage.remove_tree(storage.join(run.output, VERDICT), run.storage_options)
    storage.write_bytes_atomic(storage.join(run.output, POINTER), body, run.storage_options)
    if after_pointer is not None:
        try:
            after_pointer()
        except Exception as e:  # the run is published; what came after is reported, not undone
            log.error("run %s is published, but what follows its publication failed: %s: %s", run.run_id,
                      type(e).__name__, e)
    try:
        write_marker(run, "published")
    except Exception as e:  # the marker stays "running": reclaimed once stale and superseded
        log.warning("run %s is published, but its marker could not be updated: %s", run.run_id, e)


def abandon(run: Run, reason: str, pointer_attempted: bool = False) -> None:
    """A run that will not be published: say so, then remove what it wrote (or, if it tried to
    put its pointer, leave that to reclaim once LATE_PUT_GRACE_S has passed)."""
    write_marker(run, "failed", reason=redact(reason)[:500], pointer_attempted=pointer_attempted)
    if not pointer_attempted:
        _remove_run(run)


def publish(run: Run, manifest: dict, stale_after_s: float = DEFAULT_STALE_S,
            after_pointer: Callable[[], None] | None = None) -> bool:
    """Commit the run, then reclaim the folders of runs that can no longer be the result. Returns
    True; raises if the run did not become the result. A failure after the pointer was written
    (a lost reply, the marker) still leaves the run published, and is only logged."""
    try:
        commit(run, manifest, after_pointer)
    except BaseException as e:
        try:
            published = published_run(read_pointer(run.output, run.storage_options)) == run.run_id
        except Exception:
            published = False
        if not published:
            try:
                abandon(run, f"{type(e).__name__}: {e}", pointer_attempted=True)
            except Exception as e2:  # storage is failing: reclaim removes the run once it is stale
                log.warning("could not mark run %s failed: %s", run.run_id, e2)
            raise
        log.warning("run %s is published, but committing it reported %s: %s", run.run_id, type(e).__name__, e)
    reclaim(run.output, run.storage_options, stale_after_s)
    return True


def _remove_run(run: Run) -> None:
    # Output folders and private files first, the marker last: an interrupted removal leaves
    # the marker, so the next reclaim finishes the job.
    for url in [run.folder(name) for name in OUTPUTS] + [run.private()]:
        storage.remove_tree(url, run.storage_options)
    storage.remove_tree(run.marker, run.storage_options)


def list_markers(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict]:
    """run id -> marker body, listed afresh (object-store listings are cached by fsspec)."""
    fs, path = storage.filesystem(storage.join(output, RUNS), storage_options)
    fs.invalidate_cache()
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    markers = {}
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        if not name.endswith(".json"):
            continue
        try:
            body = json.loads(fs.cat_file(entry))
        except (FileNotFoundError, ValueError):
            continue  # removed or being replaced right now: the next reclaim sees it
        markers[name[:-len(".json")]] = body
    return markers


def _age_s(stamp: str | None) -> float:
    try:
        return (now() - datetime.datetime.fromisoformat(stamp)).total_seconds()
    except (TypeError, ValueError):
        return float("inf")


def reclaim(output: str, storage_options: dict[str, Any] | None = None, stale_after_s: float = DEFAULT_STALE_S,
            keep: str | None = None) -> list[str]:
    """Remove the folders of runs that can never become the result; returns their ids. Best
    effort: a failure is logged (the next run tries again), never raised.

    ``keep``: a run id never to remove (the caller's own, before it is published)."""
    removed = []
    try:
        markers = list_markers(output, storage_options)  # before the pointer: see the module's docstring
        current = published_run(read_pointer(output, storage_options))
        recorded = history.recorded_runs(output, storage_options) if markers else history.Recorded(set(), [])
        if recorded.unreadable:
            log.warning("reclaim of %s keeps every run of the history: %s in %s/ unreadable or left out "
                        "(repair or remove it)", output, ", ".join(recorded.unreadable), history.FOLDER)
        for run_id, marker in sorted(markers.items()):
            model = marker.get("model")
            model = model if history.MODEL.fullmatch(str(model)) else None  # a history's run, by model
            if run_id in (current, keep) or run_id in recorded.runs or (model and recorded.unreadable):
                continue
            age = _age_s(marker.get("heartbeat"))
            finished = marker.get("state") == "published" or (
                marker.get("state") == "failed" and (not marker.get("pointer_attempted") or age > LATE_PUT_GRACE_S))
            if finished or age > stale_after_s:
                _remove_run(Run(output, run_id, storage_options, model))
                removed.append(run_id)
        _remove_legacy(output, storage_options, current)
        _remove_temporaries(output, storage_options, stale_after_s)
    except Exception as e:
        log.warning("could not remove the folders of earlier runs of %s: %s", output, e)
    if removed:
        log.info("reclaimed the folders of %d earlier run(s): %s", len(removed), ", ".join(removed))
    return removed


def _remove_legacy(output: str, storage_options: dict[str, Any] | None, current: str | None) -> None:
    """Files of the layout before run folders (OUTPUT/saliency/part-*.parquet, _staging-*), once a
    run-folder result is published: they belong to no run and would mix into directory reads."""
    if current is None:
        return
    fs, path = storage.filesystem(output, storage_options)
    fs.invalidate_cache()
    for name in OUTPUTS:
        for file in storage.glob_in(fs, f"{path}/{name}", "*.parquet"):
            fs.rm_file(file)
    for folder in storage.glob_in(fs, path, "_staging-*"):
        fs.rm(folder, recursive=True)


def _remove_temporaries(output: str, storage_options: dict[str, Any] | None, stale_after_s: float) -> None:
    """Temporary files of local single-step writes (storage.write_bytes_atomic) whose writer was
    killed before its rename; only old ones: a younger one may be a live writer's."""
    fs, path = storage.filesystem(output, storage_options)
    if not storage.is_local(fs):
        return
    patterns = [(path, f"{POINTER}.tmp-*"), (f"{path}/{RUNS}", "*.tmp-*"),  # (older releases' names)
                (path, f".{POINTER}.tmp-*"), (f"{path}/{RUNS}", ".*.tmp-*"), (f"{path}/{history.FOLDER}", ".*.tmp-*")]
    for file in [f for folder, pattern in patterns for f in storage.glob_in(fs, folder, pattern)]:
        try:
            if time.time() - fs.info(file)["mtime"] > stale_after_s:
                fs.rm_file(file)
        except FileNotFoundError:
            pass  # renamed or removed meanwhile
