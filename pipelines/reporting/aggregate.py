"""What the report draws from an audit's saliency rows, gathered a batch at a time.

The report used to hold every row as a Python dict (about 13 KB a row: 14 GB for a million).
Here the rows stream through Arrow (``AuditDir.scan``: batches, only the columns a pass needs)
into what the page shows: the images it picks, histogram bins, one curve sum per method, counts.
What is kept is bounded by the page, never by the audit. The picks are the ones the page always
made (the smallest image ids of a class, the extreme faithfulness gains): each batch's candidates
are merged into a bounded list, which ends as the sort of all rows would.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from saliency_audit.explainers.metrics import metric_columns
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.plots import Bins

# The metrics the page draws as histograms, in its order; "<metric>_random" is the random order's.
DISTRIBUTED = (*(c for c in metric_columns() if not c.endswith("_random")), "time_ms")
GAIN_COLUMNS = ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random")
IDS_PER_PASS = 1 << 20  # rows whose image ids one pass of the distinct count holds (~16 bytes an id)


def _floats(column) -> np.ndarray:
    """A numeric column as float64, null as NaN."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def by_method(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """method -> mask of its rows in the batch."""
    encoded = pc.dictionary_encode(batch.column("method"))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return {method: codes == code for code, method in enumerate(encoded.dictionary.to_pylist())}


def misclassified(batch: pa.RecordBatch) -> pa.Array:
    """Labelled rows whose prediction is not the label."""
    if "label" not in batch.schema.names:
        return pa.array(np.zeros(batch.num_rows, dtype=bool))
    label, predicted = batch.column("label"), batch.column("predicted")
    return pc.and_(pc.is_valid(label), pc.fill_null(pc.not_equal(label, predicted), True))


class SmallestIds:
    """Per key (a class), the k smallest distinct image ids seen. Python's str order and Arrow's
    (UTF-8 bytes) agree, so this is the head of ``sorted(set(ids))``."""

    def __init__(self, k: int):
        self.k = k
        self.kept: dict[int, list[str]] = defaultdict(list)

    def add(self, ids: pa.Array, keys: pa.Array | None = None) -> None:
        """``keys`` (integers, null rows are left out): one per id; None puts every id under key 0."""
        keys = pa.array(np.zeros(len(ids), dtype=np.int64)) if keys is None else keys
        known = pc.is_valid(keys)
        pairs = pa.table({"key": keys.filter(known), "id": ids.filter(known)})
        if self.k <= 0 or not pairs.num_rows:
            return
        pairs = pairs.group_by(["key", "id"], use_threads=False).aggregate([]).sort_by([("key", "ascending"),
                                                                                         ("id", "ascending")])
        sorted_keys = pairs.column("key").to_numpy()
        rank = np.arange(len(sorted_keys)) - np.searchsorted(sorted_keys, sorted_keys)  # place within its key
        head = pairs.filter(pa.array(rank < self.k))
        candidates = defaultdict(list)
        for key, image_id in zip(head.column("key").to_pylist(), head.column("id").to_pylist()):
            candidates[key].append(image_id)
        for key, ids_of_key in candidates.items():
            self.kept[key] = sorted(set(self.kept[key]).union(ids_of_key))[: self.k]

    def ids(self, key: int = 0) -> list[str]:
        return list(self.kept.get(key, []))


class Extremes:
    """Per method, the rows of the k lowest and the k highest faithfulness gains (the random
    order's deletion AUC minus the map's), ties by image id: the page's worst and best. A gain that
    is null (a metric missing) or NaN ranks nowhere."""

    def __init__(self, k: int):
        self.k = k
        self.rows: dict[tuple[str, str], list[dict]] = defaultdict(list)  # (worst|best, method) -> rows

    def add(self, batch: pa.RecordBatch, methods: dict[str, np.ndarray]) -> None:
        names = batch.schema.names
        if self.k <= 0 or "deletion_auc" not in names or "deletion_auc_random" not in names:
            return
        gain = pc.subtract(pc.cast(batch.column("deletion_auc_random"), pa.float64()),
                           pc.cast(batch.column("deletion_auc"), pa.float64()))
        rankable = np.isfinite(_floats(gain))
        shown = [c for c in ("image_id", "target", *GAIN_COLUMNS) if c in names]
        table = pa.Table.from_batches([batch.select(shown)]).append_column("gain", gain)
        for method, mine in methods.items():
            candidates = table.filter(pa.array(mine & rankable))
            for kind, order in (("worst", "ascending"), ("best", "descending")):
                head = candidates.take(pc.sort_indices(candidates, [("gain", order), ("image_id", order)])[: self.k])
                merged = self.rows[(kind, method)] + head.to_pylist()
                merged.sort(key=lambda r: (r["gain"], r["image_id"]), reverse=kind == "best")
                self.rows[(kind, method)] = merged[: self.k]

    def ids(self, kind: str, method: str) -> list[str]:
        return [r["image_id"] for r in self.rows.get((kind, method), [])]


@dataclasses.dataclass
class Picks:
    """The images the page shows, and the counts around them."""
    classes: list[int]                       # the explained targets, sorted
    selection: dict[str, list[str]]          # class:<c>, misclassified, worst:<method>, best:<method> -> ids
    extremes: dict[tuple[str, str], list[dict]]  # (worst|best, method) -> the rows behind the ids


def pick_images(audit: AuditDir, methods: list[str], *, per_class: int, extremes: int,
                misclassified_shown: int) -> Picks:
    """One pass over the scalar columns: the first ``per_class`` image ids of each class, the first
    misclassified ones, and per method the ``extremes`` worst and best by faithfulness."""
    classes, first_of_class = set(), SmallestIds(per_class)
    first_wrong, extreme = SmallestIds(misclassified_shown), Extremes(extremes)
    columns = ["image_id", "method", "target", "label", "predicted", *GAIN_COLUMNS]
    for batch in audit.scan("saliency", columns):
        ids, targets = batch.column("image_id"), batch.column("target")
        classes.update(v for v in pc.unique(targets).to_pylist() if v is not None)
        first_of_class.add(ids, targets)
        first_wrong.add(ids.filter(misclassified(batch)))
        extreme.add(batch, by_method(batch))
    selection = {f"class:{c}": first_of_class.ids(c) for c in sorted(classes)}
    selection["misclassified"] = first_wrong.ids()
    for method in methods:
        selection[f"worst:{method}"] = extreme.ids("worst", method)
        selection[f"best:{method}"] = extreme.ids("best", method)
    return Picks(sorted(classes), selection, dict(extreme.rows))


def first_rows(audit: AuditDir, image_ids: Iterable[str], columns: Iterable[str]) -> dict[str, dict]:
    """image_id -> ``columns`` of its first row (in file order), for the given images only."""
    ids, first = set(image_ids), {}
    for batch in audit.scan("saliency", ["image_id", *columns], image_ids=ids) if ids else ():
        for row in batch.to_pylist():
            first.setdefault(row["image_id"], row)
    return first


def _bucket(ids: pa.Array, buckets: int) -> np.ndarray:
    """A bucket per id, the same for equal ids within this process (str hashes are per process)."""
    return np.fromiter((hash(i) % buckets for i in ids.to_pylist()), dtype=np.int64, count=len(ids))


def _distinct(parts: list[pa.Array]) -> int:
    return len(pc.unique(pa.chunked_array(parts))) if parts else 0


def count_images(audit: AuditDir) -> tuple[int, int]:
    """How many distinct images the saliency rows hold, and how many of them are labelled and
    misclassified: exact, in as many passes over the ids as keep each pass to IDS_PER_PASS rows'
    worth (an image's rows all fall in one pass, by a hash of its id)."""
    passes = max(1, math.ceil(audit.row_count("saliency") / IDS_PER_PASS))
    images = wrong = 0
    for part in range(passes):
        seen, seen_wrong = [], []
        for batch in audit.scan("saliency", ["image_id", "label", "predicted"]):
            if passes > 1:
                batch = batch.filter(pa.array(_bucket(batch.column("image_id"), passes) == part))
            seen.append(pc.unique(batch.column("image_id")))
            seen_wrong.append(pc.unique(batch.column("image_id").filter(misclassified(batch))))
        images, wrong = images + _distinct(seen), wrong + _distinct(seen_wrong)
    return images, wrong


@dataclasses.dataclass
class Distribution:
    """One metric's histograms: per method its values' bins and the random order's (or None)."""
    metric: str
    panels: dict[str, tuple[Bins, Bins | None]]


def _value_ranges(audit: AuditDir, reference: dict[str, str | None]) -> dict[str, tuple[float, float]]:
    """Per DISTRIBUTED metric the rows carry (a non-null value somewhere), the range of its finite
    values and its random order's, (0, 1) if none is finite."""
    carried, low, high = set(), {}, {}
    for batch in audit.scan("saliency", [*DISTRIBUTED, *filter(None, reference.values())]):
        for metric in (m for m in DISTRIBUTED if m in batch.schema.names):
            if batch.column(metric).null_count < batch.num_rows:
                carried.add(metric)
            for column in filter(None, (metric, reference[metric])):
                values = _floats(batch.column(column))
                values = values[np.isfinite(values)]
                if len(values):
                    low[metric] = min(low.get(metric, math.inf), float(values.min()))
                    high[metric] = max(high.get(metric, -math.inf), float(values.max()))
    return {m: (low.get(m, 0.0), high.get(m, 1.0)) for m in DISTRIBUTED if m in carried}


def distributions(audit: AuditDir, methods: list[str]) -> list[Distribution]:
    """The DISTRIBUTED metrics the rows carry, binned per method over one range per metric (that
    of every finite value, the random order's included): a pass for the ranges, one for the bins."""
    names = set(audit.columns("saliency").names)
    reference = {m: f"{m}_random" if f"{m}_random" in names else None for m in DISTRIBUTED}
    ranges = _value_ranges(audit, reference)
    shown = [Distribution(metric, {method: (Bins(span), Bins(span) if reference[metric] else None)
                                   for method in methods}) for metric, span in ranges.items()]
    columns = ["method", *ranges, *filter(None, map(reference.get, ranges))]
    for batch in audit.scan("saliency", columns) if shown else ():
        rows_of = by_method(batch)
        for distribution in shown:
            random_order = reference[distribution.metric]
            values = _floats(batch.column(distribution.metric))
            random = _floats(batch.column(random_order)) if random_order else None
            for method, (bins, random_bins) in distribution.panels.items():
                if method in rows_of:
                    bins.add(values[rows_of[method]])
                    if random_bins is not None:
                        random_bins.add(random[rows_of[method]])
    return shown


def mean_curves(audit: AuditDir, column: str) -> dict[str, np.ndarray]:
    """method -> the mean of its rows' ``column`` (a list of floats of one length per method, the
    first one seen; rows without one, or of another length, are left out)."""
    sums, counts, lengths = {}, defaultdict(int), {}
    for batch in audit.scan("saliency", ["method", column]):
        curves = batch.column(column)
        length = pc.fill_null(pc.list_value_length(curves), 0).to_numpy(zero_copy_only=False)
        for method, mine in by_method(batch).items():
            mine = mine & (length > 0)
            if not mine.any():
                continue
            wanted = lengths.setdefault(method, int(length[mine][0]))
            mine &= length == wanted
            values = _floats(pc.list_flatten(curves.filter(pa.array(mine)))).reshape(-1, wanted)
            sums[method] = sums.get(method, 0.0) + values.sum(axis=0)
            counts[method] += len(values)
    return {method: total / counts[method] for method, total in sums.items()}


@dataclasses.dataclass
class Errors:
    """errors/: how many, per (stage, method), and the first ``shown`` rows."""
    total: int
    counts: dict[tuple[str, str], int]
    first: list[dict]


def errors(audit: AuditDir, shown: int = 100) -> Errors:
    counts, first, total = defaultdict(int), [], 0
    for batch in audit.scan("errors"):
        total += batch.num_rows
        if len(first) < shown:
            first += batch.slice(0, shown - len(first)).to_pylist()
        grouped = pa.Table.from_batches([batch.select(["stage", "method"])]).group_by(
            ["stage", "method"], use_threads=False).aggregate([([], "count_all")])
        for stage, method, n in zip(*(grouped.column(c).to_pylist() for c in ("stage", "method", "count_all"))):
            counts[(stage, method or "all methods")] += n  # no method: failed before any ran
    return Errors(total, dict(counts), first)
