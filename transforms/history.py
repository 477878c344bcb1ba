"""An audit history: the table of the runs an incremental audit is made of (``--incremental``).

Layout under the history's root (the runs' ``--output``)::

    history/<slot>.parquet                    one row per schedule slot: the run that holds it
    saliency/model=<sha256>/run=<id>/...      each recorded run's outputs, partitioned by model
    summary/ errors/ sanity/ findings/        the same partitions
    manifest.json                             the pointer: the newest published run (as for any audit)

``pyarrow.dataset.dataset(ROOT + "/history")`` reads the history as one table. A row is written
in one put, so a rerun of the same slot replaces the slot's row whole (its earlier run's folders
are then reclaimed): the history never holds a slot twice. A row is written after the run's
pointer and before its marker says published (transforms.publication), so a run the history
names is never reclaimed and a recorded run's files are complete and verified.

Rows come from the history's own storage, which other runs write; a file that does not read as a
row, names another slot than its file name, or points outside the root is left out with a
warning: its images are then explained again, never wrongly skipped.
"""
from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from transforms import storage

log = logging.getLogger("saliency_audit")

FOLDER = "history"
SLOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}")  # dates and timestamps; no '/', no leading '.' or '_'
RUN_ID = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")
MODEL = re.compile(r"[0-9a-f]{64}")

METHOD = pa.struct([
    pa.field("method", pa.string()),
    pa.field("fingerprint", pa.string()),  # sha256 of what makes its maps: options, target, seed, preprocessing, metrics
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
    pa.field("model", pa.string()),  # sha256 of the model (transforms.models.model_identity)
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


def read(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The recorded runs, one per slot, sorted by slot; rows that cannot be trusted are left out
    with a warning, and so are rows whose saliency files are gone (their shards are read again)
    and rows naming a run an earlier slot names."""
    fs, path = storage.filesystem(storage.join(root, FOLDER), storage_options)
    fs.invalidate_cache()
    base = storage.filesystem(root, storage_options)[1].rstrip("/")
    try:
        files = sorted(fs.glob(f"{path}/*.parquet"))
    except FileNotFoundError:
        return []
    rows = []
    for file in files:
        slot = urllib.parse.unquote(file.rsplit("/", 1)[-1][:-len(".parquet")])
        try:
            check_slot(slot)
        except ValueError:
            log.warning("history %s: left out %s: not a slot's file name", root, file.rsplit("/", 1)[-1])
            continue
        try:
            with fs.open(file, "rb") as f:
                table = pq.read_table(f)
            found = _conform(table).to_pylist()
            problem = None if len(found) == 1 else f"it holds {len(found)} rows"
            problem = problem or _valid(found[0], slot)
            missing = 0 if problem else _missing_files(fs, base, found[0])
            problem = problem or (f"{missing} of its saliency files are missing" if missing else None)
        except FileNotFoundError:
            continue  # replaced or removed since the listing
        except OSError:
            problem = "the storage failed to read it"
        except Exception as e:  # noqa: BLE001 - any unreadable file costs its row, never the run
            problem = f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        if problem:
            log.warning("history %s: left out %s: %s; its images will be explained again", root,
                        file.rsplit("/", 1)[-1], problem)
            continue
        rows.append(found[0])
    rows.sort(key=lambda r: r["slot"])
    seen: set[str] = set()
    for r in list(rows):  # a run fills one slot; a copied file would count its maps twice
        if r["run_id"] in seen:
            log.warning("history %s: left out slot %s: run %s already fills an earlier slot", root, r["slot"],
                        r["run_id"])
            rows.remove(r)
        seen.add(r["run_id"])
    return rows


def _conform(table: pa.Table) -> pa.Table:
    """The table in SCHEMA: columns it lacks (a row of another release) read as null; the checks
    of ``_valid`` then refuse a row without the ones that matter."""
    for field in SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def recorded_runs(root: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Every run id any file of the history names, however strict ``read`` is with the file
    (publication.reclaim keeps their folders: a row of another release, or one whose files are
    partly gone, must not cost what is left). A file that pyarrow cannot parse names no run; a
    storage error raises, so that reclaim removes nothing."""
    fs, path = storage.filesystem(storage.join(root, FOLDER), storage_options)
    fs.invalidate_cache()
    try:
        files = fs.glob(f"{path}/*.parquet")
    except FileNotFoundError:
        return set()
    found: set[str] = set()
    for file in files:
        try:
            with fs.open(file, "rb") as f:
                column = pq.read_table(f, columns=["run_id"]).column("run_id")
        except FileNotFoundError:
            continue
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - not Parquet, or no run_id column: it names no run
            log.warning("history %s: %s names no run (%s)", root, file.rsplit("/", 1)[-1], type(e).__name__)
            continue
        found |= {str(v) for v in column.to_pylist() if RUN_ID.fullmatch(str(v))}
    return found


def saliency_dataset(root: str, storage_options: dict[str, Any] | None = None,
                     rows: Iterable[dict[str, Any]] | None = None):
    """Every recorded run's maps as one ``pyarrow.dataset`` (columns ``model`` and ``run`` from
    the folders' names; the runs' schemas unified, so a column one run lacks reads as null)."""
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
    return ds.dataset(paths, schema=pa.unify_schemas(schemas + [partitioning.schema]), format="parquet",
                      filesystem=fs, partitioning=partitioning, partition_base_dir=f"{base}/saliency")
