"""The audit history (saliency_audit.transforms.io.history) under faults: hostile rows, a failed record or job,
concurrent runs, reclaim, object storage and a killed writer's temporary file. Whatever happens,
no recorded result is lost, no run's rows are mixed into another's, and no image is skipped on
the word of a row that cannot be trusted."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_DATA, REPO, add_member, moto_s3

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.job import phases
from saliency_audit.transforms.io import history, publication, storage
from saliency_audit.transforms.io.publication import RUNS
from saliency_audit.transforms.skip_explained import SkipExplained

MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
PER_SHARD = 4  # digits per shard: each run costs ~3 s, almost all of it fixed


def audit_args(output, pattern, slot: str, storage_options: str | None = None) -> list[str]:
    return ["--input", str(pattern), *MODEL, "--methods", "sal", "--channels", "1", "--torch-threads", "1",
            "--output", str(output), "--incremental", "--slot", slot,
            *(["--storage-options", storage_options] if storage_options else [])]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """x.tar and y.tar: two shards of PER_SHARD distinct demo digits each."""
    folder = tmp_path_factory.mktemp("shards")
    with tarfile.open(DEMO_DATA / "mnist-test-sample.tar") as src:
        members = src.getmembers()  # KEY.png, KEY.cls, ...
        for k, name in enumerate("xy"):
            with tarfile.open(folder / f"{name}.tar", "w") as dst:
                for member in members[2 * PER_SHARD * k:2 * PER_SHARD * (k + 1)]:
                    add_member(dst, member.name, src.extractfile(member).read())
    return folder


@pytest.fixture(scope="module")
def seeded(shards, tmp_path_factory) -> tuple[Path, dict]:
    """A history holding one run: slot 'a', which explained x.tar. Tests work on copies."""
    root = tmp_path_factory.mktemp("seeded") / "out"
    audit.run(audit_args(root, shards / "x.tar", "a"))
    [row] = history.read(str(root))
    return root, row


@pytest.fixture
def root(seeded, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(seeded[0], out)
    return out


def run_folders(root: Path) -> set[str]:
    """Run ids that have a folder under any output."""
    return {p.name[len("run="):] for name in publication.OUTPUTS for p in (root / name).glob("model=*/run=*")}


def assert_recorded_runs_complete(root: Path) -> list[dict]:
    """Every row's saliency files and manifest exist, and lie in that row's own run folder."""
    rows = history.read(str(root))
    for r in rows:
        assert r["files"], r["slot"]
        for relative in r["files"]:
            assert relative.startswith(f"saliency/model={r['model']}/run={r['run_id']}/")
            assert (root / relative).is_file(), relative
        assert (root / r["manifest"]).is_file()
    return rows


def write_row(root: Path, name: str, rows: list[dict] | pa.Table) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=history.SCHEMA)
    pq.write_table(table, root / "history" / f"{name}.parquet")


def warned(caplog, name: str) -> bool:
    return any(name in m and "explained again" in m for m in caplog.messages)


# --- 1. hostile rows ------------------------------------------------------------------------

def hostile_rows(row: dict) -> dict[str, list[dict] | pa.Table | bytes]:
    """File name -> content; every row claims the seeded run's images (x.tar)."""
    other = {**row, "run_id": "20200101T000000-0badc0de"}
    return {
        "garbage": b"PAR1 this is not a parquet file",
        "renamed": [{**row, "slot": "someone-else"}],
        "dotdot": [{**row, "slot": "dotdot", "files": ["../x.parquet"]}],
        "absolute": [{**row, "slot": "absolute", "files": ["/etc/passwd"]}],
        "foreign": [{**row, "slot": "foreign", "files": ["s3://other/saliency/x.parquet"]}],
        "manifest": [{**row, "slot": "manifest", "manifest": "../../etc/passwd"}],
        "two": [{**row, "slot": "two"}, {**row, "slot": "two"}],
        # a row of another run claiming the seeded run's files: the rows would mix
        "borrowed": [{**other, "slot": "borrowed"}],
        "schema": pa.table({"slot": ["schema"], "run_id": [row["run_id"]], "files": [row["files"]]}),
    }


@pytest.mark.slow
def test_hostile_rows_are_left_out_and_their_images_explained_again(root, seeded, shards, caplog):
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    row = seeded[1]
    (root / "history" / "a.parquet").unlink()  # only hostile rows claim x.tar now
    for name, content in hostile_rows(row).items():
        if isinstance(content, bytes):
            (root / "history" / f"{name}.parquet").write_bytes(content)
        else:
            write_row(root, name, content)
    assert history.read(str(root)) == []

    manifest = audit.run(audit_args(root, shards / "*.tar", "b"))
    assert manifest["counts"]["sal"] == {"read": 2 * PER_SHARD, "explained": 2 * PER_SHARD, "errors": 0, "skipped": 0}
    assert manifest["incremental"]["history_runs"] == [] and manifest["incremental"]["shards_skipped"] == 0
    for name in hostile_rows(row):
        assert warned(caplog, f"{name}.parquet"), name
    assert [r["slot"] for r in assert_recorded_runs_complete(root)] == ["b"]
    # reclaim errs on the side of keeping: run a, which files of the history still name (however
    # untrusted for skipping), keeps its folders; b is whole
    assert run_folders(root) == {manifest["run_id"], row["run_id"]}


@pytest.mark.slow
def test_a_recorded_run_whose_maps_are_gone_is_explained_again(root, seeded, shards, caplog):
    """The row is well formed, but its saliency files were deleted: the run must neither skip
    its shard nor fail; the images are explained again."""
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    for relative in seeded[1]["files"]:
        (root / relative).unlink()
    manifest = audit.run(audit_args(root, shards / "x.tar", "b"))
    assert manifest["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert any("missing" in m and "a.parquet" in m for m in caplog.messages)
    # the history still names run a, so reclaim keeps what is left of it
    assert seeded[1]["run_id"] in run_folders(root)
    recorded = history.recorded_runs(str(root)).runs
    assert recorded == {r["run_id"] for r in history.read(str(root))} | {seeded[1]["run_id"]}


@pytest.mark.slow
def test_missing_history_file_costs_its_ids_not_the_run(root, seeded, shards, tmp_path, monkeypatch, caplog):
    """The same digits in a shard the history has not seen (so they are looked up by id), while
    the recorded maps are gone: explained_ids warns and the digits are explained again."""
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(shards / "x.tar", moved / "x.tar")
    execute = phases.execute

    def execute_after_removal(plan, run):  # the maps vanish between the plan and the job
        assert plan.work.history_files
        for relative in seeded[1]["files"]:
            (root / relative).unlink()
        return execute(plan, run)

    monkeypatch.setattr(phases, "execute", execute_after_removal)
    manifest = audit.run(audit_args(root, moved / "x.tar", "b"))
    assert manifest["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert any("unreadable" in m and "explained again" in m for m in caplog.messages)


# --- 2. faults while recording and while running ---------------------------------------------

@pytest.mark.slow
def test_a_failed_record_loses_nothing(root, seeded, shards, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("storage went away while recording")

    monkeypatch.setattr(history, "record", broken)
    assert audit.main(audit_args(root, shards / "*.tar", "b")) == audit.FAILED  # published, not recorded: told
    monkeypatch.undo()
    lost = json.loads((root / "manifest.json").read_text())
    assert lost["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert lost["incremental"]["shards_skipped"] == 1  # x.tar: run a explained it
    assert json.loads((root / "manifest.json").read_text())["run_id"] == lost["run_id"]  # published
    assert [r["slot"] for r in history.read(str(root))] == ["a"]  # not recorded
    assert publication.list_markers(str(root))[lost["run_id"]]["state"] == "published"

    # the next run of another slot does not count the unrecorded run: y.tar is explained again
    later = audit.run(audit_args(root, shards / "*.tar", "c"))
    assert later["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert later["incremental"]["history_runs"] == [seeded[1]["run_id"]]
    # superseded and unrecorded: reclaimed; the recorded run a is kept though the pointer moved on
    assert run_folders(root) == {seeded[1]["run_id"], later["run_id"]}
    assert lost["run_id"] not in publication.list_markers(str(root))
    assert [r["slot"] for r in assert_recorded_runs_complete(root)] == ["a", "c"]


@pytest.mark.slow
def test_a_job_that_fails_leaves_the_history_as_it_was(root, shards, monkeypatch):
    before = {p.name: p.read_bytes() for p in (root / "history").iterdir()}
    folders, pointer = run_folders(root), (root / "manifest.json").read_bytes()

    def broken(self, batch, done):
        raise RuntimeError("the explain step's input broke")

    monkeypatch.setattr(SkipExplained, "process", broken)
    with pytest.raises(Exception, match="the explain step's input broke"):
        audit.run(audit_args(root, shards / "*.tar", "b"))
    assert {p.name: p.read_bytes() for p in (root / "history").iterdir()} == before
    assert run_folders(root) == folders and (root / "manifest.json").read_bytes() == pointer
    assert all(m["state"] == "published" for m in publication.list_markers(str(root)).values())


# --- 3. concurrent runs ----------------------------------------------------------------------

def start(root: Path, pattern: Path, slot: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saliency_audit.pipelines.audit", *audit_args(root, pattern, slot)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_concurrent_runs_of_two_slots_and_of_one_slot(root, seeded, shards):
    """Three runs at once over the same history: slots b, c and c again. A run does not see the
    rows of runs that record after it plans, so when they overlap (as they usually do) each
    explains y.tar: duplicated work, identical maps in separate run folders, nothing lost."""
    procs = [start(root, shards / "*.tar", slot) for slot in ("b", "c", "c")]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    ids = [re.search(r"^run (\S+): ", text, re.M).group(1) for text in logs]
    rows = {r["slot"]: r for r in assert_recorded_runs_complete(root)}
    assert sorted(rows) == ["a", "b", "c"]  # exactly one row for slot c
    assert rows["b"]["run_id"] == ids[0] and rows["c"]["run_id"] in ids[1:]
    loser = next(i for i in ids[1:] if i != rows["c"]["run_id"])
    assert json.loads((root / "manifest.json").read_text())["run_id"] in ids
    assert {seeded[1]["run_id"], ids[0], rows["c"]["run_id"]} <= run_folders(root)  # none removed

    maps = history.saliency_dataset(str(root), superseded=True).to_table(
        columns=["image_id", "saliency", "run"]).to_pylist()
    by_image: dict[str, list[dict]] = {}
    for m in maps:
        by_image.setdefault(m["image_id"], []).append(m)
    assert len(by_image) == 2 * PER_SHARD  # every digit of x and y has its maps in the history
    for copies in by_image.values():  # a duplicate is a whole map of another slot's run, never a mix
        assert len({m["run"] for m in copies}) == len(copies)
        assert all(m["saliency"] == copies[0]["saliency"] for m in copies)

    later = audit.run(audit_args(root, shards / "*.tar", "d"))  # its reclaim takes the loser
    assert later["counts"]["sal"]["explained"] == 0
    assert loser not in run_folders(root) and loser not in publication.list_markers(str(root))
    assert sorted(r["slot"] for r in assert_recorded_runs_complete(root)) == ["a", "b", "c", "d"]


# --- 4. reclaim and the history ----------------------------------------------------------------

def test_reclaim_keeps_a_recorded_run_after_the_pointer_moved_on(root, seeded):
    run_id = seeded[1]["run_id"]
    pointer = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**pointer, "run_id": "20990101T000000-00000000"}))
    assert publication.list_markers(str(root))[run_id]["state"] == "published"
    assert publication.reclaim(str(root), stale_after_s=0) == []
    assert run_id in run_folders(root) and assert_recorded_runs_complete(root)
    (root / "history" / "a.parquet").unlink()  # the history no longer names it: now it goes
    assert publication.reclaim(str(root), stale_after_s=0) == [run_id]
    assert run_folders(root) == set()


def test_reclaim_removes_nothing_when_the_history_cannot_be_read(root, seeded, monkeypatch):
    """A storage error on a row must not read as "no row": the run it names would be removed."""
    (root / "manifest.json").unlink()  # the pointer names no run: only the history keeps run a
    read_table = pq.read_table

    def flaky(source, *args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(pq, "read_table", flaky)
    assert publication.reclaim(str(root), stale_after_s=0) == []
    monkeypatch.setattr(pq, "read_table", read_table)
    assert seeded[1]["run_id"] in run_folders(root) and assert_recorded_runs_complete(root)


# --- 5. object storage -----------------------------------------------------------------------

@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch, "history-bucket") as server:
        yield server


@pytest.mark.slow
def test_history_on_object_storage(s3, shards):
    fs, endpoint = s3
    for name in "xy":
        fs.put(str(shards / f"{name}.tar"), f"history-bucket/shards/{name}.tar")
    options, out = json.dumps({"endpoint_url": endpoint}), "s3://history-bucket/audit"
    first = audit.run(audit_args(out, "s3://history-bucket/shards/x.tar", "a", options))
    second = audit.run(audit_args(out, "s3://history-bucket/shards/*.tar", "b", options))
    assert second["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert second["incremental"]["shards_skipped"] == 1
    rows = history.read(out, {"endpoint_url": endpoint})
    assert [(r["slot"], r["run_id"], r["shards_skipped"]) for r in rows] == [
        ("a", first["run_id"], 0), ("b", second["run_id"], 1)]
    table = history.saliency_dataset(out, {"endpoint_url": endpoint}).to_table(columns=["image_id", "run"])
    runs = table.column("run").to_pylist()
    assert table.num_rows == len(set(table.column("image_id").to_pylist())) == 2 * PER_SHARD
    assert runs.count(first["run_id"]) == runs.count(second["run_id"]) == PER_SHARD


# --- 6. a killed writer's temporary file -------------------------------------------------------

def test_a_killed_writers_temporary_file_is_invisible(root, caplog):
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    whole = (root / "history" / "a.parquet").read_bytes()
    (root / "history" / ".a.parquet.tmp-0123456789abcdef").write_bytes(whole[:len(whole) // 2])
    (root / "history" / ".b.parquet.tmp-fedcba9876543210").write_bytes(b"")
    assert ds.dataset(str(root / "history")).to_table().column("slot").to_pylist() == ["a"]
    assert [r["slot"] for r in history.read(str(root))] == ["a"]
    assert caplog.messages == []


# --- found in review: a row of another schema, copies, rewrites that keep size and mtime ------

def test_reclaim_keeps_a_run_whose_row_has_another_releases_schema(root, seeded):
    """A row without a column this release knows (an older or newer release wrote it) is still
    a record: reclaim must not remove its run when the pointer has moved on."""
    run_id = seeded[1]["run_id"]
    (root / "manifest.json").unlink()  # the pointer names no run: only the history keeps run a
    table = pa.Table.from_pylist([seeded[1]], schema=history.SCHEMA).drop_columns(["findings_flagged", "labelled"])
    pq.write_table(table, root / "history" / "a.parquet")
    assert [r["slot"] for r in history.read(str(root))] == ["a"]  # missing columns read as null
    assert publication.reclaim(str(root), stale_after_s=0) == []
    assert run_id in run_folders(root)


def test_a_copied_row_does_not_count_its_run_twice(root, seeded, caplog):
    shutil.copy(root / "history" / "a.parquet", root / "history" / "b.parquet")
    table = pq.read_table(root / "history" / "b.parquet").to_pylist()
    write_row(root, "b", [{**table[0], "slot": "b"}])
    assert [r["slot"] for r in history.read(str(root))] == ["a"]
    assert history.saliency_dataset(str(root)).count_rows() == PER_SHARD


@pytest.mark.slow
def test_a_same_size_rewrite_that_keeps_the_mtime_is_read_again(root, shards, tmp_path):
    """x.tar replaced in place by other digits of the same size, its mtime set back (cp -p,
    rsync -t, tar -x do that): the inode change time tells, so the new digits are explained."""
    moved = tmp_path / "in"
    moved.mkdir()
    shutil.copy(shards / "x.tar", moved / "x.tar")
    first = audit.run(audit_args(root, moved / "x.tar", "b"))  # a copy: another inode, read again, ids skip
    assert first["counts"]["sal"]["skipped"] == PER_SHARD
    stat = (moved / "x.tar").stat()
    data = (shards / "y.tar").read_bytes()
    assert len(data) == stat.st_size
    with open(moved / "x.tar", "r+b") as f:  # in place: the same inode
        f.write(data)
    import os
    os.utime(moved / "x.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = audit.run(audit_args(root, moved / "x.tar", "c"))
    assert again["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}


def test_a_file_option_counts_by_its_contents(tmp_path):
    """abele's autoencoder: retrained under the same path, its maps are new; the same file under
    another path, they are not. Credentials never count."""
    from saliency_audit.pipelines.config.options import RunConfig
    from saliency_audit.pipelines.job.incremental import method_fingerprints
    args = RunConfig(input="x", model="m", output="o", channels=1)
    aae, copy = tmp_path / "aae.pt", tmp_path / "copy.pt"
    aae.write_bytes(b"weights one")
    copy.write_bytes(b"weights one")

    def fingerprint(path, **extra):
        resolved = {"methods": {"abele": {"options": {"aae": str(path), "n_samples": 100, **extra}}}}
        return method_fingerprints(args, resolved)["abele"]

    before = fingerprint(aae)
    assert fingerprint(copy) == before
    assert fingerprint(aae, storage_options={"key": "other"}) == before
    aae.write_bytes(b"weights two")
    assert fingerprint(aae) != before


def test_road_counts_in_the_fingerprint():
    """A run with --road must not skip images that a run without it explained: their ROAD columns
    would stay null (the reverse too)."""
    from saliency_audit.pipelines.config.options import RunConfig
    from saliency_audit.pipelines.job.incremental import method_fingerprints
    resolved = {"methods": {"grad": {"options": {}}}}

    def fingerprint(road):
        args = RunConfig(input="x", model="m", output="o", channels=1, road=road)
        return method_fingerprints(args, resolved)["grad"]

    assert fingerprint(True) != fingerprint(False)


def test_history_command_reports_a_storage_failure_in_one_line(monkeypatch, capsys, tmp_path):
    from saliency_audit.pipelines import cli

    class Unreachable(Exception):  # botocore's errors are not OSError
        pass

    def fail(*args, **kwargs):
        raise Unreachable("Unable to locate credentials")

    monkeypatch.setattr(history, "read", fail)
    assert cli.main(["history", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Unable to locate credentials" in err[0]


# --- trust round three: content hashes, unreadable history files -------------------------------

def under_ids_of(images: Path, ids: Path) -> bytes:
    """A tar of the digits (png and label) of ``images`` under the member names of ``ids``."""
    with tarfile.open(images) as src, tarfile.open(ids) as names:
        members = [(n.name, src.extractfile(m).read()) for n, m in zip(names.getmembers(), src.getmembers())]
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w") as dst:
        for name, data in members:
            add_member(dst, name, data)
    return sink.getvalue()


def png_hashes(tar: bytes) -> dict[str, str]:
    """image id -> sha256 of its png member."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return {m.name[:-len(".png")]: hashlib.sha256(t.extractfile(m).read()).hexdigest()
                for m in t.getmembers() if m.name.endswith(".png")}


def rewrite_in_place(path: Path, data: bytes) -> None:
    """New bytes in the same inode, its mtime set back (cp -p, rsync -t and tar -x do that)."""
    stat = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def current_maps(root: Path | str, storage_options=None, **kw) -> dict[str, tuple[str, str]]:
    """image id -> (content_sha256, run) of the maps saliency_dataset gives (one per id: sal only)."""
    rows = history.saliency_dataset(str(root), storage_options, **kw).to_table(
        columns=["image_id", "content_sha256", "run"]).to_pylist()
    found = {r["image_id"]: (r["content_sha256"], r["run"]) for r in rows}
    assert len(found) == len(rows), rows
    return found


def test_each_reader_records_the_sha256_of_the_image_bytes_it_read(shards, tmp_path):
    from saliency_audit.transforms.io.readers import read_shard
    tar = (shards / "x.tar").read_bytes()
    expected = png_hashes(tar)
    pngs = {}
    with tarfile.open(shards / "x.tar") as t:
        for m in t.getmembers():
            if m.name.endswith(".png"):
                pngs[m.name[:-4]] = t.extractfile(m).read()
    pq.write_table(pa.table({"image_id": list(pngs), "image": list(pngs.values())}), tmp_path / "x.parquet")
    first = next(iter(pngs))
    (tmp_path / f"{first}.png").write_bytes(pngs[first])
    for url, ids in [(shards / "x.tar", list(pngs)), (tmp_path / "x.parquet", list(pngs)),
                     (tmp_path / f"{first}.png", [f"{first}.png"])]:
        records = list(read_shard(str(url)))
        assert [r.image_id for r in records] == ids, url
        assert [r.content_sha256 for r in records] == [expected[i.removesuffix(".png")] for i in ids], url


@pytest.mark.slow
def test_a_shard_rewritten_in_place_with_other_images_under_the_same_ids_is_explained_again(root, seeded, shards,
                                                                                             tmp_path):
    """x.tar at a new place (read: its ids skip through run a), then rewritten in place with y's
    digits under x's ids, same size, mtime set back: the new digits are explained, and the
    history's current maps are theirs (run a's stay reachable as superseded)."""
    path = tmp_path / "in" / "x.tar"
    path.parent.mkdir()
    shutil.copy(shards / "x.tar", path)
    first = audit.run(audit_args(root, path, "b"))
    assert first["counts"]["sal"]["skipped"] == PER_SHARD
    new = under_ids_of(shards / "y.tar", shards / "x.tar")
    assert len(new) == path.stat().st_size
    rewrite_in_place(path, new)
    again = audit.run(audit_args(root, path, "c"))
    assert again["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert current_maps(root) == {i: (h, again["run_id"]) for i, h in png_hashes(new).items()}
    old = png_hashes((shards / "x.tar").read_bytes())
    every = history.saliency_dataset(str(root), superseded=True).to_table(
        columns=["image_id", "content_sha256", "run"]).to_pylist()
    assert sorted((r["image_id"], r["content_sha256"], r["run"]) for r in every) == sorted(
        [(i, h, seeded[1]["run_id"]) for i, h in old.items()] + [(i, h, again["run_id"]) for i, h in
                                                                  png_hashes(new).items()])


@pytest.mark.slow
def test_content_that_changes_back_is_explained_again_where_the_storage_tags_content_only(root, seeded, shards,
                                                                                          tmp_path, monkeypatch):
    """A storage whose listing tags a shard by its content alone (an ETag that is the MD5, as an
    HTTP server or GCS's md5Hash give): x.tar's digits are replaced by others under the same
    ids (slot b), then put back (slot c), so its tag is run a's again. The newest maps of those
    ids are slot b's, of other digits: slot c must explain x's digits again."""
    from saliency_audit.pipelines.job import incremental

    def content_tags(urls, storage_options):
        tags = {}
        for url in urls:
            fs, path = storage.filesystem(url, storage_options)
            data = fs.cat_file(path)
            tags[url] = f"{len(data)}:ETag={hashlib.md5(data).hexdigest()}"
        return tags

    monkeypatch.setattr(incremental, "shard_fingerprints", content_tags)
    path = tmp_path / "x.tar"  # the shard at another URL than the seeded run's
    original, other = (shards / "x.tar").read_bytes(), under_ids_of(shards / "y.tar", shards / "x.tar")
    path.write_bytes(original)
    seeded_here = audit.run(audit_args(root, path, "a2"))  # recorded with the content tag of x's digits
    assert seeded_here["counts"]["sal"]["skipped"] == PER_SHARD
    path.write_bytes(other)
    changed = audit.run(audit_args(root, path, "b"))
    assert changed["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    path.write_bytes(original)
    back = audit.run(audit_args(root, path, "c"))
    assert back["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert current_maps(root) == {i: (h, back["run_id"]) for i, h in png_hashes(original).items()}
    unchanged = audit.run(audit_args(root, path, "d"))  # now nothing changed: not even read
    assert unchanged["incremental"]["shards_skipped"] == 1 and unchanged["counts"]["sal"]["explained"] == 0


@pytest.mark.slow
def test_a_map_recorded_without_a_content_hash_never_skips_its_image(root, seeded, shards, tmp_path):
    """Maps of a release before content hashes: whether their images are the ones read now is
    unknown, so they are explained again (their shard, unchanged, is still not read)."""
    for relative in seeded[1]["files"]:
        table = pq.read_table(root / relative)
        pq.write_table(table.drop_columns([c for c in ("content_sha256", "record_sha256") if c in table.column_names]),
                       root / relative)
    unchanged = audit.run(audit_args(root, shards / "x.tar", "b"))
    assert unchanged["incremental"]["shards_skipped"] == 1
    moved = tmp_path / "moved" / "x.tar"
    moved.parent.mkdir()
    shutil.copy(shards / "x.tar", moved)
    manifest = audit.run(audit_args(root, moved, "c"))
    assert manifest["counts"]["sal"] == {"read": PER_SHARD, "explained": PER_SHARD, "errors": 0, "skipped": 0}
    assert set(current_maps(root).values()) == {(h, manifest["run_id"])
                                                for h in png_hashes((shards / "x.tar").read_bytes()).values()}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_a_truncated_history_file_keeps_every_run_it_may_name(root, seeded, shards, caplog):
    """a.parquet cut in half between two runs: it may name any run, so the next run's reclaim
    removes none of the history's runs (run a's maps are not lost), and says which file holds
    it back; once the file is gone, reclaim takes what no file names."""
    caplog.set_level(logging.WARNING, logger="saliency_audit")
    row = seeded[1]
    truncate(root / "history" / "a.parquet")
    manifest = audit.run(audit_args(root, shards / "x.tar", "b"))  # the pointer moves on to run b
    assert manifest["counts"]["sal"]["explained"] == PER_SHARD  # a's row is unreadable: not trusted to skip
    kept = [root / relative for relative in row["files"]]
    kept += [root / row["manifest"], root / RUNS / f"{row['run_id']}.json"]
    assert [p for p in kept if not p.exists()] == []
    assert row["run_id"] in run_folders(root)
    assert any("a.parquet" in m and "reclaim" in m for m in caplog.messages), caplog.messages
    assert publication.reclaim(str(root), stale_after_s=0) == []
    (root / "history" / "a.parquet").unlink()
    assert publication.reclaim(str(root), stale_after_s=0) == [row["run_id"]]


def test_history_command_and_report_name_an_unreadable_file(root, capsys):
    from saliency_audit.pipelines import cli
    from saliency_audit.pipelines.reporting.report import write_report
    shutil.copy(root / "history" / "a.parquet", root / "history" / "b.parquet")
    truncate(root / "history" / "b.parquet")
    capsys.readouterr()
    assert cli.main(["history", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("a  run ") and len(out.splitlines()) == 1
    assert re.search(r"b\.parquet.*unreadable.*reclaim", err), err
    write_report(str(root), str(root.parent / "report.html"))
    page = (root.parent / "report.html").read_text()
    assert re.search(r"b\.parquet[^<]*unreadable[^<]*reclaim", page)
