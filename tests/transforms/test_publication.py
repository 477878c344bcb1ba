"""Results are never lost or mixed: publishing under a fault at every storage call, under
SIGKILL at random moments, and with two runs publishing at once, on local disk and on S3 (moto).

Two real runs are made once per module (P: sal on 5 digits, R: grad on 3); every trial installs
copies of them under fresh run ids (tests/publish_harness.py) and checks the invariant: the
output reads back as exactly one complete run, P's or R's, through its manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, add_member
from publish_harness import InjectedFault, Snapshot, Storage, check, leftovers, publish

from saliency_audit.pipelines import audit  # noqa: E402
from saliency_audit.pipelines.job import phases
from saliency_audit.transforms.io import publication  # noqa: E402

HARNESS = Path(__file__).resolve().parents[1] / "publish_harness.py"


@dataclasses.dataclass
class Prepared:
    P: Snapshot
    R: Snapshot
    plans: dict[str, audit.Plan]


def prepare(root: Path, shard: Path, model_args: list[str]) -> Prepared:
    """Two real, distinguishable runs (different methods and digits) and their plans."""
    with tarfile.open(shard) as src, tarfile.open(root / "s.tar", "w") as dst:
        for member in src.getmembers()[:12]:  # 6 digits
            add_member(dst, member.name, src.extractfile(member).read())
    plans, real_plan, snapshots = {}, audit.plan, {}

    def capture(argv):
        plans[argv[argv.index("--output") + 1]] = real_plan(argv)
        return plans[argv[argv.index("--output") + 1]]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "plan", capture)
        for name, methods, limit in (("P", "sal", "5"), ("R", "grad", "3")):
            audit.run(["--input", str(root / "s.tar"), *model_args, "--channels", "1", "--no-metrics",
                       "--limit-per-shard", limit, "--methods", methods, "--output", str(root / name)])
            snapshots[name] = Snapshot.load(root / name)
    assert not snapshots["P"].pairs & snapshots["R"].pairs
    return Prepared(snapshots["P"], snapshots["R"], {name: plans[str(root / name)] for name in ("P", "R")})


@contextlib.contextmanager
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 with the bucket publish-bucket; yields the storage options."""
    import s3fs
    from moto.server import ThreadedMotoServer
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir("publish-bucket")
        yield {"endpoint_url": endpoint}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_shard, demo_model_args) -> Prepared:
    return prepare(tmp_path_factory.mktemp("prepared"), demo_shard, demo_model_args)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with moto_s3(monkeypatch_module) as options:
        yield options


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(a function giving a fresh output URL per trial, storage options) on local disk or S3."""
    counter = itertools.count()
    if request.param == "local":
        return (lambda: str(tmp_path / f"out-{next(counter)}")), {}
    options = request.getfixturevalue("s3")
    prefix = f"s3://publish-bucket/{request.node.name.replace('[', '-').rstrip(']')}"
    return (lambda: f"{prefix}/out-{next(counter)}"), options


def plan_for(plan: audit.Plan, output: str, storage_options: dict, reclaim_after: float) -> audit.Plan:
    options = dataclasses.replace(plan.options, output=output, storage_options=storage_options,
                                  reclaim_after=reclaim_after)
    return dataclasses.replace(plan, options=options)


class AuditRun:
    """audit.run for real from its start, with the plan cached and the job replaced by a copy of a
    prepared run's files into the run's folders; ``storage`` is armed once the job is done, so
    faults hit verify, the manifest, commit, abandon and reclaim."""

    def __init__(self, monkeypatch, prepared: Prepared, storage: Storage):
        self.monkeypatch, self.prepared, self.storage = monkeypatch, prepared, storage
        self.run_ids: list[str] = []

    def __call__(self, data: str, output: str, storage_options: dict, reclaim_after: float = 30.0) -> str:
        snapshot = getattr(self.prepared, data)

        def execute(plan, run):
            snapshot.install(run.output, run.run_id, storage_options, state=None)
            self.run_ids.append(run.run_id)
            self.storage.armed = True

        plan = plan_for(self.prepared.plans[data], output, storage_options, reclaim_after)
        self.monkeypatch.setattr(audit, "plan", lambda argv: plan)
        self.monkeypatch.setattr(phases, "execute", execute)
        try:
            audit.run([])
        finally:
            self.storage.armed = False
        return self.run_ids[-1]


def fault_trial(run: AuditRun, prepared: Prepared, output: str, options: dict, k: int, after: bool) -> bool:
    """P published, R about to publish with storage call k failing; the invariant, then a later
    run that reclaims everything else. Returns whether R published but audit.run failed."""
    storage, P = run.storage, publication.new_run_id()
    prepared.P.install(output, P, options, state="published")
    storage.reset(fail_at=k, after=after)
    try:
        R, failed = run("R", output, options), None
    except InjectedFault as e:
        R, failed = run.run_ids[-1], e
    winner = check(output, {P: prepared.P, R: prepared.R}, options)
    assert failed or winner == R, "the run reported success but is not the result"
    if winner == P:
        marker = publication.list_markers(output, options).get(R, {})
        if marker.get("pointer_attempted"):
            # it failed while putting its pointer, which may still land: its files stay until
            # LATE_PUT_GRACE_S has passed, and nothing else is left
            assert marker["state"] == "failed"
            assert leftovers(output, {P, R}, options) == [], (failed, storage.log)
        else:  # the failed run removed its files
            assert leftovers(output, {P}, options) == [], (failed, storage.log)
    faults = storage.faults
    storage.reset()
    later = run("P", output, options, reclaim_after=0)
    check(output, {later: prepared.P}, options)
    assert leftovers(output, {later}, options) == [], (failed, storage.log)
    storage.faults = faults
    return bool(failed and winner == R)


def sweep(run: AuditRun, prepared: Prepared, new_output, options: dict,
          modes=((False, 1), (True, 1))) -> tuple[int, int, int]:
    """Fault trials for k = 0, stride, 2 stride, ... until one runs without a fault, for each
    (after, stride) of ``modes``: the call fails before its effect, or after it (a lost
    response). Returns trials, faults, and trials where the run published but reported a failure."""
    trials, faults, published_but_failed = 0, 0, 0
    for after, stride in modes:
        for k in itertools.count(0, stride):
            published_but_failed += fault_trial(run, prepared, new_output(), options, k, after)
            trials, faults = trials + 1, faults + run.storage.faults
            if not run.storage.faults:
                break
    return trials, faults, published_but_failed


@pytest.mark.slow
def test_a_fault_at_any_storage_call_of_the_publish_step_never_loses_or_mixes_results(prepared, place, monkeypatch):
    new_output, options = place
    storage = Storage().install(monkeypatch.setattr)
    run = AuditRun(monkeypatch, prepared, storage)
    # a sample of the calls here, every call in benchmarks/publish_trials.py (S3 trials take seconds)
    modes = ((False, 1), (True, 4)) if not options else ((False, 10),)
    trials, faults, published_but_failed = sweep(run, prepared, new_output, options, modes)
    print(f"\n{trials} trials, {faults} faults injected; published but reported failed: {published_but_failed}")
    assert faults >= 3


def start_publisher(prepared_snapshot: Snapshot, output: str, run_id: str, options: dict, folder: Path,
                    *extra: str) -> subprocess.Popen:
    """The run, installed complete (marker running), published by tests/publish_harness.py in a
    subprocess; it creates ``folder/<run_id>.ready`` just before publishing."""
    manifest = folder / f"{run_id}.json"
    manifest.write_text(json.dumps(prepared_snapshot.install(output, run_id, options)))
    return subprocess.Popen([sys.executable, str(HARNESS), "--output", output, "--run-id", run_id,
                             "--manifest", str(manifest), "--storage-options", json.dumps(options),
                             "--ready", str(folder / f"{run_id}.ready"), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.002)


def kill_trial(prepared: Prepared, output: str, options: dict, folder: Path, delay: float,
               moment: float | None) -> float | None:
    """P published, R publishing with a slow storage, SIGKILLed ``moment`` seconds in (None: not
    killed); the invariant; then a later run publishes and reclaims R. Returns the seconds the
    publish step took, or None if the kill landed before it finished."""
    P, R = publication.new_run_id(), publication.new_run_id()
    prepared.P.install(output, P, options, state="published")
    process = start_publisher(prepared.R, output, R, options, folder, "--delay", str(delay))
    wait_for(folder / f"{R}.ready", process)
    landed = False
    if moment is not None:
        time.sleep(moment)
        landed = process.poll() is None
        process.send_signal(signal.SIGKILL)
    outcome = process.communicate(timeout=120)
    assert landed or process.returncode == 0, outcome
    seconds = None if landed else float(outcome[0].split()[-2])
    check(output, {P: prepared.P, R: prepared.R}, options)
    later = publication.new_run_id()
    publish(output, later, prepared.P.install(output, later, options), options, stale_after_s=0)
    check(output, {later: prepared.P}, options)
    assert leftovers(output, {later}, options) == []
    return seconds


@pytest.mark.slow
@pytest.mark.parametrize("kills", [8])
def test_a_run_killed_at_a_random_moment_of_publishing_never_loses_or_mixes_results(prepared, place, tmp_path,
                                                                                    kills):
    new_output, options = place
    delay = 0.02 if not options else 0.01
    rng = random.Random(11)
    # how long the publish step takes, unkilled: the window the kills are spread over
    window = kill_trial(prepared, new_output(), options, tmp_path, delay, None)
    landed = sum(kill_trial(prepared, new_output(), options, tmp_path, delay, rng.uniform(0, window)) is None
                 for _ in range(kills if not options else 2))
    print(f"\n{landed} kills landed in a {window:.2f} s publish step")
    assert landed >= 1


def race_trial(prepared: Prepared, output: str, options: dict, folder: Path, seed: int) -> tuple[str, list, list]:
    """P published; A (R's data) and B (P's data) publish at the same instant. Returns the
    winner and the exit codes."""
    P, A, B = (publication.new_run_id() for _ in range(3))
    prepared.P.install(output, P, options, state="published")
    go = folder / f"go-{seed}"
    processes = [start_publisher(snapshot, output, run_id, options, folder, "--go", str(go), "--jitter", "0.003",
                                 "--seed", str(seed * 2 + i))
                 for i, (snapshot, run_id) in enumerate(((prepared.R, A), (prepared.P, B)))]
    for run_id, process in zip((A, B), processes):
        wait_for(folder / f"{run_id}.ready", process)
    go.touch()
    outcomes = [p.communicate(timeout=120) for p in processes]
    codes = [p.returncode for p in processes]
    winner = check(output, {A: prepared.R, B: prepared.P}, options)
    assert leftovers(output, {winner}, options) == [], outcomes
    return winner, codes, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("tries", [8])
def test_two_runs_publishing_at_once_leave_one_complete_result(prepared, place, tmp_path, tries):
    new_output, options = place
    results = [race_trial(prepared, new_output(), options, tmp_path, seed)
               for seed in range(tries if not options else 3)]
    print(f"\n{len(results)} races, exit codes {[codes for _, codes, _ in results]}")
    for winner, codes, outcomes in results:
        assert codes == [0, 0], outcomes


@pytest.mark.slow
def test_a_run_whose_counts_do_not_reconcile_is_never_published(prepared, place, monkeypatch):
    new_output, options = place
    output, P = new_output(), publication.new_run_id()
    prepared.P.install(output, P, options, state="published")
    real = phases.count_outcomes
    monkeypatch.setattr(phases, "count_outcomes", lambda *a: {m: {**c, "read": c["read"] + 1}
                                                            for m, c in real(*a).items()})
    run = AuditRun(monkeypatch, prepared, Storage())
    with pytest.raises(RuntimeError, match="counts do not reconcile"):
        run("R", output, options)
    assert check(output, {P: prepared.P}, options) == P
    assert leftovers(output, {P}, options) == []


@pytest.mark.slow
def test_two_reclaims_removing_the_same_run_at_once_both_succeed(prepared, place, monkeypatch):
    """Two runs that publish at once both reclaim the run they superseded; the one that finds
    a folder already gone (removed by the other between its check and its delete) must go on,
    not give up the whole reclaim and leave the run's marker and other folders behind. (Seen in
    the races above as 'publish failed: FileNotFoundError', and as leftovers since reclaim
    became best effort.)"""
    new_output, options = place
    output, P, X = new_output(), publication.new_run_id(), publication.new_run_id()
    prepared.P.install(output, X, options, state="published")
    prepared.P.install(output, P, options, state="published")  # supersedes X
    real_filesystem = publication.storage.filesystem

    class RemovedMeanwhile:  # the other reclaim removes the folder between exists and rm
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def exists(self, path):
            found = self.fs.exists(path)
            if found and f"{X}" in path:
                self.fs.rm(path, recursive=True)
            return found

    monkeypatch.setattr(publication.storage, "filesystem",
                        lambda url, so=None: (lambda fs, path: (RemovedMeanwhile(fs), path))(*real_filesystem(url, so)))
    assert publication.reclaim(output, options) == [X]
    monkeypatch.undo()
    assert check(output, {P: prepared.P}, options) == P
    assert leftovers(output, {P}, options) == []


@pytest.mark.slow
def test_reclaim_removes_the_temporary_pointer_of_a_writer_killed_before_its_rename(prepared, tmp_path):
    """On local disks the pointer is written to manifest.json.tmp-<random> and renamed; a run
    killed in between leaves that file for good (seen in the kill trials above)."""
    output, P = str(tmp_path / "out"), publication.new_run_id()
    prepared.P.install(output, P, {}, state="published")
    left = tmp_path / "out" / "manifest.json.tmp-0123456789abcdef"
    left.write_bytes(b'{"run_id": "a killed run')
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    publication.reclaim(output, stale_after_s=60)
    assert leftovers(output, {P}, {}) == []


def test_reclaim_after_shorter_than_the_heartbeat_interval_is_refused(demo_model_args):
    """A live run beats every HEARTBEAT_S; with --reclaim-after below that, another run's reclaim
    takes it for killed and removes its folders, and its later commit publishes a pointer to
    files that are gone: a lost result."""
    from saliency_audit.pipelines.config.options import UsageError, parse_run_args
    base = ["--input", "x.tar", *demo_model_args, "--output", "out"]
    for minutes in ("0.5", "-1"):
        with pytest.raises(UsageError, match="reclaim-after"):
            parse_run_args([*base, "--reclaim-after", minutes])
    assert parse_run_args([*base, "--reclaim-after", "5"])[0].reclaim_after == 5
