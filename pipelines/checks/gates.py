"""Gates: thresholds that decide whether an audit is acceptable, alone or against a baseline audit.

``saliency-audit check AUDIT [--baseline PREVIOUS] [--gate NAME=VALUE ...]`` and, when a run names
a gate or a baseline (``[gates]`` / ``[baseline]`` in its spec), the end of ``run`` evaluate every
gate of GATES at its threshold (its default unless given; ``NAME=off`` turns one off) and write a
verdict (``verdict.json``): per gate and method the value, the threshold, ``pass``, ``fail`` or
``skipped`` (with the reason: no baseline, no labels, metrics off, not computed), and the images
that weigh most against it. A gate asked for by name that cannot be judged fails instead of being
skipped. Exit code 0 when no gate fails, 1 when one does, 2 for usage errors.

An audit's rows are scanned a batch of a few scalar columns at a time (``Side``): memory holds
sums and the worst images, whatever the size of the audit. Against a baseline the two audits'
scalar columns are joined once as Arrow tables (``Pairs``), images under one id with other
content (``content_sha256``) left out, and the drift gates stream the maps of the pairs a chunk
at a time with the diff's reader (``saliency_audit.pipelines.reporting.diff``). docs/gates.md describes each gate.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saliency_audit.explainers.core.paths import redact
from saliency_audit.pipelines.checks.findings import SCORE_THRESHOLD
from saliency_audit.transforms.io import publication, storage

OFF, ON = "off", "on"
FAILED_CHECK = 1  # the exit code of a check that failed: a gate fails, or cannot be judged though asked for
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
WORST = 5  # images named per gate
VERDICT = publication.VERDICT


@dataclasses.dataclass(frozen=True)
class Gate:
    """One gate: its kind, default threshold, the range a threshold may take, and whether the
    value must stay at most (``max``) or at least (``min``) the threshold."""

    kind: str
    default: float | None  # None: the audit's own (the sanity check's --sanity-threshold)
    low: float
    high: float
    bound: str  # "max" | "min"
    doc: str


GATES: dict[str, Gate] = {
    "accuracy_drop": Gate("accuracy", 1.0, -100, 100, "max",
                          "baseline accuracy minus the audit's, in percentage points (labelled images)"),
    "error_rate": Gate("errors", 0.01, 0, 1, "max", "errors / records read, per method (manifest counts)"),
    "deletion_rise": Gate("faithfulness", 0.05, -1, 1, "max",
                          "mean deletion AUC minus the baseline's, per method, on the images both explained"),
    "deletion_vs_random": Gate("faithfulness", 0.8, 0, 10, "max",
                               "mean deletion AUC / mean random-order deletion AUC, per method"),
    "sanity": Gate("sanity", None, -1, 1, "max",
                   "the sanity check's mean rank correlation at full randomisation, per method "
                   "(default: the run's --sanity-threshold)"),
    "rank_correlation": Gate("drift", 0.5, -1, 1, "min",
                             "quantile (drift_quantile) of the per-image Spearman correlation with the "
                             "baseline's maps"),
    "top_k_overlap": Gate("drift", 0.5, 0, 1, "min",
                          "quantile (drift_quantile) of the per-image top-k overlap with the baseline's maps"),
    "ndcg": Gate("drift", 0.9, 0, 1, "min",
                 "lowest per-class nDCG of the mean |map| against the baseline's (Clarify's attribution drift)"),
    "findings": Gate("findings", SCORE_THRESHOLD, 0, 1, "max",
                     "highest Clever-Hans score in the audit's findings/ table, per method (docs/findings.md)"),
    "shared_images": Gate("coverage", 0.5, 0, 1, "min",
                          "share of the audit's images the baseline also holds; under it the gates that "
                          "compare are skipped"),
}
# The gates that compare with the baseline: skipped without one, or when the audits share too few images.
COMPARING = ("accuracy_drop", "deletion_rise", "rank_correlation", "top_k_overlap", "ndcg")
NO_BASELINE = "no baseline"
# Settings of the drift gates, given like gates (NAME=VALUE) but never pass or fail.
SETTINGS: dict[str, tuple[float, float, float]] = {"drift_quantile": (0.5, 0, 1), "top_k": (0.1, 0, math.inf)}


class GateError(ValueError):
    """A bad gate name or value; the message names it, in one line."""


# --- gate values: NAME=VALUE on the command line, NAME = VALUE in a spec's [gates] -----------

def parse_gate(text: str) -> tuple[str, float | bool]:
    """``NAME=VALUE`` -> (NAME, threshold), (NAME, True) for ``on`` (its default) or (NAME, False)
    for ``off``. Raises GateError naming the gate."""
    name, eq, value = str(text).partition("=")
    name = name.strip()
    if not eq:
        raise GateError(f"expected NAME=VALUE, got {text[:60]!r}")
    return name, check_value(name, value.strip())


def check_value(name: str, value: Any) -> float | bool:
    """A gate's or setting's value, checked: a finite number in its range, or on/off (gates only)."""
    if name not in GATES and name not in SETTINGS:
        close = difflib.get_close_matches(name, [*GATES, *SETTINGS], n=1)
        raise GateError(f"unknown gate {name[:40]!r}" + (f"; did you mean {close[0]}?" if close
                                                           else f"; known: {', '.join([*GATES, *SETTINGS])}"))
    if isinstance(value, str) and value.lower() in ("on", "true", "off", "false"):
        value = value.lower() in ("on", "true")
    if isinstance(value, bool):
        if name in SETTINGS and not value:
            raise GateError(f"{name}: a setting cannot be turned off")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GateError(f"{name}: expected a number, on or off, got {str(value)[:40]!r}") from None
    low, high = (GATES[name].low, GATES[name].high) if name in GATES else SETTINGS[name][1:]
    if not (math.isfinite(number) and low <= number <= high) or (name == "top_k" and number <= 0):
        raise GateError(f"{name}: must be a finite number between {low:g} and {high:g}, got {value}")
    return number


def thresholds(given: Iterable[tuple[str, float | bool]] | None) -> dict[str, float | None | bool]:
    """Every gate's threshold (None: the audit's own; False: off) and every setting, the last
    value given for a name winning."""
    out: dict[str, Any] = {name: gate.default for name, gate in GATES.items()}
    out.update({name: spec[0] for name, spec in SETTINGS.items()})
    for name, value in given or ():
        out[name] = (GATES[name].default if name in GATES else SETTINGS[name][0]) if value is True else value
    return out


# --- results ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    name: str
    method: str | None
    value: float | None
    threshold: float | None
    status: str
    worst_images: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        gate = GATES[self.name]
        return {"name": self.name, "kind": gate.kind, "method": self.method, "value": _finite(self.value),
                "threshold": self.threshold, "bound": gate.bound, "status": self.status,
                # the contract's boolean beside status: null for a skipped gate (neither held nor failed)
                "passed": {PASS: True, FAIL: False}.get(self.status),
                "worst_images": self.worst_images[:WORST], "reason": self.reason}


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def judge(name: str, method: str | None, value: float | None, threshold: float,
          worst: list[str] | None = None, why: str = "") -> Result:
    """pass/fail of a value against its threshold; a value that is missing or not finite is
    skipped (never a silent pass)."""
    if value is None or not math.isfinite(value):
        return Result(name, method, None, threshold, SKIPPED, [], why or "no finite value")
    holds = value <= threshold if GATES[name].bound == "max" else value >= threshold
    return Result(name, method, float(value), threshold, PASS if holds else FAIL, list(worst or [])[:WORST], why)


def skipped(name: str, method: str | None, threshold: float | None, reason: str) -> Result:
    return Result(name, method, None, threshold, SKIPPED, [], reason)


# --- what the gates read ------------------------------------------------------------------------

CONTENT = "content_sha256"  # per image: sha256 of its encoded bytes in the shard (older audits lack it)


def scan(audit, name: str, columns: list[str]) -> Iterator[pa.Table]:
    """One output's rows a batch at a time (``AuditDir.scan``: memory holds a few batches, never
    the audit), as tables of ``columns`` exactly: null where the output lacks one."""
    for batch in audit.scan(name, columns):
        table = pa.Table.from_batches([batch])
        for column in columns:
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows))
        yield table.select(columns)


def by_method(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """A batch's rows, one method at a time (rows without a method left out)."""
    for method in sorted(m for m in pc.unique(table["method"]).to_pylist() if m is not None):
        yield str(method), table.filter(pc.equal(table["method"], method))


def floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, null (and a column a file lacks) as NaN."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def smallest(ids: pa.ChunkedArray | pa.Array, n: int = WORST) -> list[str]:
    """The n smallest distinct ids, read out of Arrow without a Python object per row."""
    unique = pc.unique(pc.drop_null(pc.cast(ids, pa.string())))
    return unique.take(pc.sort_indices(unique)[:n]).to_pylist()


class Lowest:
    """The ``n`` images of lowest key in a stream of batches, ties going to the smaller id: a
    gate's worst images without holding every image's value."""

    def __init__(self, n: int = WORST):
        self.n, self.kept = n, []

    def add(self, keys: np.ndarray, ids: pa.ChunkedArray | pa.Array) -> None:
        keys = np.asarray(keys, dtype=np.float64)
        picked = np.flatnonzero(~np.isnan(keys))
        if len(picked) > self.n:  # at or under the n-th lowest, so ties at the bound compete on their ids
            bound = np.partition(keys[picked], self.n - 1)[self.n - 1]
            picked = picked[keys[picked] <= bound]
        chosen = ids.take(pa.array(picked, pa.int64())).to_pylist()
        self.kept = sorted([*self.kept, *zip(keys[picked].tolist(), map(str, chosen))])[: self.n]

    @property
    def ids(self) -> list[str]:
        return list(dict.fromkeys(image_id for _, image_id in self.kept))  # an image's several targets: once


@dataclasses.dataclass
class Side:
    """One audit's saliency rows, scanned a record batch of a few scalar columns at a time: the
    gates keep sums and a few worst images, never the rows, so ``check`` of an audit stays flat in
    memory whatever its size."""

    audit: Any  # AuditDir

    @classmethod
    def read(cls, audit) -> "Side":
        return cls(audit)

    def batches(self, columns: list[str]) -> Iterator[pa.Table]:
        return scan(self.audit, "saliency", columns)

    @functools.cached_property
    def methods(self) -> list[str]:
        """The methods to judge: not the control maps (random, sobel), which ignore the model by
        design and would fail every quality gate; they are the levels the others must beat."""
        found: set[str] = set()
        for batch in self.batches(["method"]):
            found.update(str(m) for m in pc.unique(batch["method"]).to_pylist() if m is not None)
        return [m for m in dict.fromkeys([*self.audit.methods, *sorted(found)]) if not self.audit.control(m)]


# --- comparing with the baseline: the rows both audits hold, joined once -----------------------

# A row's columns for the comparisons, typed alike whatever each file holds. The content hash
# keeps 16 hex digits (64 bits): plenty to tell two images under one id apart, a quarter the memory.
_PAIR_SCHEMA = pa.schema([("image_id", pa.string()), ("method", pa.string()), ("label", pa.int32()),
                          ("predicted", pa.int32()), ("target", pa.int32()), ("height", pa.int32()),
                          ("width", pa.int32()), ("deletion_auc", pa.float64()), (CONTENT, pa.string())])
_PAIRED = ["image_id", "method", "target", "height", "width", "deletion_auc"]  # per (image, method), both sides


def keyed_rows(side: Side) -> pa.Table:
    """The audit's rows as one Arrow table of the columns a comparison needs: no maps and no Python
    object per row (some 50 bytes a row)."""
    parts = []
    for batch in side.batches(_PAIR_SCHEMA.names):
        columns = [pc.cast(batch[f.name], f.type) for f in _PAIR_SCHEMA]
        columns[-1] = pc.utf8_slice_codeunits(columns[-1], 0, 16)
        parts.append(pa.Table.from_arrays(columns, schema=_PAIR_SCHEMA))
    return pa.concat_tables(parts).combine_chunks() if parts else _PAIR_SCHEMA.empty_table()


def _per_image(rows: pa.Table, columns: list[str]) -> pa.Table:
    """One row per image: the first non-null value of each column (every method's row of an image
    carries the same label, prediction and content)."""
    grouped = rows.select(["image_id", *columns]).group_by("image_id", use_threads=False)
    table = grouped.aggregate([(c, "first") for c in columns])
    return table.rename_columns([n.removesuffix("_first") for n in table.column_names])


def _predictions(rows: pa.Table) -> pa.Table:
    """One row per labelled image: its label and prediction."""
    labelled = rows.filter(pc.and_(pc.greater_equal(rows["label"], 0), pc.is_valid(rows["predicted"])))
    return _per_image(labelled, ["label", "predicted"])


@dataclasses.dataclass
class Pairs:
    """What the comparisons need, joined once: ``rows``, the (image, method) rows both audits hold
    of the same images (the baseline's columns suffixed ``_b``), ``predictions``, their labelled
    images, and the audit's images that are not shared: missing from the baseline, or held there
    with other content under the same id (both audits hash the image and the hashes differ). An
    audit without content hashes (older audits) is compared by id."""

    rows: pa.Table
    predictions: pa.Table
    images: int  # the audit's images
    shared: int
    not_shared: list[str]  # the smallest ids of the audit's images the baseline lacks or holds otherwise
    by_content: bool  # both audits hash their images
    unshared_content: int
    unshared_examples: list[str]
    by_class: bool = False  # rows paired by (image, method, target class)


def pair_up(audit: Side, baseline: Side) -> Pairs:
    """With several targets per image on either side, rows pair by (image, method, target class):
    a map is compared with the other audit's map of the same class. Otherwise by (image, method), as
    one target per image always did: the predicted class's maps pair even where the prediction moved."""
    mine, theirs = keyed_rows(audit), keyed_rows(baseline)
    by_class = audit.audit.several_targets or baseline.audit.several_targets
    images = _per_image(mine, [CONTENT])
    held = images.join(_per_image(theirs, [CONTENT]), "image_id", join_type="inner", right_suffix="_b",
                       use_threads=False)
    other = pc.fill_null(pc.not_equal(held[CONTENT], held[f"{CONTENT}_b"]), False)  # null: not hashed
    shared, unshared = held.filter(pc.invert(other))["image_id"], held.filter(other)["image_id"]
    keys = ["image_id", "method", "target"] if by_class else ["image_id", "method"]
    rows = mine.select(_PAIRED).join(theirs.select(_PAIRED), keys, join_type="inner", right_suffix="_b",
                                     use_threads=False)
    if by_class:
        rows = rows.append_column("target_b", rows["target"])
    predictions = _predictions(mine).join(_predictions(theirs), "image_id", join_type="inner", right_suffix="_b",
                                          use_threads=False)
    not_shared = images.filter(pc.invert(pc.is_in(images["image_id"], shared)))["image_id"]
    by_content = all(pc.any(pc.is_valid(t[CONTENT])).as_py() or False for t in (mine, theirs))
    return Pairs(rows.filter(pc.is_in(rows["image_id"], shared)),
                 predictions.filter(pc.is_in(predictions["image_id"], shared)), images.num_rows, len(shared),
                 smallest(not_shared), by_content, len(unshared), smallest(unshared), by_class)


# --- the gates ------------------------------------------------------------------------------------

def accuracy_gate(pairs: Pairs | None, limits: dict) -> list[Result]:
    name, threshold = "accuracy_drop", limits["accuracy_drop"]
    if pairs is None:
        return [skipped(name, None, threshold, NO_BASELINE)]
    images = pairs.predictions  # the same images on both sides, or the drop compares two different samples
    if not images.num_rows:
        return [skipped(name, None, threshold, "no labelled image in both audits")]
    right = pc.equal(images["label"], images["predicted"])
    right_before = pc.equal(images["label_b"], images["predicted_b"])
    mine, theirs = (100.0 * pc.sum(pc.cast(r, pa.int64())).as_py() / images.num_rows for r in (right, right_before))
    # worst: images the baseline got right and the audit gets wrong, then the audit's other mistakes
    newly = smallest(images.filter(pc.and_(pc.invert(right), right_before))["image_id"])
    others = smallest(images.filter(pc.and_(pc.invert(right), pc.invert(right_before)))["image_id"])
    return [judge(name, None, theirs - mine, threshold, newly + others,
                  f"accuracy {mine:.2f}%, baseline {theirs:.2f}%, on the {images.num_rows} "
                  f"labelled image(s) both hold")]


def error_gate(audit: Side, limits: dict) -> list[Result]:
    name, threshold = "error_rate", limits["error_rate"]
    counts = audit.audit.manifest.get("counts")
    if not isinstance(counts, dict) or not counts:
        return [skipped(name, None, threshold, "the manifest has no counts")]
    errors = error_images(audit.audit)
    out = []
    for method, c in sorted(counts.items()):
        read, failed, skip = (c.get("read"), c.get("errors"), c.get("skipped", 0)) if isinstance(c, dict) \
            else (None, None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (read, failed, skip)) \
                or read <= skip:
            out.append(skipped(name, method, threshold, f"counts of {method} unreadable or nothing to explain: "
                                                        f"{c!r}"[:200]))
            continue
        # an incremental run's skipped pairs were explained by an earlier run; several targets: per pair
        tried = (c["targets"] if isinstance(c.get("targets"), int) else read) - skip
        worst = sorted({*errors.get(None, []), *errors.get(method, [])})
        unit = "(image, target) pairs " if isinstance(c.get("targets"), int) else ""
        out.append(judge(name, method, failed / tried, threshold, worst, f"{failed} error(s) of {tried} {unit}"
                         + ("read" if not skip else f"to explain ({skip} skipped)")))
    return out


def error_images(audit) -> dict[str | None, list[str]]:
    """Per method (None: the errors of every method, read or decode), the smallest ids in errors/."""
    kept: dict[str | None, list[str]] = defaultdict(list)
    for batch in scan(audit, "errors", ["image_id", "method"]):
        for method in pc.unique(batch["method"]).to_pylist():
            mine = pc.is_null(batch["method"]) if method is None else pc.equal(batch["method"], method)
            kept[method] = sorted({*kept[method], *smallest(batch["image_id"].filter(mine))})[:WORST]
    return kept


@dataclasses.dataclass
class DeletionSums:
    """One method's deletion AUCs over a scan: how many are finite, the sums of the deletion and the
    random-order AUC over the images with both, and the images furthest above the random order."""

    finite: int = 0
    both: int = 0
    deletion: float = 0.0
    random: float = 0.0
    worst: Lowest = dataclasses.field(default_factory=Lowest)


def deletion_sums(audit: Side) -> dict[str, DeletionSums]:
    out: dict[str, DeletionSums] = defaultdict(DeletionSums)
    for batch in audit.batches(["image_id", "method", "deletion_auc", "deletion_auc_random"]):
        for method, rows in by_method(batch):
            deletion, random = floats(rows["deletion_auc"]), floats(rows["deletion_auc_random"])
            both = np.isfinite(deletion) & np.isfinite(random)
            sums = out[method]
            sums.finite += int(np.isfinite(deletion).sum())
            sums.both += int(both.sum())
            sums.deletion += float(deletion[both].sum())
            sums.random += float(random[both].sum())
            sums.worst.add(-(deletion - random)[both], rows["image_id"].filter(pa.array(both)))
    return out


def faithfulness_gates(audit: Side, pairs: Pairs | None, limits: dict) -> list[Result]:
    out = []
    sums = deletion_sums(audit)
    for method in audit.methods:
        mine = sums.get(method, DeletionSums())
        if not mine.finite:
            why = "no deletion AUC (metrics off)"
            out += [skipped(n, method, limits[n], why) for n in ("deletion_vs_random", "deletion_rise")
                    if limits[n] is not False]
            continue
        if limits["deletion_vs_random"] is not False:
            ratio = mine.deletion / mine.random if mine.both and mine.random > 0 else None
            out.append(judge("deletion_vs_random", method, ratio, limits["deletion_vs_random"], mine.worst.ids,
                             f"mean deletion AUC over the random order's, {mine.both} image(s)"))
        if limits["deletion_rise"] is not False:
            out.append(_deletion_rise(method, pairs, limits["deletion_rise"]))
    return out


def _deletion_rise(method: str, pairs: Pairs | None, threshold: float) -> Result:
    if pairs is None:
        return skipped("deletion_rise", method, threshold, NO_BASELINE)
    rows = pairs.rows.filter(pc.equal(pairs.rows["method"], method))
    rise = floats(rows["deletion_auc"]) - floats(rows["deletion_auc_b"])
    both = np.isfinite(rise)
    if not both.any():
        return skipped("deletion_rise", method, threshold, "no image with a deletion AUC in both audits")
    worst = Lowest()
    worst.add(-rise[both], rows["image_id"].filter(pa.array(both)))
    return judge("deletion_rise", method, float(np.mean(rise[both])), threshold, worst.ids,
                 f"on {int(both.sum())} shared image(s)")


def sanity_gates(audit: Side, limits: dict) -> list[Result]:
    sanity = audit.audit.manifest.get("sanity")
    threshold = limits["sanity"]
    if not isinstance(sanity, dict) or not isinstance(sanity.get("methods"), dict):
        return [skipped("sanity", None, _number_or_none(threshold), "the sanity check was not run")]
    if threshold is None:
        threshold = _number_or_none(sanity.get("threshold"))
    if threshold is None:
        return [skipped("sanity", None, None, "no threshold: the manifest's sanity threshold is not a number")]
    rows = [r for r in audit.audit.rows("sanity", ["method", "step", "image_id", "rank_correlation"])
            if isinstance(r.get("step"), int) and r["step"] >= 1]  # step 0: the random logit test's rows
    last = max((r["step"] for r in rows), default=None)
    out = []
    for method, verdict in sorted(sanity["methods"].items()):
        if audit.audit.control(method):
            continue  # a control map ignores the model by design: the level to beat, not a method to judge
        value = _number_or_none(verdict.get("rank_correlation")) if isinstance(verdict, dict) else None
        final = [r for r in rows if r.get("method") == method and r.get("step") == last
                 and _number_or_none(r.get("rank_correlation")) is not None]
        worst = [r["image_id"] for r in sorted(final, key=lambda r: (-r["rank_correlation"], r["image_id"]))]
        out.append(judge("sanity", method, value, threshold, worst,
                         "mean rank correlation with the fully randomised model's maps"))
    return out


def _number_or_none(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def findings_gates(audit: Side, limits: dict) -> list[Result]:
    threshold = limits["findings"]
    if not audit.audit.files("findings"):
        return [skipped("findings", None, threshold, "not computed (the audit has no findings/ table)")]
    table = audit.audit.table("findings", ["method", "class", "kind", "score", "images"])
    missing = {"method", "score"} - set(table.column_names)
    if missing:
        return [skipped("findings", None, threshold, f"findings/ lacks column(s) {', '.join(sorted(missing))}")]
    per_method: dict[str, list[dict]] = defaultdict(list)
    for row in table.to_pylist():
        if _number_or_none(row.get("score")) is not None:
            per_method[str(row["method"])].append(row)
    out = []
    for method in sorted(m for m in per_method if not audit.audit.control(m)):
        top = sorted(per_method[method], key=lambda r: -r["score"])
        images = [str(i) for r in top if r["score"] > threshold for i in (r.get("images") or [])
                  if isinstance(r.get("images"), list)]
        where = f"class {top[0].get('class')}, {top[0].get('kind')}"
        out.append(judge("findings", method, top[0]["score"], threshold, list(dict.fromkeys(images)),
                         f"highest: {where}"))
    return out or [skipped("findings", None, threshold, "findings/ holds no finite score")]


def shared_gate(pairs: Pairs | None, limits: dict) -> tuple[list[Result], str]:
    """The share of the audit's images the baseline holds too (the same content, where both audits
    hash it), and why the gates that compare are skipped ("" when they are not): no image in
    common, or a share under shared_images."""
    threshold = limits["shared_images"]
    if pairs is None:
        return [skipped("shared_images", None, threshold, NO_BASELINE)], ""
    why = f"the audits share {pairs.shared} of {pairs.images} images" + (
        f" ({pairs.unshared_content} more hold other content under the same id)" if pairs.unshared_content else "")
    result = judge("shared_images", None, pairs.shared / pairs.images if pairs.images else None, threshold,
                   pairs.not_shared, why)
    too_few = not pairs.shared or (threshold is not False and result.status == FAIL)
    return [result] if threshold is not False else [], why if too_few else ""


# --- drift between the maps of the images both audits hold ------------------------------------

def ndcg(relevance: np.ndarray, ranking_scores: np.ndarray) -> float:
    """nDCG of the baseline's attributions ranked by the audit's, as SageMaker Clarify's
    attribution-drift monitor computes it (https://docs.aws.amazon.com/sagemaker/latest/dg/
    clarify-model-monitor-feature-attribution-drift.html): with a(f) the baseline's attribution of
    feature f, F' the features sorted by the new attributions and F by the baseline's,
    DCG = sum_i a(F'_i) / log2(i + 1), iDCG = sum_i a(F_i) / log2(i + 1), nDCG = DCG / iDCG
    (1 = same order; Clarify alerts below 0.9). Features are pixels and attributions the class's
    mean |map| (Clarify's default global aggregation, mean_abs). Ties in the new attributions
    share their gain (as sklearn.metrics.ndcg_score), so a constant map earns no order."""
    a = np.asarray(relevance, dtype=np.float64).ravel()
    s = np.asarray(ranking_scores, dtype=np.float64).ravel()
    discount = 1.0 / np.log2(np.arange(2, a.size + 2))
    ideal = float(np.sort(a)[::-1] @ discount)
    if ideal <= 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    sorted_scores, gains = s[order], a[order]
    # average the gain over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sums = np.add.reduceat(gains, starts)
    sizes = np.diff(np.r_[starts, a.size])
    tied_gains = np.repeat(sums / sizes, sizes)
    return float(tied_gains @ discount / ideal)


@dataclasses.dataclass
class Drift:
    """Per method: the per-image rank correlations and top-k overlaps (arrays, a chunk's at a time),
    their worst images (for nDCG, per class by rank correlation), and per class the sums of |map|
    of each audit (class = the class each audit explained)."""

    values: dict[tuple[str, str], list[np.ndarray]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    worst: dict[tuple[str, str], Lowest] = dataclasses.field(default_factory=lambda: defaultdict(Lowest))
    worst_in_class: dict[tuple[str, int], Lowest] = dataclasses.field(default_factory=lambda: defaultdict(Lowest))
    both_constant: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    pairs: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    sums: dict[tuple[str, int, str], list] = dataclasses.field(default_factory=dict)  # (method, class, side)

    def add(self, method: str, ids: pa.Array, targets: list, rho: np.ndarray, overlap: np.ndarray) -> None:
        for name, values in (("rank_correlation", rho), ("top_k_overlap", overlap)):
            self.values[(method, name)].append(values)
            self.worst[(method, name)].add(values, ids)
        targets = np.asarray([t if isinstance(t, int) else -1 for t in targets])
        for target in set(targets.tolist()) - {-1}:
            mine = targets == target
            self.worst_in_class[(method, target)].add(rho[mine], ids.filter(pa.array(mine)))

    def statistic(self, method: str, name: str) -> np.ndarray:
        return np.concatenate(self.values[(method, name)]) if self.values[(method, name)] else np.zeros(0)

    def add_class_maps(self, method: str, side: str, targets: list, maps: np.ndarray) -> None:
        for target in set(targets):
            if not isinstance(target, int):
                continue
            picked = np.abs(maps[[t == target for t in targets]]).astype(np.float64)
            entry = self.sums.setdefault((method, target, side), [np.zeros(maps.shape[1:]), 0])
            if entry[0].shape == picked.shape[1:]:  # a class's maps of another size are left out
                entry[0] += picked.sum(axis=0)
                entry[1] += len(picked)

    def class_ndcg(self, method: str) -> dict[int, float]:
        out = {}
        for (m, target, side), (total, n) in self.sums.items():
            other = self.sums.get((m, target, "baseline"))
            if m != method or side != "audit" or other is None or other[0].shape != total.shape or not n:
                continue
            out[target] = ndcg(other[0] / other[1], total / n)
        return out


def drift_chunks(rows: pa.Table, budget: int, by_class: bool = False) -> Iterator[tuple[Any, dict[tuple, tuple]]]:
    """The joined rows whose maps have one size on both sides, as diff's chunks (one method and
    shape, image ids in order, about ``budget`` bytes of maps), each with its images' targets
    (audit's, baseline's) by chunk key (image id, the chunk's target of it or None). ``by_class``:
    a chunk names each map's class too (rows paired by class). Only a chunk's ids become Python
    objects."""
    from saliency_audit.pipelines.reporting.diff import Chunk
    same = rows.filter(pc.and_(pc.and_(pc.equal(rows["height"], rows["height_b"]),
                                       pc.equal(rows["width"], rows["width_b"])),
                               pc.and_(pc.greater(rows["height"], 0), pc.greater(rows["width"], 0))))
    shapes = same.group_by(["method", "height", "width"], use_threads=False).aggregate([]).to_pylist()
    for shape in sorted(shapes, key=lambda s: (s["method"], s["height"], s["width"])):
        method, height, width = shape["method"], shape["height"], shape["width"]
        group = same.filter(pc.and_(pc.equal(same["method"], method), pc.and_(
            pc.equal(same["height"], height), pc.equal(same["width"], width)))).sort_by([("image_id", "ascending"),
                                                                                         ("target", "ascending")])
        per_chunk = max(1, budget // (4 * height * width))
        for start in range(0, group.num_rows, per_chunk):
            part = group.slice(start, per_chunk)
            ids, classes = part["image_id"].to_pylist(), part["target"].to_pylist()
            chunk = Chunk(method, height, width, ids, classes if by_class else None)
            yield chunk, dict(zip(chunk.keys(), zip(classes, part["target_b"].to_pylist())))


STATS_MAPS = 256  # maps ranked at once by the drift statistics


def drift_statistics(maps_a: np.ndarray, maps_b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, Spearman's rho and the top-k overlap of the two audits' maps (the diff's code),
    STATS_MAPS maps at a time: the work arrays (ranks, sort indices, float64 copies) are tens of
    times the maps they rank."""
    import torch

    from saliency_audit.explainers.metrics import spearman_rank_correlation
    from saliency_audit.pipelines.reporting.diff import top_k_overlap
    rho, overlap = [], []
    for start in range(0, len(maps_a), STATS_MAPS):
        a, b = (torch.from_numpy(maps[start:start + STATS_MAPS]) for maps in (maps_a, maps_b))
        rho.append(spearman_rank_correlation(a, b).numpy().astype(np.float64))
        overlap.append(top_k_overlap(a, b, k).numpy().astype(np.float64))
    return np.concatenate(rho), np.concatenate(overlap)


def measure_drift(pairs: Pairs, audit: Side, baseline: Side, top_k: float) -> Drift:
    """Streams the maps of the shared (image, method) pairs a chunk at a time with the diff's
    reader and statistics (saliency_audit.pipelines.reporting.diff)."""
    from saliency_audit.pipelines.reporting.diff import MAP_BUDGET, MapReader, pixels_for, read_paired
    targets: dict[str, tuple] = {}

    def chunks():  # read_paired asks for the next chunk once the last one is used: its targets stay until then
        for chunk, chunk_targets in drift_chunks(pairs.rows, MAP_BUDGET, pairs.by_class):
            targets.clear()
            targets.update(chunk_targets)
            yield chunk

    drift = Drift()
    readers = MapReader(audit.audit, MAP_BUDGET), MapReader(baseline.audit, MAP_BUDGET)
    for chunk, maps_a, maps_b in read_paired(*readers, chunks()):
        rho, overlap = drift_statistics(maps_a, maps_b, pixels_for(top_k, chunk.height * chunk.width))
        # a constant map has no ranking: a map gone dead on one side is no correlation (dropping it
        # would let a method that dies on most images pass); dead on both sides: no verdict
        no_rank = ~np.isfinite(rho)
        both_dead = no_rank & _constant(maps_a) & _constant(maps_b)
        kept = ~both_dead
        ids = pa.array(chunk.ids, pa.string()).filter(pa.array(kept))
        drift.both_constant[chunk.method] += int(both_dead.sum())
        keys = chunk.keys()
        drift.add(chunk.method, ids, [targets[i][0] for i, k in zip(keys, kept) if k],
                  np.where(no_rank, 0.0, rho)[kept], overlap[kept])
        drift.add_class_maps(chunk.method, "audit", [targets[i][0] for i in keys], maps_a)
        drift.add_class_maps(chunk.method, "baseline", [targets[i][1] for i in keys], maps_b)
        drift.pairs[chunk.method] += len(chunk.ids)
    return drift


def _constant(maps: np.ndarray) -> np.ndarray:
    """Per map: True when every pixel holds the same value (no ranking)."""
    flat = maps.reshape(len(maps), -1)
    return (flat == flat[:, :1]).all(axis=1)


def drift_gates(audit: Side, baseline: Side | None, pairs: Pairs | None, limits: dict) -> list[Result]:
    names = [n for n in ("rank_correlation", "top_k_overlap", "ndcg") if limits[n] is not False]
    if not names:
        return []
    if pairs is None:
        return [skipped(n, None, limits[n], NO_BASELINE) for n in names]
    drift = measure_drift(pairs, audit, baseline, limits["top_k"])
    q = limits["drift_quantile"]
    out = []
    for method in audit.methods:
        if not drift.pairs.get(method):
            out += [skipped(n, method, limits[n], "no image with maps of one size in both audits") for n in names]
            continue
        dead = drift.both_constant[method]
        excluded = (f"; {dead} ({100 * dead / drift.pairs[method]:.0f}%) left out: constant in both audits"
                    if dead else "")
        for name in ("rank_correlation", "top_k_overlap"):
            if name in names:
                values = drift.statistic(method, name)
                value = float(np.quantile(values, q)) if len(values) else None
                out.append(judge(name, method, value, limits[name], drift.worst[(method, name)].ids,
                                 f"quantile {q:g} over {len(values)} of {drift.pairs[method]} shared image(s)"
                                 + excluded))
        if "ndcg" in names:
            per_class = {c: v for c, v in drift.class_ndcg(method).items() if math.isfinite(v)}
            if not per_class:
                out.append(skipped("ndcg", method, limits["ndcg"], "no class with a non-zero mean map in both audits"))
                continue
            cls = min(per_class, key=lambda c: (per_class[c], c))
            out.append(judge("ndcg", method, per_class[cls], limits["ndcg"], drift.worst_in_class[(method, cls)].ids,
                             f"lowest of {len(per_class)} class(es): class {cls}"))
    return out


# --- the verdict ------------------------------------------------------------------------------

CANNOT_JUDGE = "asked for, but cannot be judged:"


def asked_for(given: Iterable[tuple[str, float | bool]] | None) -> set[str]:
    """The gates the operator named (``--gate NAME=VALUE`` or ``[gates] NAME = ...``, on or with a
    threshold, the last value given winning). One that cannot be judged fails; a gate that is on
    only by default is skipped then."""
    return {name for name, value in dict(given or ()).items() if name in GATES and value is not False}


def smallest_map(side: Side) -> int | None:
    """The fewest pixels (height x width) of any map in the audit; None without rows."""
    least = None
    for batch in side.batches(["height", "width"]):
        pixels = pc.min(pc.multiply(pc.cast(batch["height"], pa.int64()), pc.cast(batch["width"], pa.int64()))).as_py()
        least = pixels if least is None or (pixels is not None and pixels < least) else least
    return least


def check_top_k(top_k: float, pixels: int | None) -> None:
    """top_k must leave some pixels of a map out, as the drift gates count it (diff's
    ``pixels_for``: a fraction of the pixels, rounded, or a count): at every pixel each overlap
    is 1 and the gate could never fail. A fraction close to 1 can round to every pixel too."""
    from saliency_audit.pipelines.reporting.diff import pixels_for
    if pixels is not None and pixels_for(top_k, pixels) >= pixels:
        raise GateError(f"top_k: {top_k:g} is {pixels_for(top_k, pixels)} of the {pixels} pixels of a map, every "
                        f"pixel, so top_k_overlap could never fail; give fewer than {pixels} pixels, or a "
                        f"fraction that rounds to fewer")


def evaluate(audit, baseline=None, given: Iterable[tuple[str, float | bool]] | None = None) -> dict[str, Any]:
    """The verdict of the gates on ``audit`` (an AuditDir), against ``baseline`` (an AuditDir or
    None): a dict ready for verdict.json."""
    limits = thresholds(given)
    if baseline is not None and baseline.manifest.get("run_id") == audit.manifest.get("run_id"):
        raise GateError(f"the baseline is the audit itself (run {audit.manifest.get('run_id')}); "
                        f"compare with a copy of an earlier audit, or give each run its own --output")
    mine = Side.read(audit)
    if "top_k" in dict(given or ()):  # as given: the default (a tenth) leaves pixels out of any map of 2 or more
        check_top_k(limits["top_k"], smallest_map(mine))
    theirs = Side.read(baseline) if baseline is not None else None
    pairs = pair_up(mine, theirs) if theirs is not None else None
    coverage, too_few = shared_gate(pairs, limits)
    compared = None if too_few else pairs  # the gates that compare are skipped, with too_few as the reason
    steps: list[tuple[str, Callable[[], list[Result]]]] = [
        ("shared_images", lambda: coverage),
        ("accuracy_drop", lambda: accuracy_gate(compared, limits)),
        ("error_rate", lambda: error_gate(mine, limits)),
        ("deletion", lambda: faithfulness_gates(mine, compared, limits)),
        ("sanity", lambda: sanity_gates(mine, limits)),
        ("drift", lambda: drift_gates(mine, theirs, compared, limits)),
        ("findings", lambda: findings_gates(mine, limits)),
    ]
    results: list[Result] = []
    for name, step in steps:
        if name in GATES and limits[name] is False:
            continue  # turned off
        results += step()
    asked = asked_for(given)
    for name in sorted(asked - {r.name for r in results}):  # asked for, yet no result at all: no method it applies to
        results.append(Result(name, None, None, _number_or_none(limits[name]), FAIL, [],
                              f"{CANNOT_JUDGE} no method of the audit to judge (control maps such as random and "
                              f"sobel are the levels to beat, not judged)"))
    for r in results:
        if too_few and r.name in COMPARING and r.reason == NO_BASELINE:
            r.reason = too_few
        if r.status == SKIPPED and r.name in asked:
            r.status, r.reason = FAIL, f"{CANNOT_JUDGE} {r.reason}"
    gates = [r.as_dict() for r in results]
    failed = sorted({g["name"] for g in gates if g["status"] == FAIL})
    return {
        "status": FAIL if failed else PASS,
        "failed": failed,
        "asked": sorted(asked),
        "audit": {"path": audit.path, "run_id": audit.manifest.get("run_id")},
        "baseline": None if baseline is None else {"path": baseline.path, "run_id": baseline.manifest.get("run_id")},
        "settings": {name: limits[name] for name in SETTINGS},
        "unshared_content": None if pairs is None or not pairs.by_content else
        {"images": pairs.unshared_content, "examples": pairs.unshared_examples},
        "gates": gates,
    }


def _damaged_file(error: BaseException, output: str, baseline: str | None,
                  storage_options: dict | None) -> BaseException:
    """Why the gates could not be evaluated, naming the damaged file where one is: a read that
    fails in the middle of the gates (a file damaged after the run's checks) names none, so the
    audit and the baseline are read whole to find it. ``error`` when none is found."""
    for path, what in ((baseline, "baseline"), (output, "audit")):
        if path is None:
            continue
        try:
            open_audit(path, storage_options, what, deep=True)
        except (ValueError, OSError) as found:
            return found
        except Exception:  # noqa: BLE001, S112 - the diagnosis must not hide the error it explains
            continue
    return error


def _run_id(path: str, storage_options: dict | None) -> str | None:
    """The run id an audit's manifest names, or None where it cannot be read."""
    try:
        run_id = json.loads(storage.read_bytes(storage.join(path, "manifest.json"), storage_options)).get("run_id")
    except Exception:  # noqa: BLE001 - whatever makes it unreadable, there is no run id to name
        return None
    return run_id if isinstance(run_id, str) else None


def unjudged(audit: dict, baseline: str | None, given, error: BaseException) -> dict[str, Any]:
    """The verdict of a run whose gates could not be evaluated: a failed check, with the reason."""
    return {"status": FAIL, "failed": [], "asked": sorted(asked_for(given)),
            "error": redact(" ".join(f"{type(error).__name__}: {error}".split()))[:300],
            "audit": audit, "baseline": None if baseline is None else {"path": baseline, "run_id": None},
            "settings": None, "unshared_content": None, "gates": []}


def open_audit(path: str, storage_options: dict | None, what: str, deep: bool = False):
    """An AuditDir whose files the gates can read, or ValueError in one line naming ``what`` when
    the path is not a published audit or its files are damaged (``check_files``; ``deep``: every
    value read, not only the footers)."""
    from saliency_audit.pipelines.reporting.audit_dir import AuditDir
    try:
        audit = AuditDir(path, storage_options)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no manifest.json; not the output of a finished run") from None
    except ValueError as e:  # JSON that does not parse
        raise ValueError(f"{what} {path}: unreadable manifest.json ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(audit.manifest, dict) or not isinstance(audit.manifest.get("run_id"), str):
        raise ValueError(f"{what} {path}: manifest.json is not an audit's manifest (no run_id)")
    check_files(audit, what, deep)
    return audit


# The columns the gates cannot do without, per output (the others they read are optional).
NEEDED_COLUMNS = {"saliency": ("image_id", "method", "height", "width", "saliency")}


def check_files(audit, what: str, deep: bool = False) -> None:
    """Every file the manifest names (or, for older manifests, each output folder holds) exists and
    is Parquet with the columns the gates need: one footer read per file, no rows, so a damaged
    audit or baseline fails in seconds, before a run starts, not after it is published.

    ``deep``: every value of every file is read too (streamed, a batch of about MAP_BATCH_BYTES at a
    time, so memory stays flat), so a file damaged in the middle, its footer intact, fails here,
    named, before any work (a run's --baseline) or instead of a verdict (``check``): the gates read
    maps, scalars, errors, sanity and findings rows, and a pass must never rest on a page that was
    never read."""
    from saliency_audit.pipelines.reporting.audit_dir import MAP_BATCH_BYTES, rows_for
    for name in publication.OUTPUTS:
        for url in audit.files(name):
            relative = url.removeprefix(audit.path.rstrip("/") + "/")
            try:
                fs, path = storage.filesystem(url, audit.storage_options)
                with fs.open(path, "rb") as f:
                    parquet = pq.ParquetFile(f)
                    columns = parquet.schema_arrow.names
                    batches = parquet.iter_batches(batch_size=rows_for(parquet.metadata, MAP_BATCH_BYTES),
                                                   use_threads=False) if deep else ()
                    for _ in batches:
                        pass
            except FileNotFoundError:
                raise ValueError(f"{what} {audit.path}: {relative} is missing (its manifest.json names it)") from None
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{what} {audit.path}: {relative} is not readable Parquet "
                                 f"({' '.join(str(e).split())[:120]})") from None
            missing = [c for c in NEEDED_COLUMNS.get(name, ()) if c not in columns]
            if missing:
                raise ValueError(f"{what} {audit.path}: {relative} lacks column(s) {', '.join(missing)}")


def same_place(a: str, b: str) -> bool:
    """Whether two audit paths name one folder: local paths resolved (links, '..', a trailing
    slash), URLs compared as text without the trailing slash."""
    def normal(path: str) -> str:
        path = storage.join(str(path)).removeprefix("file://")
        return path if "://" in path else os.path.realpath(path)
    return normal(a) == normal(b)


def write_verdict(verdict: dict, url: str, storage_options: dict | None) -> None:
    storage.write_json_atomic(url, verdict, storage_options)


def summary_lines(verdict: dict) -> list[str]:
    """One line per gate that failed or was skipped, and the overall status, for the terminal."""
    lines = [f"gates could not be evaluated: {verdict['error']}"] if verdict.get("error") else []
    unshared = verdict.get("unshared_content")
    if unshared and unshared["images"]:
        lines.append(f"unshared content: {unshared['images']} image(s) of the audit are other images in the baseline "
                     f"under the same id, not compared (e.g. {', '.join(unshared['examples'])})")
    for g in verdict["gates"]:
        if g["status"] == PASS:
            continue
        where = f"{g['name']}" + (f"[{g['method']}]" if g["method"] else "")
        if g["status"] == FAIL and g["value"] is None:
            lines.append(f"gate {where} FAILED: {g['reason']}")
        elif g["status"] == FAIL:
            relation = "above the maximum" if g["bound"] == "max" else "below the minimum"
            lines.append(f"gate {where} FAILED: {g['value']:.4g} {relation} {g['threshold']:g}; worst: "
                         f"{', '.join(g['worst_images']) or '-'}")
        else:
            lines.append(f"gate {where} skipped: {g['reason']}")
    held = sum(g["status"] == PASS for g in verdict["gates"])
    lines.append(f"verdict: {verdict['status']} ({held} held, {len(verdict['failed'])} gate(s) failed: "
                 f"{', '.join(verdict['failed']) or 'none'})" if not verdict.get("error") else
                 f"verdict: {verdict['status']} (the gates could not be evaluated)")
    return lines


def check(audit_path: str, baseline_path: str | None, given, verdict_url: str | None,
          storage_options: dict | None, manifest: dict | None = None) -> tuple[dict, str]:
    """Evaluate and write the verdict; returns it and where it went. ``manifest``: the run's own,
    so a run judges itself even if another run of the same output publishes meanwhile."""
    deep = manifest is None  # check: every value read (a run's --baseline was read whole at plan)
    audit = open_audit(audit_path, storage_options, "audit", deep)
    if manifest is not None:
        audit.manifest = manifest
    baseline = open_audit(baseline_path, storage_options, "baseline", deep) if baseline_path else None
    verdict = evaluate(audit, baseline, given)
    url = verdict_url or storage.join(audit_path, VERDICT)
    write_verdict(verdict, url, storage_options)
    return verdict, url


def gated(args) -> bool:
    """Whether a run names a gate or a baseline: it then writes a verdict next to its manifest."""
    return bool(getattr(args, "gates", None) or getattr(args, "baseline", None))


def decide(manifest: dict, args, storage_options: dict | None) -> int:
    """The end of ``run``: when the invocation names a gate or a baseline, the gates on the
    published run; the verdict goes next to the manifest. 0 all hold (or no gates), 1 one fails
    or the gates could not be evaluated (the run is published all the same)."""
    return judge_run(manifest, args, storage_options)[0]


def judge_run(manifest: dict, args, storage_options: dict | None) -> tuple[int, dict | None]:
    """``decide``'s exit code and the verdict (None without gates).

    Which verdict belongs to which run: the manifest says whether its run writes one (``verdict``:
    "verdict.json" or null), publishing removes the previous run's verdict.json before it puts the
    pointer (saliency_audit.transforms.io.publication.commit), and every verdict names its run (``audit.run_id``).
    Object stores have no atomic pair of puts, so between the pointer and this verdict, or when
    runs of one --output race, verdict.json may be missing or of another run: readers (report,
    schedulers) take it only when its audit.run_id is the manifest's run_id."""
    if not gated(args):
        return 0, None
    given, baseline = getattr(args, "gates", None), getattr(args, "baseline", None)
    output = manifest["options"]["output"]
    try:
        verdict, url = check(output, baseline, given, None, storage_options, manifest)
    except Exception as e:  # published all the same: a check that cannot be made fails, it is no usage error
        verdict, url = unjudged({"path": output, "run_id": manifest["run_id"]}, baseline, given,
                                _damaged_file(e, output, baseline, storage_options)), storage.join(output, VERDICT)
        if verdict["baseline"] is not None:
            verdict["baseline"]["run_id"] = _run_id(baseline, storage_options)
        write_verdict(verdict, url, storage_options)
    for line in summary_lines(verdict):
        print(line)
    print(f"verdict: {url}")
    return (FAILED_CHECK if verdict["status"] == FAIL else 0), verdict
