"""An audit history: the table of the runs an incremental audit is made of (``--incremental``).

Layout under the history's root (the runs' ``--output``)::

    history/<slot>.parquet                    one row per schedule slot: the run that holds it
    saliency/model=<sha256>/run=<id>/...      each recorded run's outputs, partitioned by model
    summary/ errors/ sanity/ findings/        the same partitions
    manifest.json                             the pointer: the newest published run (as for any audit)

``pyarrow.dataset.dataset(ROOT + "/history")`` reads the history as one table. A row is written
in one put, so a rerun of the same slot replaces the slot's row whole (its earlier run's folders
are then reclaimed): the history never holds a slot twice. A row is written after the run's
pointer and before its marker says published (saliency_audit.transforms.io.publication), so a run the history
names is never reclaimed and a recorded run's files are complete and verified.

Rows come from the history's own storage, which other runs write; a file that does not read as a
row, names another slot than its file name, or points outside the root is left out with a
warning: its images are then explained again, never wrongly skipped. A file that does not parse
at all (truncated, corrupt), or whose row ``read`` leaves out for any other reason (a malformed
run id or model...), may be the record of any run: while one is there, reclaim removes no run of
the history.
"""
from __future__ import annotations

import functools
import logging
import operator
import re
import urllib.parse
from typing import Any, Iterable, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from saliency_audit.transforms.io import storage

log = logging.getLogger("saliency_audit")

FOLDER = "history"
SLOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}")  # dates and timestamps; no '/', no leading '.' or '_'
RUN_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
MODEL = re.compile(r"[0-9a-f]{64}")

METHOD = pa.struct([
    pa.field("method", pa.string()),
    pa.field("fingerprint", pa.string()),  # sha256 of what makes its maps: options, seed, preprocessing, metrics
    pa.field("read", pa.int64()),
    pa.field("explained", pa.int64()),
    pa.field("errors", pa.int64()),
    pa.field("skipped", pa.int64()),  # already in the history: not explained again
    pa.field("error_rate", pa.float64()),  # errors / (explained + errors)
    pa.field("accuracy", pa.float64()),  # predicted == label among its labelled rows
    pa.field("deletion_auc", pa.float64()),  # means over the run's maps
    pa.field("deletion_auc_random", pa.float64()),
    pa.field("insertion_auc", pa.float64()),
    pa.field("deletion_vs_random", pa.float64()),
    pa.field("constant_share", pa.float64()),
    pa.field("sanity_rank_correlation", pa.float64()),
    pa.field("findings_top", pa.float64()),
])
SHARD = pa.struct([
    pa.field("url", pa.string()),
    pa.field("fingerprint", pa.string()),  # size and etag / checksum / mtime, as the storage lists it
    pa.field("limit", pa.int64()),  # --limit-per-shard it was read with (null: whole)
    pa.field("methods", pa.list_(pa.string())),  # the methods every record of it is done with
    # The recorded runs whose maps some of its ids were skipped for: the claim holds while they all do.
    pa.field("relies_on", pa.list_(pa.string())),
])
SCHEMA = pa.schema([
    pa.field("slot", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("model", pa.string()),  # sha256 of the model (saliency_audit.transforms.model.load.model_identity)
    pa.field("started", pa.string()),
    pa.field("finished", pa.string()),
    pa.field("input", pa.string()),
    pa.field("shards", pa.int64()),  # matched by --input
    pa.field("shards_read", pa.int64()),
    pa.field("shards_skipped", pa.int64()),  # every method already explained them: not read
    pa.field("read", pa.int64()),  # records read
    pa.field("labelled", pa.int64()),
    pa.field("accuracy", pa.float64()),
    pa.field("verdict", pa.string()),  # pass | fail | null (no gates)
    pa.field("gates_failed", pa.list_(pa.string())),
    pa.field("findings_flagged", pa.int64()),
    pa.field("methods", pa.list_(METHOD)),
    pa.field("shard_list", pa.list_(SHARD)),
    pa.field("targets", pa.string()),  # the run's --target, normalised (null: a release before several targets)
    pa.field("files", pa.list_(pa.string())),  # the run's saliency files, relative to the root
    pa.field("manifest", pa.string()),  # the run's manifest, relative to the root
])


def check_slot(text: str) -> str:
    """A schedule slot's name, or ValueError saying what one may look like."""
    if not isinstance(text, str) or not SLOT.fullmatch(text):
        raise ValueError(f"slot {str(text)[:40]!r}: 1-100 characters of letters, digits and . _ : + -, "
                         f"starting with a letter or digit (e.g. 2026-11-30 or 2026-11-30T06:00:00+00:00)")
    return text


def row_url(root: str, slot: str) -> str:
    return storage.join(root, FOLDER, urllib.parse.quote(check_slot(slot), safe="") + ".parquet")


def record(root: str, row: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    """Write the slot's row in one put (replacing the slot's earlier row); returns its URL."""
    table = pa.Table.from_pylist([row], schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    url = row_url(root, row["slot"])
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes(), storage_options)
    return url


def _valid(row: dict[str, Any], slot: str) -> str | None:
    """Why a row cannot be trusted as a record of its slot, or None. Its files must lie in its
    own run's folder: a row claiming another run's maps would mix two runs' rows."""
    if row.get("slot") != slot:
        return f"it names slot {str(row.get('slot'))[:40]!r}"
    if not RUN_ID.fullmatch(str(row.get("run_id"))) or not MODEL.fullmatch(str(row.get("model"))):
        return "its run id or model is malformed"
    folder = f"saliency/model={row['model']}/run={row['run_id']}/"
    if not all(isinstance(f, str) and f.startswith(folder) and "/" not in f[len(folder):]
               and f[len(folder):] not in ("", ".", "..") for f in row.get("files") or []):
        return "it names saliency files outside its run's folder"
    if row.get("manifest") != f"_runs/{row['run_id']}/manifest.json":
        return "it names a manifest outside its run's folder"
    return None


def _missing_files(fs, base: str, row: dict[str, Any]) -> int:
    """How many of the row's saliency files are not on the storage (one listing per row)."""
    if not row["files"]:
        return 0
    folder = f"{base}/{row['files'][0].rsplit('/', 1)[0]}"
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        present = set()
    return sum(f.rsplit("/", 1)[-1] not in present for f in row["files"])


class UnreadableFile(Exception):
    """A history file whose bytes do not parse as Parquet (truncated, corrupt, not Parquet)."""


# Why an unparsable file holds reclaim back (saliency_audit.transforms.io.publication.reclaim): it may name any run.
HOLDS_RECLAIM = "reclaim removes no run of the history until it is repaired or removed"


def _parse(data: bytes) -> pa.Table:
    """A history file's table from its bytes (read first, so that a storage error stays an OSError
    and a parse error, whatever pyarrow raises, is an UnreadableFile)."""
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for bad bytes
        raise UnreadableFile(f"{type(e).__name__}: {' '.join(str(e).split())[:120]}") from None


def read(root: str, storage_options: dict[str, Any] | None = None,
         left_out: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The recorded runs, one per slot, sorted by slot; rows that cannot be trusted are left out
    with a warning, and so are rows whose saliency files are gone (their shards are read again)
    and rows naming a run an earlier slot names. ``left_out``, if given, receives file name ->
    why it was left out instead of the log (the ``history`` command and the report show it)."""
    fs, path = storage.filesystem(storage.join(root, FOLDER), storage_options)
    fs.invalidate_cache()
    base = storage.filesystem(root, storage_options)[1].rstrip("/")
    try:
        files = sorted(storage.glob_in(fs, path, "*.parquet"))
    except FileNotFoundError:
        return []

    def leave_out(name: str, why: str) -> None:
        if left_out is None:
            log.warning("history %s: left out %s: %s; its images will be explained again", root, name, why)
        else:
            left_out[name] = why

    named: list[tuple[str, dict[str, Any]]] = []  # (file name, row)
    for file in files:
        name = file.rsplit("/", 1)[-1]
        slot = urllib.parse.unquote(name[:-len(".parquet")])
        try:
            check_slot(slot)
        except ValueError:
            leave_out(name, "not a slot's file name")
            continue
        try:
            found = _conform(_parse(fs.cat_file(file))).to_pylist()
            problem = None if len(found) == 1 else f"it holds {len(found)} rows"
            problem = problem or _valid(found[0], slot)
            missing = 0 if problem else _missing_files(fs, base, found[0])
            problem = problem or (f"{missing} of its saliency files are missing" if missing else None)
        except FileNotFoundError:
            continue  # replaced or removed since the listing
        except UnreadableFile as e:
            problem = f"unreadable ({e}): {HOLDS_RECLAIM}"
        except OSError:
            problem = "the storage failed to read it"
        except Exception as e:  # noqa: BLE001 - any unreadable file costs its row, never the run
            problem = f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        if problem:
            leave_out(name, problem)
            continue
        named.append((name, found[0]))
    rows, seen = [], set()
    for name, r in sorted(named, key=lambda item: item[1]["slot"]):
        if r["run_id"] in seen:  # a run fills one slot; a copied file would count its maps twice
            leave_out(name, f"run {r['run_id']} already fills an earlier slot")
            continue
        rows.append(r)
        seen.add(r["run_id"])
    return rows


def _conform(table: pa.Table) -> pa.Table:
    """The table in SCHEMA: columns it lacks (a row of another release) read as null; the checks
    of ``_valid`` then refuse a row without the ones that matter."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


class Recorded(NamedTuple):
    runs: set[str]  # every run id a file of the history names
    unreadable: list[str]  # files that do not parse, or whose row read() leaves out: they may name any run


def recorded_runs(root: str, storage_options: dict[str, Any] | None = None) -> Recorded:
    """Every run id any file of the history names, however strict ``read`` is with the file
    (publication.reclaim keeps their folders: a row of another release, or one whose files are
    partly gone, must not cost what is left), and the files that do not parse or whose row ``read``
    leaves out for any reason (a malformed run id or model, another slot's name, files outside its
    run...): those may be the record of any run, so reclaim keeps every run of the history while one
    is there. A storage error raises, so that reclaim removes nothing."""
    fs, path = storage.filesystem(storage.join(root, FOLDER), storage_options)
    fs.invalidate_cache()
    try:
        files = storage.glob_in(fs, path, "*.parquet")
    except FileNotFoundError:
        return Recorded(set(), [])
    found, unreadable = set(), []
    for file in sorted(files):
        name = file.rsplit("/", 1)[-1]
        try:
            table = _parse(fs.cat_file(file))
        except FileNotFoundError:
            continue
        except UnreadableFile as e:
            log.warning("history %s: %s is unreadable (%s): %s", root, name, e, HOLDS_RECLAIM)
            unreadable.append(name)
            continue
        if "run_id" in table.column_names:
            found |= {str(v) for v in table.column("run_id").to_pylist() if RUN_ID.fullmatch(str(v))}
    # read() is the judge of which rows count: any file it leaves out holds reclaim (a row it does
    # not trust may be the only record of a run whose id it does not spell right)
    left_out: dict[str, str] = {}
    read(root, storage_options, left_out)
    for name, why in sorted(left_out.items()):
        if name not in unreadable:
            log.warning("history %s: %s is left out (%s): %s", root, name, why, HOLDS_RECLAIM)
            unreadable.append(name)
    return Recorded(found, sorted(unreadable))


def saliency_dataset(root: str, storage_options: dict[str, Any] | None = None,
                     rows: Iterable[dict[str, Any]] | None = None, *, superseded: bool = False):
    """The recorded runs' maps as one ``pyarrow.dataset`` (columns ``model`` and ``run`` from the
    folders' names; the runs' schemas unified, so a column one run lacks reads as null): the
    current answer, where maps of one image with one method, target class, model and method
    fingerprint come from the newest run that made them (a later run explained the image again because its
    content changed, or two runs overlapped). ``superseded=True``: every recorded map."""
    import pyarrow.dataset as ds
    rows = read(root, storage_options) if rows is None else list(rows)
    fs, base = storage.filesystem(root, storage_options)
    paths = [f"{base}/{relative}" for r in rows for relative in r["files"]]
    if not paths:
        return ds.dataset(pa.table({}))
    schemas = []
    for p in paths:
        with fs.open(p, "rb") as f:
            schemas.append(pq.read_schema(f))
    partitioning = ds.partitioning(pa.schema([("model", pa.string()), ("run", pa.string())]), flavor="hive")
    dataset = ds.dataset(paths, schema=pa.unify_schemas(schemas + [partitioning.schema]), format="parquet",
                         filesystem=fs, partitioning=partitioning, partition_base_dir=f"{base}/saliency")
    replaced = None if superseded else _replaced(fs, base, rows)
    return dataset if replaced is None else dataset.filter(~replaced)


def _replaced(fs, base: str, rows: list[dict[str, Any]]):
    """A filter expression for the maps a newer run superseded (same model, method fingerprint,
    image and method; run ids sort by start time), or None when there are none: a map of another
    record than the newest run's map of the image (the image or its label changed since), and of the
    newest record's maps per target class, all but the newest run's. Reads the image_id, method,
    target and record_sha256 columns of every recorded file."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    pairs, methods = [], []
    for r in rows:
        for m in r["methods"] or []:
            methods.append({"run": r["run_id"], "method": m["method"], "model": r["model"],
                            "fingerprint": m["fingerprint"] or ""})
        for relative in r["files"]:
            with fs.open(f"{base}/{relative}", "rb") as f:
                parquet = pq.ParquetFile(f)
                table = parquet.read(columns=[c for c in ("image_id", "method", "target", "record_sha256")
                                              if c in parquet.schema_arrow.names])
            record = table.column("record_sha256") if "record_sha256" in table.column_names else pa.nulls(
                table.num_rows, pa.string())
            pairs.append(pa.table({"image_id": table.column("image_id"), "method": table.column("method"),
                                   "target": pc.cast(table.column("target"), pa.int64()),
                                   "record": pc.fill_null(record, ""),  # an older release's: no hash
                                   "run": pa.array([r["run_id"]] * table.num_rows, pa.string())}))
    if not pairs or not methods:
        return None
    image = ["model", "fingerprint", "method", "image_id"]
    maps = pa.concat_tables(pairs).join(pa.Table.from_pylist(methods), keys=["run", "method"], join_type="inner")
    newest = maps.join(maps.group_by(image).aggregate([("run", "max")]), keys=image)
    current = newest.filter(pc.field("run") == pc.field("run_max")).select([*image, "record"]).rename_columns(
        [*image, "current"]).group_by([*image, "current"]).aggregate([])
    maps = maps.join(current, keys=image).join(maps.group_by([*image, "target"]).aggregate([("run", "max")]),
                                               keys=[*image, "target"])
    older = maps.filter((pc.field("record") != pc.field("current")) | (pc.field("run") != pc.field("run_max")))
    groups = older.group_by(["run", "method", "target"]).aggregate([("image_id", "list")]).to_pylist()
    terms = [(ds.field("run") == g["run"]) & (ds.field("method") == g["method"]) & (ds.field("target") == g["target"])
             & ds.field("image_id").isin(g["image_id_list"]) for g in groups]
    return functools.reduce(operator.or_, terms) if terms else None
