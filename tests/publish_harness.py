"""Publishing under faults, kills and races: prepared runs, a faulty storage, the invariant.

Used by tests/transforms/test_publication.py and benchmarks/publish_trials.py, and run as a script to
publish one prepared run in a subprocess (so that it can be killed, or raced by another):

    python tests/publish_harness.py --output OUT --run-id ID --manifest M.json [--delay S]
        [--jitter S] [--seed N] [--stale-after S] [--ready FILE] [--go FILE] [--storage-options JSON]

A *snapshot* is the output folder of one real, finished audit (run once per test module); a
trial installs copies of it under fresh run ids, so that each starts from "run P is published,
run R is complete and about to publish" in milliseconds. The script imports only
saliency_audit.transforms.io.publication and saliency_audit.transforms.io.storage (saliency_audit.pipelines.audit takes seconds to import).
"""
from __future__ import annotations

import argparse
import builtins
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saliency_audit.transforms.io import publication, storage  # noqa: E402
from saliency_audit.transforms.io.publication import Run  # noqa: E402

OUTPUTS = publication.OUTPUTS


# --- prepared runs ---------------------------------------------------------------------------

@dataclasses.dataclass
class Snapshot:
    """A finished run's files (relative to its output, its run id replaced by ``{run}``) and what
    any copy of it must read back as."""

    files: dict[str, bytes]
    manifest: str  # the manifest's text, run id replaced by {run}
    pairs: frozenset  # (image_id, method) of its saliency rows
    rows: dict[str, int]  # rows per output

    @classmethod
    def load(cls, output: str | Path) -> "Snapshot":
        import pyarrow.dataset as ds
        output = Path(output)
        manifest = json.loads((output / publication.POINTER).read_text())
        run_id = manifest["run_id"]
        files = {}
        for path in sorted(output.rglob("*")):
            relative = path.relative_to(output).as_posix()
            if path.is_file() and run_id in relative and not relative.endswith(".json") or \
                    relative in (f"{publication.RUNS}/{run_id}/{name}" for name in ("read.json", "devices.json",
                                                                                   "skipped.json")):
                files[relative.replace(run_id, "{run}")] = path.read_bytes()
        rows = ds.dataset([str(output / f) for f in manifest["files"]["saliency"]]).to_table(
            columns=["image_id", "method"]).to_pylist()
        counts = {name: ds.dataset([str(output / f) for f in files]).count_rows()
                  for name, files in manifest["files"].items()}
        return cls(files, json.dumps(manifest).replace(run_id, "{run}"),
                   frozenset((r["image_id"], r["method"]) for r in rows), counts)

    def manifest_for(self, run_id: str) -> dict:
        return json.loads(self.manifest.replace("{run}", run_id))

    def install(self, output: str, run_id: str, storage_options: dict | None = None, state: str | None = "running",
                files: bool = True) -> dict:
        """Write a copy of the run as ``run_id``: its folders, its marker in ``state`` (none if
        None), and if ``state`` is published, the pointer. Returns its manifest."""
        run = Run(output, run_id, storage_options)
        if files:
            for relative, data in self.files.items():
                storage.write_bytes_atomic(storage.join(output, relative.replace("{run}", run_id)), data,
                                           storage_options)
        manifest = self.manifest_for(run_id)
        if state == "published":
            publication.commit(run, manifest)
        elif state is not None:
            publication.write_marker(run, state, started=publication.now().isoformat(timespec="seconds"))
        return manifest


def publish(output: str, run_id: str, manifest: dict, storage_options: dict | None = None,
            stale_after_s: float = publication.DEFAULT_STALE_S) -> None:
    """The tail of saliency_audit.pipelines.audit.run from the commit on: publication.publish."""
    publication.publish(Run(output, run_id, storage_options), manifest, stale_after_s)


# --- a storage that is slow or fails ---------------------------------------------------------

FS_CALLS = ("pipe_file", "pipe", "open", "cat_file", "cat", "ls", "glob", "find", "rm", "rm_file", "exists",
            "info", "isdir", "isfile", "size", "makedirs", "mkdir", "put_file", "walk", "du")
OS_CALLS = ("replace", "makedirs", "unlink", "fsync")


class InjectedFault(OSError):
    pass


class Storage:
    """Wraps every storage call the code under test makes (the fsspec filesystem's methods,
    storage.read_bytes, and for local files open, os.replace, os.makedirs, ...): each call waits
    ``delay`` (+ up to ``jitter``) seconds, and call number ``fail_at`` (counted from arming)
    raises InjectedFault, before its effect, or after it (``after``: the effect happened but the
    caller hears of a failure, as when a response is lost)."""

    def __init__(self, delay: float = 0.0, jitter: float = 0.0, seed: int = 0, fail_at: int | None = None,
                 after: bool = False):
        self.delay, self.jitter, self.random = delay, jitter, random.Random(seed)
        self.reset(fail_at, after)

    def reset(self, fail_at: int | None = None, after: bool = False) -> "Storage":
        """Disarmed, no calls counted yet; then call ``fail_at`` (if any) fails."""
        self.fail_at, self.after = fail_at, after
        self.calls, self.faults, self.armed = 0, 0, False
        self.log: list[str] = []
        return self

    def call(self, name: str, fn: Callable, *args, **kwargs):
        if not self.armed:
            return fn(*args, **kwargs)
        if self.delay or self.jitter:
            time.sleep(self.delay + self.jitter * self.random.random())
        index, self.calls = self.calls, self.calls + 1
        self.log.append(f"{name} {args[0] if args else ''}")
        failing = index == self.fail_at
        if failing and not self.after:
            self.faults += 1
            raise InjectedFault(f"injected fault at storage call {index} ({name}, before)")
        result = fn(*args, **kwargs)
        if failing:
            self.faults += 1
            raise InjectedFault(f"injected fault at storage call {index} ({name}, after)")
        return result

    def install(self, patch: Callable[[Any, str, Any], None]) -> "Storage":
        """Patch saliency_audit.transforms.io.storage through ``patch(target, name, value)`` (monkeypatch.setattr)."""
        wrapper = self
        real_filesystem, real_read_bytes = storage.filesystem, storage.read_bytes

        class FS:
            def __init__(self, fs):
                self._fs = fs

            def __getattr__(self, name):
                attr = getattr(self._fs, name)
                if name in FS_CALLS and callable(attr):
                    return lambda *a, **k: wrapper.call(name, attr, *a, **k)
                return attr

        class OS:
            def __getattr__(self, name):
                attr = getattr(os, name)
                if name in OS_CALLS:
                    return lambda *a, **k: wrapper.call(f"os.{name}", attr, *a, **k)
                return attr

        def filesystem(url, storage_options=None):
            fs, path = real_filesystem(url, storage_options)
            return (FS(fs) if self.armed else fs), path  # pyarrow (in check) takes only a real one

        patch(storage, "filesystem", filesystem)
        patch(storage, "read_bytes", lambda url, so=None: self.call("read_bytes", real_read_bytes, url, so))
        patch(storage, "os", OS())
        patch(storage, "open", lambda *a, **k: self.call("open", builtins.open, *a, **k), raising=False)
        return self


def setattr_patch(target: Any, name: str, value: Any, raising: bool = True) -> None:
    setattr(target, name, value)


# --- the invariant ---------------------------------------------------------------------------

def check(output: str, expected: dict[str, Snapshot], storage_options: dict | None = None) -> str:
    """Assert that the output reads back as exactly one complete run of ``expected`` (run id ->
    snapshot), consistent with its manifest, through AuditDir and through pyarrow.dataset over
    the manifest's files; returns the published run's id."""
    import pyarrow.dataset as ds

    from saliency_audit.pipelines.reporting.audit_dir import AuditDir

    audit = AuditDir(output, storage_options)
    run_id = audit.manifest.get("run_id")
    assert run_id in expected, f"the pointer names run {run_id}, not one of {sorted(expected)}"
    snapshot, manifest = expected[run_id], audit.manifest
    own = snapshot.manifest_for(run_id)
    for key in ("counts", "outputs", "files", "methods"):
        assert manifest.get(key) == own[key], f"the pointer's {key} are not run {run_id}'s"
    fs, root = storage.filesystem(output, storage_options)
    fs.invalidate_cache()
    for name, files in manifest["files"].items():
        for relative in files:
            assert relative.startswith(f"{name}/run={run_id}/"), f"{relative} is not in run {run_id}'s folder"
            assert fs.exists(f"{root}/{relative}"), f"{relative}, listed by the manifest, is missing"
    rows = audit.rows("saliency", ["image_id", "method"])
    pairs = [(r["image_id"], r["method"]) for r in rows]
    assert len(pairs) == len(set(pairs)) and set(pairs) == snapshot.pairs, f"run {run_id}'s rows are mixed or lost"
    for method, counts in manifest["counts"].items():
        assert sum(m == method for _, m in pairs) == counts["explained"], f"{method}: rows != manifest's explained"
    assert {name: audit.table(name).num_rows for name in manifest["files"]} == snapshot.rows
    direct = ds.dataset([f"{root}/{f}" for f in manifest["files"]["saliency"]], filesystem=fs, format="parquet")
    assert direct.count_rows() == len(pairs)
    assert not fs.exists(f"{root}/saliency/saliency"), "nested saliency/saliency"
    return run_id


def leftovers(output: str, keep: set[str], storage_options: dict | None = None) -> list[str]:
    """Entries under the output that belong to no run in ``keep``: other runs' folders, markers,
    private files, and temporary files of interrupted writes."""
    fs, root = storage.filesystem(output, storage_options)
    fs.invalidate_cache()
    allowed = {publication.POINTER, publication.RUNS, *OUTPUTS}
    found = [name for name in _names(fs, root) if name not in allowed]
    for name in OUTPUTS:
        found += [f"{name}/{entry}" for entry in _names(fs, f"{root}/{name}")
                  if entry not in {f"run={k}" for k in keep}]
    found += [f"{publication.RUNS}/{entry}" for entry in _names(fs, f"{root}/{publication.RUNS}")
              if entry not in set(keep) | {f"{k}.json" for k in keep}]
    return sorted(found)


def _names(fs, path: str) -> list[str]:
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


# --- the subprocess --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--manifest", required=True, help="the run's manifest (a local JSON file)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each storage call waits")
    parser.add_argument("--jitter", type=float, default=0.0, help="up to this many seconds more, at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stale-after", type=float, default=publication.DEFAULT_STALE_S)
    parser.add_argument("--ready", help="create this file once started, just before publishing (or waiting)")
    parser.add_argument("--go", help="wait for this file to exist, then publish")
    parser.add_argument("--storage-options", type=json.loads, default={})
    args = parser.parse_args(argv)
    manifest = json.loads(Path(args.manifest).read_text())
    storage.filesystem(args.output, args.storage_options)  # import the backend before the clock starts
    Storage(args.delay, args.jitter, args.seed).install(setattr_patch).armed = True
    if args.ready:
        Path(args.ready).touch()
    while args.go and not os.path.exists(args.go):
        time.sleep(0.0005)
    started = time.monotonic()
    try:
        publish(args.output, args.run_id, manifest, args.storage_options, args.stale_after)
    except Exception as e:
        print(f"publish failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"published in {time.monotonic() - started:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
