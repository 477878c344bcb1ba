"""Gates: thresholds that decide whether an audit is acceptable, alone or against a baseline audit.

``saliency-audit check AUDIT [--baseline PREVIOUS] [--gate NAME=VALUE ...]`` and, when a run names
a gate or a baseline (``[gates]`` / ``[baseline]`` in its spec), the end of ``run`` evaluate every
gate of GATES at its threshold (its default unless given; ``NAME=off`` turns one off) and write a
verdict (``verdict.json``): per gate and method the value, the threshold, ``pass``, ``fail`` or
``skipped`` (with the reason: no baseline, no labels, metrics off, not computed), and the images
that weigh most against it. Exit code 0 when no gate fails, 1 when one does, 2 for usage errors.

Drift gates compare the maps of the (image, method) pairs both audits hold, streamed a chunk at
a time with the diff's reader (``pipelines.reporting.diff``): memory holds one chunk of maps, the
per-image scalars and one mean map per (method, class), whatever the size of the audits.
docs/gates.md describes each gate.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np

from pipelines.findings import SCORE_THRESHOLD

OFF, ON = "off", "on"
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
WORST = 5  # images named per gate
VERDICT = "verdict.json"


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


def gate_argument(text: str) -> tuple[str, float | bool]:
    """``--gate``'s argparse type."""
    try:
        return parse_gate(text)
    except GateError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_gate_arguments(parser: argparse.ArgumentParser) -> None:
    """--baseline and --gate, for run (read from [baseline] and [gates] in a spec) and check."""
    parser.add_argument("--baseline", metavar="PREVIOUS", help="a published audit to compare with (its directory)")
    parser.add_argument("--gate", dest="gates", action="append", type=gate_argument, metavar="NAME=VALUE",
                        help="a gate's threshold, or NAME=off; repeatable (docs/gates.md)")


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

_SCALARS = ["image_id", "method", "label", "target", "predicted", "height", "width", "score",
            "deletion_auc", "deletion_auc_random"]


@dataclasses.dataclass
class Side:
    """One audit and its per-(image, method) scalar rows (no maps)."""

    audit: Any  # AuditDir
    rows: dict[tuple[str, str], dict]

    @classmethod
    def read(cls, audit) -> "Side":
        return cls(audit, {(r["image_id"], r["method"]): r for r in audit.rows("saliency", _SCALARS)})

    @property
    def methods(self) -> list[str]:
        """The methods to judge: not the control maps (random, sobel), which ignore the model by
        design and would fail every quality gate; they are the levels the others must beat."""
        return [m for m in dict.fromkeys([*self.audit.methods, *sorted({m for _, m in self.rows})])
                if not self.audit.control(m)]

    def column(self, method: str, name: str, ids: Iterable[str] | None = None) -> dict[str, float]:
        """image_id -> the column's finite values for one method (NaN, null, non-numbers left out)."""
        keys = ((i, method) for i in ids) if ids is not None else (k for k in self.rows if k[1] == method)
        out = {}
        for key in keys:
            value = self.rows.get(key, {}).get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[key[0]] = float(value)
        return out

    def predictions(self) -> dict[str, tuple[int, int]]:
        """image_id -> (label, predicted) for labelled images (one row per image: every method's
        row carries the same prediction)."""
        out = {}
        for (image_id, _), row in self.rows.items():
            label, predicted = row.get("label"), row.get("predicted")
            if isinstance(label, int) and label >= 0 and isinstance(predicted, int):
                out.setdefault(image_id, (label, predicted))
        return out


# --- the gates ------------------------------------------------------------------------------------

def accuracy_gate(audit: Side, baseline: Side | None, limits: dict) -> list[Result]:
    name, threshold = "accuracy_drop", limits["accuracy_drop"]
    if baseline is None:
        return [skipped(name, None, threshold, NO_BASELINE)]
    mine, theirs = audit.predictions(), baseline.predictions()
    # the same images on both sides, or the drop compares two different samples
    mine, theirs = ({i: p[i] for i in mine.keys() & theirs.keys()} for p in (mine, theirs))
    if not mine:
        return [skipped(name, None, threshold, "no labelled image in both audits")]

    def accuracy(p: dict) -> float:
        return 100.0 * sum(label == predicted for label, predicted in p.values()) / len(p)

    # worst: images the baseline got right and the audit gets wrong, then the audit's other mistakes
    wrong = sorted(i for i, (label, predicted) in mine.items() if label != predicted)
    newly = [i for i in wrong if i in theirs and theirs[i][0] == theirs[i][1]]
    worst = newly + [i for i in wrong if i not in newly]
    return [judge(name, None, accuracy(theirs) - accuracy(mine), threshold, worst,
                  f"accuracy {accuracy(mine):.2f}%, baseline {accuracy(theirs):.2f}%, on the {len(mine)} "
                  f"labelled image(s) both hold")]


def error_gate(audit: Side, limits: dict) -> list[Result]:
    name, threshold = "error_rate", limits["error_rate"]
    counts = audit.audit.manifest.get("counts")
    if not isinstance(counts, dict) or not counts:
        return [skipped(name, None, threshold, "the manifest has no counts")]
    errors = audit.audit.rows("errors", ["image_id", "method"])
    out = []
    for method, c in sorted(counts.items()):
        read, failed, skip = (c.get("read"), c.get("errors"), c.get("skipped", 0)) if isinstance(c, dict) \
            else (None, None, None)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (read, failed, skip)) \
                or read <= skip:
            out.append(skipped(name, method, threshold, f"counts of {method} unreadable or nothing to explain: "
                                                        f"{c!r}"[:200]))
            continue
        tried = read - skip  # an incremental run's skipped pairs were explained by an earlier run
        worst = sorted({str(e["image_id"]) for e in errors if e.get("method") in (None, method)})
        out.append(judge(name, method, failed / tried, threshold, worst,
                         f"{failed} error(s) of {tried} " + ("read" if not skip else f"to explain ({skip} skipped)")))
    return out


def faithfulness_gates(audit: Side, baseline: Side | None, limits: dict) -> list[Result]:
    out = []
    for method in audit.methods:
        deletion = audit.column(method, "deletion_auc")
        random = audit.column(method, "deletion_auc_random")
        if not deletion:
            why = "no deletion AUC (metrics off)"
            out += [skipped(n, method, limits[n], why) for n in ("deletion_vs_random", "deletion_rise")
                    if limits[n] is not False]
            continue
        if limits["deletion_vs_random"] is not False:
            both = sorted(deletion.keys() & random.keys())
            denominator = sum(random[i] for i in both)
            ratio = sum(deletion[i] for i in both) / denominator if both and denominator > 0 else None
            worst = sorted(both, key=lambda i: (-(deletion[i] - random[i]), i))
            out.append(judge("deletion_vs_random", method, ratio, limits["deletion_vs_random"], worst,
                             f"mean deletion AUC over the random order's, {len(both)} image(s)"))
        if limits["deletion_rise"] is not False:
            out.append(_deletion_rise(method, deletion, baseline, limits["deletion_rise"]))
    return out


def _deletion_rise(method: str, deletion: dict[str, float], baseline: Side | None, threshold: float) -> Result:
    if baseline is None:
        return skipped("deletion_rise", method, threshold, NO_BASELINE)
    before = baseline.column(method, "deletion_auc", deletion)
    shared = sorted(before)
    if not shared:
        return skipped("deletion_rise", method, threshold, "no image with a deletion AUC in both audits")
    rise = float(np.mean([deletion[i] - before[i] for i in shared]))
    worst = sorted(shared, key=lambda i: (-(deletion[i] - before[i]), i))
    return judge("deletion_rise", method, rise, threshold, worst, f"on {len(shared)} shared image(s)")


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


def shared_gate(audit: Side, baseline: Side | None, limits: dict) -> tuple[list[Result], str]:
    """The share of the audit's images the baseline holds too, and why the gates that compare
    are skipped ("" when they are not): no image in common, or a share under shared_images."""
    threshold = limits["shared_images"]
    if baseline is None:
        return [skipped("shared_images", None, threshold, NO_BASELINE)], ""
    ids, theirs = {i for i, _ in audit.rows}, {i for i, _ in baseline.rows}
    shared = len(ids & theirs)
    why = f"the audits share {shared} of {len(ids)} images"
    result = judge("shared_images", None, shared / len(ids) if ids else None, threshold, sorted(ids - theirs), why)
    too_few = not shared or (threshold is not False and result.status == FAIL)
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
    """Per method: per-image rank correlation and top-k overlap, and per class the sums of |map|
    of each audit (class = the class each audit explained)."""

    rho: dict[str, dict[str, float]] = dataclasses.field(default_factory=lambda: defaultdict(dict))
    both_constant: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    overlap: dict[str, dict[str, float]] = dataclasses.field(default_factory=lambda: defaultdict(dict))
    sums: dict[tuple[str, int, str], list] = dataclasses.field(default_factory=dict)  # (method, class, side)

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


def measure_drift(audit: Side, baseline: Side, top_k: float) -> tuple[Drift, dict[str, int]]:
    """Streams the maps of the shared (image, method) pairs a chunk at a time (diff's reader)."""
    from pipelines.reporting.diff import MAP_BUDGET, compare, paired_maps
    def shape(row: dict) -> tuple:
        return row.get("height"), row.get("width")

    shared = [(i, m, r["height"], r["width"]) for (i, m), r in audit.rows.items()
              if (i, m) in baseline.rows and all(isinstance(v, int) for v in shape(r))
              and shape(r) == shape(baseline.rows[(i, m)])]
    drift, pairs = Drift(), defaultdict(int)
    for chunk, maps_a, maps_b in paired_maps(audit.audit, baseline.audit, shared, MAP_BUDGET):
        rows_a = [audit.rows[(i, chunk.method)] for i in chunk.ids]
        rows_b = [baseline.rows[(i, chunk.method)] for i in chunk.ids]
        compared = compare(chunk, maps_a, maps_b, rows_a, rows_b, top_k)
        dead_a, dead_b = _constant(maps_a), _constant(maps_b)
        for image_id, rho, overlap, a, b in zip(chunk.ids, compared.column("rank_correlation").to_pylist(),
                                                compared.column("top_k_overlap").to_pylist(), dead_a, dead_b):
            if rho is None or not math.isfinite(rho):
                # a constant map has no ranking: a map gone dead on one side is no correlation
                # (dropping it would let a method that dies on most images pass); both dead: no verdict
                if a and b:
                    drift.both_constant[chunk.method] += 1
                    continue
                rho = 0.0
            drift.rho[chunk.method][image_id] = rho
            drift.overlap[chunk.method][image_id] = overlap
        drift.add_class_maps(chunk.method, "audit", [r.get("target") for r in rows_a], maps_a)
        drift.add_class_maps(chunk.method, "baseline", [r.get("target") for r in rows_b], maps_b)
        pairs[chunk.method] += len(chunk.ids)
    return drift, pairs


def _constant(maps: np.ndarray) -> np.ndarray:
    """Per map: True when every pixel holds the same value (no ranking)."""
    flat = maps.reshape(len(maps), -1)
    return (flat == flat[:, :1]).all(axis=1)


def drift_gates(audit: Side, baseline: Side | None, limits: dict) -> list[Result]:
    names = [n for n in ("rank_correlation", "top_k_overlap", "ndcg") if limits[n] is not False]
    if not names:
        return []
    if baseline is None:
        return [skipped(n, None, limits[n], NO_BASELINE) for n in names]
    drift, pairs = measure_drift(audit, baseline, limits["top_k"])
    q = limits["drift_quantile"]
    out = []
    for method in audit.methods:
        if not pairs.get(method):
            out += [skipped(n, method, limits[n], "no image with maps of one size in both audits") for n in names]
            continue
        rho = drift.rho[method]
        dead = drift.both_constant[method]
        excluded = f"; {dead} ({100 * dead / pairs[method]:.0f}%) left out: constant in both audits" if dead else ""
        by_rho = sorted(rho, key=lambda i: (rho[i], i))
        for name, values in (("rank_correlation", rho), ("top_k_overlap", drift.overlap[method])):
            if name in names:
                value = float(np.quantile(list(values.values()), q)) if values else None
                worst = sorted(values, key=lambda i: (values[i], i))
                out.append(judge(name, method, value, limits[name], worst,
                                 f"quantile {q:g} over {len(values)} of {pairs[method]} shared image(s)"
                                 + excluded))
        if "ndcg" in names:
            per_class = {c: v for c, v in drift.class_ndcg(method).items() if math.isfinite(v)}
            if not per_class:
                out.append(skipped("ndcg", method, limits["ndcg"], "no class with a non-zero mean map in both audits"))
                continue
            cls = min(per_class, key=lambda c: (per_class[c], c))
            worst = [i for i in by_rho if audit.rows[(i, method)].get("target") == cls]
            out.append(judge("ndcg", method, per_class[cls], limits["ndcg"], worst,
                             f"lowest of {len(per_class)} class(es): class {cls}"))
    return out


# --- the verdict ------------------------------------------------------------------------------

def evaluate(audit, baseline=None, given: Iterable[tuple[str, float | bool]] | None = None) -> dict[str, Any]:
    """The verdict of the gates on ``audit`` (an AuditDir), against ``baseline`` (an AuditDir or
    None): a dict ready for verdict.json."""
    limits = thresholds(given)
    if baseline is not None and baseline.manifest.get("run_id") == audit.manifest.get("run_id"):
        raise GateError(f"the baseline is the audit itself (run {audit.manifest.get('run_id')}); "
                        f"compare with a copy of an earlier audit, or give each run its own --output")
    mine = Side.read(audit)
    theirs = Side.read(baseline) if baseline is not None else None
    coverage, too_few = shared_gate(mine, theirs, limits)
    if too_few:
        theirs = None  # the gates that compare are skipped, with too_few as the reason
    steps: list[tuple[str, Callable[[], list[Result]]]] = [
        ("shared_images", lambda: coverage),
        ("accuracy_drop", lambda: accuracy_gate(mine, theirs, limits)),
        ("error_rate", lambda: error_gate(mine, limits)),
        ("deletion", lambda: faithfulness_gates(mine, theirs, limits)),
        ("sanity", lambda: sanity_gates(mine, limits)),
        ("drift", lambda: drift_gates(mine, theirs, limits)),
        ("findings", lambda: findings_gates(mine, limits)),
    ]
    results: list[Result] = []
    for name, step in steps:
        if name in GATES and limits[name] is False:
            continue  # turned off
        results += step()
    for r in results:
        if too_few and r.name in COMPARING and r.reason == NO_BASELINE:
            r.reason = too_few
    gates = [r.as_dict() for r in results]
    failed = sorted({g["name"] for g in gates if g["status"] == FAIL})
    return {
        "status": FAIL if failed else PASS,
        "failed": failed,
        "audit": {"path": audit.path, "run_id": audit.manifest.get("run_id")},
        "baseline": None if baseline is None else {"path": baseline.path, "run_id": baseline.manifest.get("run_id")},
        "settings": {name: limits[name] for name in SETTINGS},
        "gates": gates,
    }


def open_audit(path: str, storage_options: dict | None, what: str):
    """An AuditDir, or ValueError in one line naming ``what`` when the path is not a published audit."""
    from pipelines.reporting.audit_dir import AuditDir
    try:
        audit = AuditDir(path, storage_options)
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no manifest.json; not the output of a finished run") from None
    except ValueError as e:  # JSON that does not parse
        raise ValueError(f"{what} {path}: unreadable manifest.json ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(audit.manifest, dict) or not isinstance(audit.manifest.get("run_id"), str):
        raise ValueError(f"{what} {path}: manifest.json is not an audit's manifest (no run_id)")
    return audit


def same_place(a: str, b: str) -> bool:
    """Whether two audit paths name one folder: local paths resolved (links, '..', a trailing
    slash), URLs compared as text without the trailing slash."""
    from transforms import storage

    def normal(path: str) -> str:
        path = storage.join(str(path)).removeprefix("file://")
        return path if "://" in path else os.path.realpath(path)
    return normal(a) == normal(b)


def write_verdict(verdict: dict, url: str, storage_options: dict | None) -> None:
    from transforms import storage
    storage.write_json_atomic(url, verdict, storage_options)


def summary_lines(verdict: dict) -> list[str]:
    """One line per gate that failed or was skipped, and the overall status, for the terminal."""
    lines = []
    for g in verdict["gates"]:
        if g["status"] == PASS:
            continue
        where = f"{g['name']}" + (f"[{g['method']}]" if g["method"] else "")
        if g["status"] == FAIL:
            relation = "above the maximum" if g["bound"] == "max" else "below the minimum"
            lines.append(f"gate {where} FAILED: {g['value']:.4g} {relation} {g['threshold']:g}; worst: "
                         f"{', '.join(g['worst_images']) or '-'}")
        else:
            lines.append(f"gate {where} skipped: {g['reason']}")
    held = sum(g["status"] == PASS for g in verdict["gates"])
    lines.append(f"verdict: {verdict['status']} ({held} held, {len(verdict['failed'])} gate(s) failed: "
                 f"{', '.join(verdict['failed']) or 'none'})")
    return lines


def check(audit_path: str, baseline_path: str | None, given, verdict_url: str | None,
          storage_options: dict | None, manifest: dict | None = None) -> tuple[dict, str]:
    """Evaluate and write the verdict; returns it and where it went. ``manifest``: the run's own,
    so a run judges itself even if another run of the same output publishes meanwhile."""
    from transforms import storage
    audit = open_audit(audit_path, storage_options, "audit")
    if manifest is not None:
        audit.manifest = manifest
    baseline = open_audit(baseline_path, storage_options, "baseline") if baseline_path else None
    verdict = evaluate(audit, baseline, given)
    url = verdict_url or storage.join(audit_path, VERDICT)
    write_verdict(verdict, url, storage_options)
    return verdict, url


def decide(manifest: dict, args: argparse.Namespace, storage_options: dict | None) -> int:
    """The end of ``run``: when the invocation names a gate or a baseline, the gates on the
    published run; the verdict goes next to the manifest. 0 all hold (or no gates), 1 one
    fails, 2 the baseline is not an audit."""
    return judge_run(manifest, args, storage_options)[0]


def judge_run(manifest: dict, args: argparse.Namespace, storage_options: dict | None) -> tuple[int, dict | None]:
    """``decide``'s exit code and the verdict (None without gates, or when it could not be made)."""
    given, baseline = getattr(args, "gates", None), getattr(args, "baseline", None)
    if not given and not baseline:
        return 0, None
    try:
        verdict, url = check(manifest["options"]["output"], baseline, given, None, storage_options, manifest)
    except ValueError as e:
        print(f"saliency-audit: error: gates: {e}", file=sys.stderr)
        return 2, None
    for line in summary_lines(verdict):
        print(line)
    print(f"verdict: {url}")
    return (1 if verdict["status"] == FAIL else 0), verdict
