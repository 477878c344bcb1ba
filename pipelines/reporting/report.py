"""``saliency-audit report DIR --output report.html``: one self-contained page for a person
who did not run the job.

It shows the run (manifest), the gates' verdict, for an incremental audit the history's slots
and the trend of the gated statistics across them, a table of methods with their metrics,
per-class numbers, the sanity check, per-class galleries (image, map, overlay), misclassified
images, the worst and best images by faithfulness, metric distributions, ABELE's relevance
curves, rules and exemplars of the superpixel methods and abele, and the errors. Galleries hold a
bounded number of images, so the page stays a few MB whatever the size of the audit, and the rows
behind it are streamed (``saliency_audit.pipelines.reporting.aggregate``), so its memory does not grow with the
audit either.
"""
from __future__ import annotations

import html
import json
import math
import re
from collections import defaultdict

import numpy as np

from saliency_audit.explainers.core.paths import REDACTED, redact
from saliency_audit.explainers.metrics import metric_classes, metric_columns
from saliency_audit.pipelines.reporting import aggregate, render
from saliency_audit.pipelines.reporting.audit_dir import AuditDir, saliency_map
from saliency_audit.pipelines.reporting.html import Raw, details, img, markup, number, page, paragraph, table
from saliency_audit.pipelines.reporting.plots import histogram, line_chart
from saliency_audit.transforms.io import history, storage
from saliency_audit.transforms.io.progress import duration
from saliency_audit.transforms.model import targets

VERDICT = "verdict.json"  # written by saliency_audit.pipelines.checks.gates next to the manifest
FINDINGS_SHOWN = 2    # findings per method when none is flagged
FINDINGS_MAX = 12     # findings on the page at most
FINDING_IMAGES = 5    # prototype images per finding
THUMB = 84            # CSS width of a gallery image
LONGEST = 128         # stored images are shrunk to at most this many pixels a side
MAP_BATCH = 4 << 20   # decoded bytes of whole rows a gallery's scan holds
RULE_EXTRAS = ("rule", "counterfactuals", "weights", "precision", "coverage", "fidelity", "r2")
# The metric columns the methods table shows; every other metric gets a table of its own.
MAIN_TABLE = ("deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random", "gini")
METRIC_NOTES = {
    "deletion_auc": "RISE deletion AUC: the target's probability as the most salient pixels are removed "
                    "first; lower is better. The random order's value (in brackets) is the level to beat.",
    "insertion_auc": "RISE insertion AUC: the probability as the most salient pixels are pasted back first; "
                     "higher is better.",
    "gini": "Gini index of |map|: 0 = spread evenly, 1 = all on one pixel (sparsity).",
    "relevance_0": "ABELE relevance: label-flip rate as the least relevant pixels become 0 / 127 / 255, "
                   "averaged over the percentiles; lower is better.",
    "coherence_mean": "ABELE coherence: Lipschitz ratio of map change to image change against same-class "
                      "images of the batch; lower is better.",
    "stability_mean": "ABELE stability: the same ratio against salt-and-pepper copies; lower is better.",
    "road_morf_auc": "ROAD (Rong et al. 2022): the target's probability as 1-99% of the pixels are removed, most "
                     "relevant first (MoRF, lower is better) or least relevant first (LeRF, higher is better), "
                     "filled by noisy linear imputation so that the removal's shape tells the model nothing; "
                     "gap = LeRF - MoRF, higher is better. The random control's gap is the level to beat.",
    "pointing_game": "Localisation against the shards' ground truth: pointing game (the map's maximum in the "
                     "mask), relevance mass (share of positive relevance inside), relevance rank (share of the "
                     "mask-sized top pixels inside); higher is better; a random map scores the mask's area share.",
}

# The statistics the gates judge, as the history records them per method and slot, with the
# chart's y axis: from its natural floor to at least a level where the gates' defaults sit, so a
# flat line at 0 reads as 0 and a small wobble is not blown up to the chart's height.
HISTORY_STATISTICS = (("error_rate", "error rate", (0.0, 0.02)), ("deletion_auc", "mean deletion AUC", (0.0, 1.0)),
                      ("deletion_vs_random", "deletion AUC / random order's (1 = random)", (0.0, 1.0)),
                      ("findings_top", "top Clever-Hans finding score", (0.0, 0.5)),
                      ("sanity_rank_correlation", "sanity rank correlation, all layers random", (-1.0, 1.0)),
                      ("constant_share", "share of constant maps", (0.0, 0.1)))
HISTORY_SLOTS = 60     # newest slots on the page at most, so it stays small however long the schedule runs
SLOT_LABEL = 12        # longer slot names are charted as their number in the table


def metric_cost_text(entry: dict | None) -> str:
    """The manifest's metric_passes in a line: each metric's forward passes per image, and the total
    beside the methods' own."""
    if not entry:
        return "not recorded (no sample image at preflight)"
    parts = [f"{name} {cost['per_map']} per map + {cost['per_image']} per image"
             + (f" + {cost['explanations']} explanations per map" if cost["explanations"] else "")
             for name, cost in entry["passes"].items() if any(cost.values())]
    height, width = entry["image_size"]
    return ("; ".join(parts) or "none") + (f" (forward passes on {height}x{width} inputs); in all "
                                          f"{entry['forward_passes']} per image and target (the methods themselves: "
                                          f"{entry['methods_forward_passes']})")


class Thumbnails:
    """Image, map and overlay of the rows a page shows, as <img> tags with data: URIs."""

    def __init__(self, audit: AuditDir, maps: dict[tuple[str, str], dict], images: dict[str, np.ndarray]):
        self.audit, self.maps, self.images = audit, maps, images

    def _tag(self, rgb: np.ndarray, alt: str) -> Raw:
        return img(render.data_uri(render.fit(rgb, LONGEST)), alt, THUMB)

    def _size(self, image_id: str) -> tuple[int, int]:
        row = next((r for (i, _), r in self.maps.items() if i == image_id), None)
        return (row["height"], row["width"]) if row else (28, 28)

    def image(self, image_id: str) -> Raw:
        image = self.images.get(image_id)
        if image is None:
            return self._tag(render.placeholder(*self._size(image_id)), f"{image_id}: image not readable")
        return self._tag(render.as_rgb(image), image_id)

    def map(self, image_id: str, method: str) -> Raw:
        row = self.maps.get((image_id, method))
        if row is None:
            return self._tag(render.placeholder(*self._size(image_id)), f"{method} failed on {image_id}")
        return self._tag(render.colour_map(saliency_map(row), self.audit.signed(method)), f"{method} map, {image_id}")

    def overlay(self, image_id: str, method: str) -> Raw:
        row, image = self.maps.get((image_id, method)), self.images.get(image_id)
        if row is None or image is None:
            return self.map(image_id, method)
        return self._tag(render.overlay(image, saliency_map(row), self.audit.signed(method)),
                         f"{method} overlay, {image_id}")

    def pair(self, image_id: str, method: str) -> Raw:
        return markup('<span class="pair">{}{}</span>', self.map(image_id, method), self.overlay(image_id, method))


EMPTY_WARNING = 0.05   # share of maps that say nothing, above which the auditor is warned
RANDOM_WARNING = 0.9   # deletion AUC at or above this fraction of a random map's: no better than random


def _share(value) -> str:
    return "\u2013" if value is None else f"{100 * value:.0f}%" if value >= 0.01 or value == 0 else "<1%"


def method_warnings(method: str, s: dict, signed: bool, caveats: dict | None = None) -> list[str]:
    """What the auditor must know about one method's summary row ``s``: maps that point nowhere
    (with the method's own words where that is its nature, ``caveats["constant"]``), and a ranking
    no better than chance (with the reason, for unsigned maps)."""
    lines = []
    if (s.get("constant_share") or 0) > EMPTY_WARNING:
        lines.append(f"{method}: {_share(s['constant_share'])} of its maps are constant "
                     f"({_share(s.get('empty_share'))} all zero): they point nowhere."
                     + (f" {caveats['constant']}" if (caveats or {}).get("constant") else ""))
    deletion, random = s.get("mean_deletion_auc"), s.get("mean_deletion_auc_random")
    if deletion is not None and random and deletion >= RANDOM_WARNING * random:
        line = (f"{method}: mean deletion AUC {number(deletion)} is no better than a random map's "
                f"{number(random)}: its ranking of the pixels is not faithful to the model.")
        if not signed:
            line += (" Its map is unsigned: it ranks pixels that speak against the class as high as those "
                     "for it, and deletion removes the top-ranked first, so it punishes unsigned maps by "
                     "construction; compare with a signed method or variant (grad, intg, sal with "
                     "absolute false, smoothgrad's default).")
        lines.append(line)
    return lines


# Explaining may take this many times preflight's figure before the report warns: room for the tens of
# percent a timing of one call drifts by, while the misses that change a plan (batches halved, fewer
# threads, larger images) are 2 x and more.
COST_TOLERANCE = 1.5
COST_MIN_EXCESS_S = 60.0  # ... and this much longer in all: a small run's first, cold batch is no news


def cost_warnings(manifest: dict, overall: dict) -> list[str]:
    """Methods whose explanations took longer per image than preflight timed on the sample image
    (``preflight_ms_per_image``: what --dry-run prints as explain ms, the run's promise), by more than
    COST_TOLERANCE times and COST_MIN_EXCESS_S in all. Only where preflight ran on the workers' device."""
    model = manifest.get("model") or {}
    if model.get("device") != model.get("device_check"):
        return []  # timed on the launcher's CPU for workers elsewhere: no promise was made for them
    lines, taken, promised = [], 0.0, 0.0
    halved = (manifest.get("execution") or {}).get("batch_sizes_after_out_of_memory") or {}
    for method, info in (manifest.get("methods") or {}).items():
        estimate = info.get("preflight_ms_per_image")
        measured = (overall.get(method) or {}).get("mean_time_ms")
        explained = ((manifest.get("counts") or {}).get(method) or {}).get("explained") or 0
        if not estimate or measured is None or not explained:
            continue
        taken, promised = taken + measured * explained / 1000, promised + estimate * explained / 1000
        excess = (measured - estimate) * explained / 1000
        if measured > COST_TOLERANCE * estimate and excess > COST_MIN_EXCESS_S:
            # number(): the figures as the table's ms / image shows them (a fast method's 0.04 ms is not 0.0)
            lines.append(f"{method}: explaining took {number(float(measured))} ms per image, "
                         f"{number(measured / estimate)} x the {number(float(estimate))} ms preflight timed on the "
                         f"sample image (--dry-run's explain ms): {duration(excess)} longer than promised over "
                         f"{explained:,} images."
                         + (f" Its batches were cut to {halved[method]} image(s) after running out of memory."
                            if method in halved else ""))
    if lines:
        lines.append(f"In all, explaining took {duration(taken)} against the {duration(promised)} preflight's "
                     "figures promised. Usual causes: a busier machine, workers with fewer threads than preflight "
                     "had, images larger than the sample, batches halved after running out of memory.")
    return lines


def _examples(finding: dict) -> list[str]:
    """The images a finding is shown with: a cluster's prototypes, else the images that carry it
    most (a concentration has no prototypes); ids only if they are strings."""
    ids = finding.get("prototypes") or finding.get("images") or []
    return [i for i in ids if isinstance(i, str)][:FINDING_IMAGES] if isinstance(ids, list) else []


class Report:
    def __init__(self, audit: AuditDir, *, per_class: int = 3, extremes: int = 4, misclassified: int = 8):
        # Several targets per image: every section but "Other targets" shows the main request's rows,
        # one per image and method (the predicted class's by default), so nothing counts twice.
        audit = audit.main_view()
        self.audit, self.per_class = audit, per_class
        self.methods = audit.methods
        self.all_summary = audit.rows("summary")
        self.summary = targets.main_summary(self.all_summary, audit.target)
        self.overall = {s["method"]: s for s in self.summary if s["target"] is None}
        self.columns = set(audit.columns("saliency").names)
        self.picks = aggregate.pick_images(audit, self.methods, per_class=per_class, extremes=extremes,
                                           misclassified_shown=misclassified)
        self.classes = self.picks.classes
        self.image_count, self.misclassified_count = aggregate.count_images(audit)
        self.findings = self._findings()
        self.selection = {**self.picks.selection, "findings": [i for f in self.findings for i in _examples(f)]}
        self.other_targets = self._other_targets()
        self.selection["targets"] = [i for _, rows in self.other_targets for i, _ in rows]
        wanted = {i for ids in self.selection.values() for i in ids}
        self.first_row = aggregate.first_rows(audit, wanted, ["label", "predicted", "predicted_score"])
        maps = audit.map_rows(wanted)
        sources = {image_id: row["source"] for (image_id, _), row in maps.items()}
        self.thumbs = Thumbnails(audit, maps, audit.images(sources))

    def _other_targets(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """Per --target request besides the main one, its first images (by id) and their classes
        under it, in (image id, rank) order."""
        if not self.audit.several_targets:
            return []
        main = targets.main_of(self.audit.target)
        out = []
        for request in targets.summary_requests(self.audit.target):
            if request == main:
                continue
            first = aggregate.SmallestIds(self.per_class)
            view = self.audit.view(targets.request_filter(request))
            for batch in view.scan("saliency", ["image_id"]):
                first.add(batch.column("image_id"))
            ids = first.ids()
            batches = view.scan("saliency", ["target", "target_rank"], image_ids=ids) if ids else ()
            found = {(r["image_id"], r["target"], r["target_rank"]) for batch in batches for r in batch.to_pylist()}
            out.append((request, [(i, t) for i, t, _ in sorted(found, key=lambda x: (x[0], x[2] or 0, x[1]))]))
        return out

    def _findings(self) -> list[dict]:
        """The Clever-Hans findings the page shows: every flagged one, else each method's top
        FINDINGS_SHOWN (an auditor should see how close the run came to a flag)."""
        if not self.audit.files("findings"):
            return []
        rows = [r for r in self.audit.rows("findings") if isinstance(r.get("score"), float) and math.isfinite(r["score"])]
        rows.sort(key=lambda r: (-r["score"], str(r.get("method")), str(r.get("class"))))
        flagged = [r for r in rows if r.get("flagged")]
        shown = flagged or [r for m in self.methods for r in [x for x in rows if x.get("method") == m][:FINDINGS_SHOWN]]
        return sorted(shown, key=lambda r: -r["score"])[:FINDINGS_MAX]

    # ---- sections ----
    def verdict_section(self) -> str:
        """The gates' verdict.json next to the manifest (``check`` or a run with gates), if any.
        Anything in it may be of the wrong type: shown as text, never trusted as markup."""
        try:
            verdict = json.loads(storage.read_bytes(storage.join(self.audit.path, VERDICT),
                                                    self.audit.storage_options))
        except FileNotFoundError:
            return ""
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
            return markup('<p class="flag">{}</p>', f"verdict.json is unreadable: {' '.join(str(e).split())[:200]}")
        if not isinstance(verdict, dict) or not isinstance(verdict.get("gates"), list):
            return markup('<p class="flag">{}</p>', "verdict.json is not a verdict (no list of gates)")
        status = str(verdict.get("status"))
        audited = verdict.get("audit") if isinstance(verdict.get("audit"), dict) else {}
        baseline = verdict.get("baseline") if isinstance(verdict.get("baseline"), dict) else None
        if audited.get("run_id") != self.audit.manifest.get("run_id"):  # an earlier run's, or a racing run's
            return markup('<p class="flag">{}</p>', f"verdict.json is of run {audited.get('run_id')}, not of the run "
                                                     f"this report shows ({self.audit.manifest.get('run_id')}): "
                                                     f"ignored (docs/gates.md)")
        failed = verdict.get("failed") if isinstance(verdict.get("failed"), list) else []
        lead = markup('<p class="{}">{}</p>', "flag" if status != "pass" else "ok",
                      f"Gates: {status.upper()}" + (f" (failed: {', '.join(map(str, failed))})" if failed else ""))
        against = (f"against baseline run {baseline.get('run_id')} ({baseline.get('path')})" if baseline
                   else "without a baseline (the gates that compare were skipped)")
        note = paragraph(f"Verdict of run {audited.get('run_id')} {against}. A gate is skipped, not passed, when it "
                         f"cannot be evaluated; the reason says why. Worst images: the ones that weigh most against "
                         f"the gate. (docs/gates.md)")
        gates = sorted((g for g in verdict["gates"] if isinstance(g, dict)), key=lambda g: g.get("status") != "fail")
        return lead + note + table(["gate", "method", "status", "value", "bound", "threshold", "worst images",
                                    "why"], [self._gate_row(g) for g in gates])

    @staticmethod
    def _gate_row(gate: dict) -> list:
        status = str(gate.get("status"))
        worst = gate.get("worst_images")
        shown = ", ".join(map(str, worst[:5])) if isinstance(worst, list) else ""

        def value(v):
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else (None if v is None else str(v))

        return [str(gate.get("name")), str(gate.get("method") or "all"),
                markup('<span class="{}">{}</span>', "flag" if status == "fail" else "ok", status)
                if status in ("fail", "pass") else status, value(gate.get("value")),
                "at most" if gate.get("bound") == "max" else "at least" if gate.get("bound") == "min" else "",
                value(gate.get("threshold")), shown, str(gate.get("reason") or "")]

    # ---- the audit history (run --incremental) ----
    def _history_rows(self) -> tuple[list[dict], dict[str, str]]:
        """The history's rows, and its files left out: name -> why."""
        left_out: dict[str, str] = {}
        return history.read(self.audit.path, self.audit.storage_options, left_out), left_out

    def history_section(self) -> str:
        """An incremental audit's slots and, per method, the trend of the statistics the gates judge.
        The rows are other runs' writing, read back from storage: shown as text, never as markup."""
        try:
            every, left_out = self._history_rows()
        except Exception as e:  # noqa: BLE001 - whatever storage raises costs this section, never the page
            return markup('<p class="flag">{}</p>', f"The audit history is unreadable: {type(e).__name__}: "
                                                    f"{' '.join(str(e).split())[:200]}")
        note = markup('<p class="flag">{}</p>', f"{len(left_out)} file(s) in {history.FOLDER}/ are left out: "
                      + "; ".join(f"{name}: {why}" for name, why in left_out.items())) if left_out else ""
        if not every:
            return note
        first = max(len(every) - HISTORY_SLOTS, 0)
        rows = every[first:]
        numbers = range(first + 1, len(every) + 1)
        changed = [i > first and r["model"] != every[i - 1]["model"] for i, r in enumerate(every)][first:]
        current = self.audit.manifest.get("run_id")
        slots = [self._slot_cell(r, current) for r in rows]
        lead = paragraph(f"An incremental audit: its history ({history.FOLDER}/) holds {len(every)} slot(s), each a "
                         f"scheduled run that explained only what earlier slots had not explained with the same model "
                         f"and method options" + (f"; the newest {len(rows)} are shown." if first else "."))
        missing = "" if any(r["run_id"] == current for r in rows) else markup(
            '<p class="flag">{}</p>', f"The run this report shows ({current}) is not among these slots.")
        table_of_slots = table(
            ["#", "slot", "run id", "model", "records read", "shards read / skipped", "accuracy", "verdict"],
            [[k, slot, r["run_id"], markup('{} <span class="flag">model changed</span>', r["model"][:12])
              if change else r["model"][:12], r["read"], f"{number(r['shards_read'])} / {number(r['shards_skipped'])}",
              r["accuracy"], self._slot_verdict(r)] for k, slot, r, change in zip(numbers, slots, rows, changed)])
        return lead + note + missing + table_of_slots + self._history_trend(rows, list(numbers), slots)

    @staticmethod
    def _slot_cell(row: dict, current) -> Raw | str:
        return markup('<strong>{}</strong> <span class="ok">(this report)</span>', row["slot"]) \
            if row["run_id"] == current else row["slot"]

    @staticmethod
    def _slot_verdict(row: dict) -> Raw | str:
        verdict, failed = row.get("verdict"), [str(g) for g in row.get("gates_failed") or []]
        if verdict is None:
            return "none"
        shown = markup('<span class="{}">{}</span>', "ok" if verdict == "pass" else "flag", verdict)
        return markup("{}: {}", shown, ", ".join(failed)) if failed else shown

    def _history_trend(self, rows: list[dict], numbers: list[int], slots: list) -> str:
        """One chart per gated statistic (one line per method, x = slot) and the numbers; each point
        is a mean over the maps that slot's run made, not over the history."""
        per_slot = [{str(m["method"]): m for m in reversed(r["methods"] or []) if m} for r in rows]
        named = dict.fromkeys(name for stats in per_slot for name in stats)
        methods = [m for m in self.methods if m in named] + [m for m in named if m not in self.methods]
        values = {key: {m: [stats.get(m, {}).get(key) for stats in per_slot] for m in methods}
                  for key, _, _ in HISTORY_STATISTICS}
        finite = {key: [v for line in series.values() for v in line if isinstance(v, float) and math.isfinite(v)]
                  for key, series in values.items()}
        shown = [(key, title, axis) for key, title, axis in HISTORY_STATISTICS if finite[key]]
        if not shown:
            return ""
        numbers_table = table(["#", "slot", "method", *(key.replace("_", " ") for key, _, _ in shown)],
                              [[k, slot, m, *(stats.get(m, {}).get(key) for key, _, _ in shown)]
                               for k, slot, stats in zip(numbers, slots, per_slot) for m in methods if m in stats])
        if len(rows) < 2:
            return paragraph("One slot so far: the trend starts with the next.") + numbers_table
        short = all(len(r["slot"]) <= SLOT_LABEL for r in rows)
        labels = [r["slot"] if short else f"#{k}" for k, r in zip(numbers, rows)]
        charts = "".join(line_chart(labels, values[key], title=title, y_label=key.replace("_", " "),
                                    y_range=(min(low, *finite[key]), max(least_high, *finite[key])))
                         for key, title, (low, least_high) in shown)
        return (paragraph("The statistics the gates judge, per method and slot: each point is the mean over the "
                          "images that slot's run explained (a slot that explained nothing new has none). x: the "
                          + ("slots in order." if short else "slot's number (# in the tables)."))
                + f'<div class="plots">{charts}</div>' + numbers_table)

    def run_section(self) -> str:
        m = self.audit.manifest
        model = m.get("model") or {}
        counts = m.get("counts") or {}
        read = max((c.get("read", 0) for c in counts.values()), default=0)
        facts = [
            ("run id", m.get("run_id")), ("status", m.get("status")),
            ("started / finished", f"{m.get('started')} / {m.get('finished')}"),
            ("input", f"{(m.get('input') or {}).get('pattern')} ({(m.get('input') or {}).get('shards')} shard(s))"),
            ("records read", read),
            ("model", f"{model.get('model')}"
                      + (f" with weights {model.get('weights')}" if model.get("weights") else "")),
            ("model sha256", "; ".join(f"{k}: {v}" for k, v in (model.get("sha256") or {}).items())),
            ("device / classes", f"{model.get('device')} / {model.get('num_classes')}"),
            ("methods", ", ".join(self.methods)),
            ("metric cost", metric_cost_text(m.get("metric_passes"))),
            ("target", (m.get("options") or {}).get("target")),
            ("preprocessing", json.dumps(m.get("preprocessing"))),
            ("runner", m.get("runner")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())),
        ]
        options = [(name, json.dumps(info.get("options"))) for name, info in (m.get("methods") or {}).items()]
        conventions = list((m.get("conventions") or {}).items())
        return (table([], facts, "kv")
                + "<h3>Method options</h3>" + table(["method", "options"], options, "kv")
                + "<h3>Conventions</h3>" + table([], conventions, "kv")
                + paragraph(render.DISPLAY_NOTE)
                + details("The whole manifest.json", markup("<pre>{}</pre>", json.dumps(m, indent=2, default=str))))

    def _present(self, metric: str) -> bool:
        return any(s.get(f"mean_{metric}") is not None for s in self.overall.values())

    def _caveats(self, method: str) -> dict:
        """The method's words for the flags it raises by its nature (Explainer.caveats, in the manifest)."""
        return (self.audit.manifest.get("methods") or {}).get(method, {}).get("caveats") or {}

    def _flag(self, method: str, flagged: bool | None, check: str, what: str) -> Raw | str:
        """A sanity verdict; a flag comes with the method's words when it raises it by its nature."""
        if flagged is None:
            return "\u2013"
        # how many images the verdict rests on: a flag on 4 images weighs less than one on 100
        images = len((self.audit.manifest.get("sanity") or {}).get("images") or [])
        on = f" (on {images} image{'s' if images != 1 else ''})" if images else ""
        if not flagged:
            return markup('<span class="ok">passed{}</span>', on)
        words = self._caveats(method).get(check)
        return (markup('<span class="flag">FLAGGED: {}{}</span> <span class="note">{}</span>', what, on, words)
                if words else markup('<span class="flag">FLAGGED: {}{}</span>', what, on))

    def _random_logit_verdict(self, method: str, flagged: bool | None) -> Raw | str:
        return self._flag(method, flagged, "random_logit", "maps do not depend on the class")

    def _verdict(self, method: str) -> Raw | str:
        return self._flag(method, self.overall.get(method, {}).get("sanity_flagged"), "cascading",
                          "maps do not depend on the model")

    def _say_nothing(self, s: dict):
        empty, constant = s.get("empty_share"), s.get("constant_share")
        text = f"{_share(empty)} / {_share(constant)}"
        return markup('<span class="flag">{}</span>', text) if (constant or 0) > EMPTY_WARNING else text

    def _warnings(self) -> list[str]:
        """Methods whose maps say nothing for many images, or rank pixels no better than chance, or
        that took longer than preflight promised."""
        lines = [line for method in self.methods
                 for line in method_warnings(method, self.overall.get(method, {}), self.audit.signed(method),
                                             self._caveats(method))]
        lines += cost_warnings(self.audit.manifest, self.overall)
        if not lines:
            return []
        items = "".join(markup("<li>{}</li>", line) for line in lines)
        return [markup('<div class="warnings"><strong>{}</strong><ul>', "Warnings"), Raw(items), Raw("</ul></div>")]

    def findings_section(self) -> str:
        """saliency_audit.pipelines.checks.findings: attribution a class concentrates where other classes put none."""
        if not self.findings and not self.audit.files("findings"):
            return ""
        threshold = (self.audit.manifest.get("findings") or {}).get("threshold")
        flagged = [f for f in self.findings if f.get("flagged")]
        intro = paragraph(
            (f"{len(flagged)} finding(s) above the threshold {number(threshold)}: a class whose maps put their mass "
             "in one place that other classes' maps do not, consistently; look at the prototypes for a shortcut "
             "(a watermark, a border, a background) rather than the object." if flagged else
             f"No finding above the threshold {number(threshold)}; the strongest candidates per method follow.")
            + " Score = excess mass share x share of the class's maps that carry it (docs/findings.md).")
        rows = []
        for f in self.findings:
            grid = f.get("mean_map")
            height, width = f.get("map_height"), f.get("map_width")
            picture = ""
            if isinstance(grid, list) and isinstance(height, int) and isinstance(width, int) \
                    and height * width == len(grid) > 0:
                rgb = render.colour_map(np.asarray(grid, dtype=np.float64).reshape(height, width), False)
                picture = img(render.data_uri(render.resize(rgb, 8 * height, 8 * width)),
                              f"mean map of {f.get('method')} class {f.get('class')}", THUMB)
            prototypes = Raw("".join(self.thumbs.image(i) for i in _examples(f)))
            rows.append([f.get("method"), f.get("class"), f.get("kind"), number(f.get("score")),
                         "yes" if f.get("flagged") else "", f.get("region"), picture, prototypes, f.get("description")])
        return intro + table(["method", "class", "kind", "score", "flagged", "region", "mean map", "prototypes",
                              "what"], rows)

    def methods_section(self) -> str:
        counts = self.audit.manifest.get("counts") or {}
        pairs = [(a, b, label) for a, b, label in (("deletion_auc", "deletion_auc_random", "deletion AUC (random)"),
                                                   ("insertion_auc", "insertion_auc_random", "insertion AUC (random)"))
                 if self._present(a)]
        sanity = bool(self.audit.manifest.get("sanity"))
        headers = (["method", "map", "explained", "errors", "empty / constant maps", "ms / image", "accuracy"]
                   + [p[2] for p in pairs]
                   + (["gini"] if self._present("gini") else []) + (["sanity check"] if sanity else []))
        rows = []
        for method in self.methods:
            s, c = self.overall.get(method, {}), counts.get(method, {})
            kind = "signed" if self.audit.signed(method) else "unsigned"
            rows.append([method, f"{kind}, control" if self.audit.control(method) else kind, c.get("explained"),
                         c.get("errors"), self._say_nothing(s), s.get("mean_time_ms"), s.get("accuracy")]
                        + [markup("{} ({})", number(s.get(f"mean_{a}")), number(s.get(f"mean_{b}")))
                           for a, b, _ in pairs]
                        + ([s.get("mean_gini")] if self._present("gini") else [])
                        + ([self._verdict(method)] if sanity else []))
        parts = [*self._warnings(), table(headers, rows), paragraph(
            "Means over all explained images. Empty maps are all zero, constant maps one value everywhere "
            "(empty included): they point nowhere. Control maps (random: noise; sobel: the image's edges) "
            "explain nothing: they are the levels an explanation must beat.")]
        for metric in metric_classes():  # each metric whose columns the table above does not show
            present = [m for m in metric_columns(metric.name) if self._present(m) and m not in MAIN_TABLE]
            if present:
                parts += [markup("<h3>{}</h3>", metric.title or metric.name),
                          table(["method", *(m.replace("_", " ") for m in present)],
                                [[method, *(self.overall.get(method, {}).get(f"mean_{m}") for m in present)]
                                 for method in self.methods])]
        parts += [markup('<p class="note">{}</p>', text) for metric, text in METRIC_NOTES.items()
                  if self._present(metric)]
        stats = [(method, metric, s.get(f"mean_{metric}"), s.get(f"p10_{metric}"), s.get(f"median_{metric}"),
                  s.get(f"p90_{metric}")) for method, s in self.overall.items()
                 for metric in metric_columns()
                 if s.get(f"mean_{metric}") is not None]
        parts.append(details("Mean and quantiles of every metric",
                             table(["method", "metric", "mean", "p10", "median", "p90"], stats)))
        return "".join(parts)

    def classes_section(self) -> str:
        per_class = {(s["method"], s["target"]): s for s in self.summary if s["target"] is not None}
        first = self.methods[0] if self.methods else None
        metric = "deletion_auc" if self._present("deletion_auc") else None
        headers = ["class", "images", "accuracy"] + ([f"{m}: deletion AUC" for m in self.methods] if metric else [])
        rows = []
        for c in self.classes:
            base = per_class.get((first, c), {})
            row = [c, base.get("count"), base.get("accuracy")]
            if metric:
                row += [per_class.get((m, c), {}).get(f"mean_{metric}") for m in self.methods]
            rows.append(row)
        return table(headers, rows) + paragraph("Classes are the explained target (the predicted class by default); "
                                                "accuracy counts labelled images whose prediction equals the label.")

    def targets_section(self) -> str:
        """With several --target requests: each request but the main one, its maps' means per method
        (a row answering several requests counts under each) and its first images."""
        if not self.other_targets:
            return ""
        main = targets.main_of(self.audit.target)
        parts = [paragraph(
            f"--target {self.audit.target}: each image is explained once for each distinct class these requests "
            f"name. The sections above show the {main} request's maps, one per image and method; the methods "
            f"table's explained and errors count every (image, target) pair. Here each other request: the means "
            f"over the maps that answer it (a class two requests name is one map, counted under both), then its "
            f"first images, one row per class (rank 1 = the predicted class).")]
        pairs = [("deletion_auc", "deletion_auc_random", "deletion AUC (random)"),
                 ("insertion_auc", "insertion_auc_random", "insertion AUC (random)")]
        shown = [p for p in pairs if self._present(p[0])]
        for request, rows in self.other_targets:
            overall = {s["method"]: s for s in self.all_summary
                       if s.get("target_source") == request and s.get("target") is None}
            means = table(["method", "maps", "mean score", *(label for _, _, label in shown)],
                          [[m, overall.get(m, {}).get("count"), overall.get(m, {}).get("mean_score"),
                            *(markup("{} ({})", number(overall.get(m, {}).get(f"mean_{a}")),
                                     number(overall.get(m, {}).get(f"mean_{b}"))) for a, b, _ in shown)]
                           for m in self.methods])
            view = self.audit.view(targets.request_filter(request))
            ids = sorted({i for i, _ in rows})
            maps = {}
            for batch in view.scan("saliency", image_ids=ids, batch_rows=view.rows_within("saliency", MAP_BATCH)) \
                    if ids else ():
                for row in batch.to_pylist():
                    row["saliency"] = np.asarray(row["saliency"], dtype=np.float32)
                    maps[(row["image_id"], row["target"], row["method"])] = row
            gallery = []
            for image_id, cls in rows:
                thumbs = Thumbnails(self.audit, {(i, m): r for (i, c, m), r in maps.items()
                                                 if i == image_id and c == cls}, self.thumbs.images)
                rank = next((r.get("target_rank") for (i, c, _), r in maps.items() if i == image_id and c == cls), None)
                gallery.append([markup("{}<br>{}: class {} (rank {})", thumbs.image(image_id), image_id, cls, rank)]
                               + [thumbs.pair(image_id, m) for m in self.methods])
            parts.append(markup("<h3>{}</h3>", f"--target {request}") + means
                         + table(["image"] + self.methods, gallery, "gallery"))
        return "".join(parts)

    def sanity_section(self) -> str:
        sanity = self.audit.manifest.get("sanity")
        if not sanity:
            return ""
        rows = self.audit.rows("sanity")
        layers = sanity.get("layers_top_first") or []
        labels = [layers[0]] + [f"+{layer}" for layer in layers[1:]] if layers else []
        by = defaultdict(list)
        for r in rows:
            by[(r["method"], r["step"])].append(r)

        def mean(method, step, key):
            values = [r[key] for r in by[(method, step)] if r[key] is not None and math.isfinite(r[key])]
            return float(np.mean(values)) if values else None

        steps = range(1, len(layers) + 1)
        charts = "".join(line_chart(labels, {m: [mean(m, s, key) for s in steps] for m in self.methods},
                                    title=title, y_label=key.replace("_", " "), y_range=(-1.0, 1.0))
                         for key, title in (("rank_correlation", "Spearman rank correlation with the trained maps"),
                                            ("ssim", "SSIM with the trained maps")))
        verdicts = [(m, v.get("rank_correlation"), v.get("rank_correlation_abs"), v.get("ssim"),
                     markup('<span class="flag">not checked: {}</span>', v["error"]) if v.get("error")
                     else self._verdict(m), v.get("random_logit_rank_correlation"), v.get("random_logit_ssim"),
                     "\u2013" if v.get("error") else self._random_logit_verdict(m, v.get("random_logit_flagged")))
                    for m, v in ((m, (sanity.get("methods") or {}).get(m)) for m in self.methods) if v]
        return (paragraph(f"Cascading randomisation (Adebayo et al. 2018): the model's layers are re-initialised "
                          f"from the top, cumulatively, and every method explains {len(sanity.get('images') or [])} "
                          f"sample images again. A method that explains the model must produce different maps; one "
                          f"whose mean rank correlation with the trained maps stays above "
                          f"{sanity.get('threshold')} once every layer is random is flagged.")
                + table(["method", "rank correlation, all layers random", "|rank| correlation", "SSIM", "verdict",
                         "rank correlation, another class", "SSIM, another class", "verdict, another class"],
                        verdicts)
                + paragraph("Random logit test (Sixt et al. 2020): the same images explained for another class, "
                            "drawn at random per image. A method that explains the decision gives another map; one "
                            "whose maps correlate above the same threshold with the target's is flagged. The "
                            "control maps (random, sobel) ignore the class and are flagged by design.")
                + f'<div class="plots">{charts}</div>'
                + paragraph("On digits with black backgrounds, |map| rank correlations of gradient x input style "
                            "methods stay high for any model (their maps are 0 wherever the image is 0): read the "
                            "signed correlation."))

    def _gallery(self, ids: list[str], caption) -> str:
        header = ["image"] + self.methods
        rows = [[markup("{}<br>{}", self.thumbs.image(i), caption(i))] + [self.thumbs.pair(i, m) for m in self.methods]
                for i in ids]
        return table(header, rows, "gallery")

    def _caption(self, image_id: str) -> str:
        row = self.first_row.get(image_id)
        if row is None:
            return image_id
        label = "no label" if row["label"] is None else f"label {row['label']}"
        return f"{image_id} ({label}, predicted {row['predicted']}, p={number(row['predicted_score'], 2)})"

    def galleries_section(self) -> str:
        parts = [paragraph(f"Up to {self.per_class} images per class (the first by image id). Per method: the map, "
                           f"then the map over the image.")]
        for c in self.classes:
            parts.append(markup("<h3>Class {}</h3>", c) + self._gallery(self.selection[f"class:{c}"], self._caption))
        return "".join(parts)

    def misclassified_section(self) -> str:
        ids = self.selection["misclassified"]
        if not ids:
            return paragraph("No labelled image is misclassified (or the images carry no labels).")
        return (paragraph(f"{self.misclassified_count} labelled image(s) misclassified; the first {len(ids)} by id:")
                + self._gallery(ids, self._caption))

    def extremes_section(self) -> str:
        if not self._present("deletion_auc"):
            return paragraph("No metrics in this audit (run without --no-metrics).")
        parts = [paragraph("Per method, the images whose deletion curve falls furthest below (best) and least below "
                           "or above (worst) the random order's: random deletion AUC minus the map's.")]
        for method in self.methods:
            cells = []
            for kind in ("worst", "best"):
                for r in self.picks.extremes.get((kind, method), []):
                    image_id = r["image_id"]
                    cells.append(markup("{}{}<br>{}: {}, class {}<br>deletion {} vs random {}<br>insertion {} vs "
                                        "random {}", self.thumbs.image(image_id), self.thumbs.overlay(image_id, method),
                                        kind, image_id, r.get("target"), number(r["deletion_auc"]),
                                        number(r["deletion_auc_random"]), number(r.get("insertion_auc")),
                                        number(r.get("insertion_auc_random"))))
            if cells:
                parts.append(markup("<h3>{}</h3>", method) + table([], [cells], "gallery"))
        return "".join(parts)

    def distributions_section(self) -> str:
        parts = [paragraph("Histograms per method; for deletion and insertion the grey outline is the random order.")]
        for distribution in aggregate.distributions(self.audit, self.methods):
            panels = "".join(histogram(*distribution.panels[m], title=m) for m in self.methods)
            parts.append(markup('<h3>{}</h3><div class="plots">{}</div>', distribution.metric.replace("_", " "),
                                Raw(panels)))
        return "".join(parts)

    def relevance_section(self) -> str:
        if "relevance_curve" not in self.columns or not self._present("relevance_0"):
            return ""
        curves = aggregate.mean_curves(self.audit, "relevance_curve")
        percentiles = ["min"] + [str(p) for p in range(5, 100, 5)] + ["max"]
        charts = []
        for k, fill in enumerate((0, 127, 255)):
            series = {m: list(curves[m][21 * k:21 * (k + 1)]) for m in self.methods if m in curves}
            charts.append(line_chart(percentiles, series, title=f"pixels set to {fill}", y_label="label-flip rate",
                                     y_range=(0.0, 1.0)))
        return (paragraph("ABELE's relevance test: the share of images whose label flips when the pixels below each "
                          "percentile of the map are set to a constant. Lower curves mean the map's least relevant "
                          "pixels really are irrelevant to the model.")
                + f'<div class="plots">{"".join(charts)}</div>')

    def _rule_text(self, row: dict) -> str:
        lines = []
        for key in ("rule", "counterfactuals"):
            if row.get(key):
                lines.append(markup("<b>{}</b>: {}", key, row[key]))
        numbers = [f"{key} {number(row[key])}" for key in ("precision", "coverage", "fidelity", "r2")
                   if row.get(key) is not None]
        if numbers:
            lines.append(markup("{}", ", ".join(numbers)))
        if row.get("weights"):
            order = np.argsort(-np.abs(np.asarray(row["weights"])))[:5]
            top = ", ".join(f"{i} ({row['weights'][i]:+.3f})" for i in order)
            lines.append(markup("<b>top superpixels</b>: {}", top))
        return "<br>".join(lines)

    def _exemplars(self, row: dict, limit: int = 5) -> str:
        """abele's exemplars, then its counter-exemplars: flattened images of the map's size, each
        titled with the class the model gives it (counter-exemplars carry theirs in *_classes)."""
        parts = []
        channels = (self.audit.manifest.get("preprocessing") or {}).get("channels") or 1
        keys = sorted((k for k in row if k.endswith("exemplars") and isinstance(row[k], list) and row[k]),
                      key=lambda k: (k.startswith("counter"), k))
        for key in keys:
            images = render.flattened_images(row[key], row["height"], row["width"], channels)
            if images is None:
                parts.append(markup("<b>{}</b>: {} values, not whole {}x{} images", key, len(row[key]), row["height"],
                                    row["width"]))
                continue
            classes = row.get(f"{key[:-1]}_classes") or [row.get("predicted")] * len(images)
            tags = "".join(img(render.data_uri(render.fit(x, LONGEST)), f"{key[:-1].replace('_', ' ')}, class {c}", 56)
                           for x, c in zip(images[:limit], classes))
            shown = ", ".join(str(c) for c in classes[:limit])
            parts.append(markup("<b>{}</b> ({}; model's classes {}):<br>{}", key.replace("_", " "), len(images), shown,
                                Raw(tags)))
        return "<br>".join(parts)

    def rules_section(self) -> str:
        declared = self.audit.manifest.get("methods") or {}
        extras = {m: set(declared.get(m, {}).get("extras") or {}) for m in self.methods}
        rule_methods = [m for m in self.methods
                        if extras[m] & set(RULE_EXTRAS) or any("exemplar" in e for e in extras[m])]
        if not rule_methods:
            return ""
        ids = [i for c in self.classes for i in self.selection[f"class:{c}"][:1]][:6]
        parts = [paragraph("Rules, counterfactuals and exemplars of the superpixel methods and abele, on one image per "
                           "class. For the superpixel methods the left image numbers the superpixels the rules refer "
                           "to; abele's rules are on the autoencoder's latent coordinates z0, z1, ...")]
        for method in rule_methods:
            rows = []
            for image_id in ids:
                row = self.thumbs.maps.get((image_id, method))
                if row is None:
                    continue
                image = self.thumbs.images.get(image_id)
                if row.get("segments") and image is not None:
                    segments = np.asarray(row["segments"]).reshape(row["height"], row["width"])
                    left = img(render.data_uri(render.segments_image(image, segments)), f"superpixels of {image_id}",
                               112)
                else:
                    left = self.thumbs.image(image_id)
                text = "<br>".join(p for p in (self._rule_text(row), self._exemplars(row)) if p)
                rows.append([markup("{}<br>{}", left, image_id), self.thumbs.overlay(image_id, method), Raw(text)])
            parts.append(markup("<h3>{}</h3>", method) + table(["image", "overlay", "explanation"], rows))
        return "".join(parts)

    def errors_section(self) -> str:
        errors = aggregate.errors(self.audit, shown=100)
        if not errors.total:
            return paragraph("No errors: every record read was explained by every method.")
        return (paragraph(f"{errors.total} record(s) could not be explained. A failure before any method ran counts "
                          f"against every method.")
                + table(["stage", "method", "records"], [(s, m, n) for (s, m), n in sorted(errors.counts.items())])
                + table(["image id", "source", "stage", "method", "reason"],
                        [(e["image_id"], (e["source"] or "").rsplit("/", 1)[-1], e["stage"], e["method"] or "all",
                          e["reason"]) for e in errors.first])
                + (paragraph(f"First 100 of {errors.total} shown; all are in errors/.") if errors.total > 100 else ""))

    def html(self) -> str:
        m = self.audit.manifest
        sections = [("verdict", "Verdict", self.verdict_section()),
                    ("history", "History", self.history_section()),
                    ("methods", "Methods", self.methods_section()),
                    ("findings", "Clever-Hans findings", self.findings_section()),
                    ("classes", "Per class", self.classes_section()),
                    ("targets", "Other targets", self.targets_section()),
                    ("sanity", "Sanity check", self.sanity_section()),
                    ("galleries", "Galleries by class", self.galleries_section()),
                    ("misclassified", "Misclassified", self.misclassified_section()),
                    ("extremes", "Worst and best by faithfulness", self.extremes_section()),
                    ("distributions", "Metric distributions", self.distributions_section()),
                    ("relevance", "ABELE relevance curves", self.relevance_section()),
                    ("rules", "Rules and exemplars", self.rules_section()),
                    ("errors", "Errors", self.errors_section()),
                    ("run", "The run", self.run_section())]
        subtitle = (f"Run {m.get('run_id')}, {m.get('finished')}, status {m.get('status')}: "
                    f"{self.image_count} images explained by {len(self.methods)} method(s). "
                    f"{render.DISPLAY_NOTE}")
        return page("Saliency audit report", subtitle, [s for s in sections if s[2]])


def write_report(directory: str, output: str, storage_options: dict | None = None, **options) -> str:
    """Write the report of the audit in ``directory`` to ``output``; returns the output path."""
    document = Report(AuditDir(directory, storage_options), **options).html()
    # its sections quote storage errors (an unreadable history, verdict), which may quote storage options;
    # not the base64 of its images: a 4-character credential ("s3v4" under signature_version) occurs by
    # chance in about 6% of each MB of base64, and its replacement broke the image
    parts = re.split(r"(data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+)", document)
    document = "".join(p if i % 2 else redact(p, html.escape(REDACTED)) for i, p in enumerate(parts))
    storage.write_bytes_atomic(output, document.encode("utf-8"), storage_options)
    return output
