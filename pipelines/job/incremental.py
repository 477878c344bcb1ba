"""Incremental audits (``run --incremental [--slot NAME]``): plan only the work an audit history
lacks, and record the run in the history once it is published.

An (image, method) pair counts as explained when a recorded run of another slot explained it
with the same model (saliency_audit.transforms.model.load.model_identity) and the same method fingerprint: the
method's resolved options, the target, the seed, the preprocessing, the metrics' settings and the
map dtype, everything that makes its row. Two levels, both exact:

* shards: a shard whose storage fingerprint (size and etag / checksum / mtime) and sample limit
  match a recorded run's is not read for the methods that run explained it with, provided the
  newest run to read the shard saw that fingerprint too; a shard no method needs is not read at all;
* images: in the shards that are read, an image whose newest map in the history is of the same
  content (id and sha256 of its bytes: an image moved to a new shard, a shard rewritten) skips
  those methods (saliency_audit.transforms.skip_explained).

The run of a slot that the history already holds does not count its own earlier run: a rerun of a
slot explains the same images again and replaces the slot's row, so it is idempotent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from typing import Any

from saliency_audit.pipelines.config.options import fingerprint_values
from saliency_audit.transforms.io import history, storage
from saliency_audit.transforms.model.load import file_sha256, model_identity
from saliency_audit.transforms.model.targets import PREDICTED, covers, main_summary, parse_targets

log = logging.getLogger("saliency_audit")


@dataclasses.dataclass(frozen=True)
class Work:
    """What an incremental run has to do."""

    root: str
    slot: str | None  # None: the run's id, once it has one
    model: str
    fingerprints: dict[str, str]  # method -> fingerprint
    shards: dict[str, str | None]  # every shard --input matched -> its storage fingerprint
    limit: int | None
    needed: dict[str, tuple[str, ...]]  # the shards to read -> the methods still to explain there
    # recorded saliency file URL -> (its run's id, the methods whose rows count)
    history_files: dict[str, tuple[str, tuple[str, ...]]]
    runs: tuple[str, ...]  # recorded runs of this model (other slots) that the plan counts
    replaces: str | None  # the run that holds this slot now, if any
    targets: str = PREDICTED  # the run's --target, normalised

    @property
    def skipped_shards(self) -> list[str]:
        return [url for url in self.shards if url not in self.needed]

    def entry(self, run_id: str) -> dict[str, Any]:
        """The manifest's ``incremental``."""
        return {"slot": self.slot or run_id, "model": self.model, "fingerprints": self.fingerprints,
                "history_runs": list(self.runs), "replaces": self.replaces, "shards_read": len(self.needed),
                "shards_skipped": len(self.skipped_shards)}


def method_fingerprints(options, resolved: dict[str, Any],
                        storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """method -> sha256 (16 hex) of everything that makes its rows, but the model and the image:
    its own options, and every run option declared to change rows (saliency_audit.pipelines.config.
    options.fingerprint_values: seed, preprocessing, map storage, every metric's options).
    An option naming a file (abele's autoencoder) counts by the file's contents, not its name;
    storage credentials do not count."""
    # The target keys the maps (their class), not the fingerprint; fingerprints of releases that hashed
    # it hashed "predicted" by default, kept here so that their histories still count.
    common = {**fingerprint_values(options), "target": PREDICTED}
    # The precision the maps were made at (tf32 off CUDA is fp32); fp32 is left out, so fingerprints
    # made before --precision existed still match an fp32 run's.
    common["precision"] = resolved.get("precision", common.get("precision", "fp32"))
    if common["precision"] == "fp32":
        del common["precision"]
    # How the model's outputs were read (a sigmoid head's logit as two classes, probabilities as their logs):
    # maps of the same model made before the reading existed explained something else. Logits are left out,
    # so the histories of models read as they answer still match
    reading = resolved.get("model_loading", {}).get("outputs")
    if reading and reading != "logits":
        common["outputs"] = reading
    out = {}
    for name, info in resolved["methods"].items():
        options = {key: _content(value, storage_options) for key, value in (info["options"] or {}).items()
                   if key != "storage_options"}
        body = json.dumps({"method": name, "options": options, **common}, sort_keys=True, default=str)
        out[name] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return out


def _content(value: Any, storage_options: dict[str, Any] | None) -> Any:
    """A string option that names a file -> the file's sha256; any other value as it is."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return value
    try:
        fs, path = storage.filesystem(value, storage_options)
        if fs.isfile(path):
            return {"sha256": file_sha256(value, storage_options)}
    except Exception:  # noqa: BLE001 - not a path at all
        pass
    return value


# The storage's content tags, and on local disks what a same-size rewrite cannot keep: the inode
# change time (which utime cannot set back) and the inode.
CONTENT_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "checksum", "mtime", "created", "ino", "LastModified",
                "last_modified")


def shard_fingerprint(info: dict[str, Any]) -> str | None:
    """Size and every content tag the storage lists; None when it lists none (such a shard is
    never taken as unchanged)."""
    tags = [f"{key}={info[key]}" for key in CONTENT_KEYS if info.get(key) not in (None, "")]
    return f"{info.get('size')}:" + ",".join(tags) if tags else None


def shard_fingerprints(urls: list[str], storage_options: dict[str, Any] | None) -> dict[str, str | None]:
    out = {}
    for url in urls:
        fs, path = storage.filesystem(url, storage_options)
        out[url] = shard_fingerprint(fs.info(path))
    return out


def _covers(recorded: int | None, wanted: int | None) -> bool:
    """Whether a shard read with --limit-per-shard ``recorded`` holds the records ``wanted`` reads."""
    return recorded is None or (wanted is not None and recorded >= wanted)


def _last_seen(runs: list[dict[str, Any]]) -> dict[str, str | None]:
    """shard url -> its fingerprint as the newest of these runs to read it saw it. An older run's
    claim on a shard holds only while the shard is as that run saw it: a run in between may have
    read other content there (a tag that repeats when content does, as an MD5 ETag, cannot tell
    an image changed and changed back), and its maps are the newest now."""
    newest: dict[str, tuple[str, str | None]] = {}
    for r in runs:
        for s in r["shard_list"] or []:
            newest[s["url"]] = max(newest.get(s["url"], ("", None)), (r["run_id"], s["fingerprint"]),
                                   key=lambda seen: seen[0])
    return {url: fingerprint for url, (_, fingerprint) in newest.items()}


def plan_work(root: str, slot: str | None, model_spec, state_sha: str, args, resolved: dict[str, Any],
              shards: list[str], storage_options: dict[str, Any] | None) -> Work:
    model = model_identity(model_spec, state_sha)
    fingerprints = method_fingerprints(args, resolved, storage_options)
    methods = list(fingerprints)
    found = shard_fingerprints(shards, storage_options)
    rows = history.read(root, storage_options)
    replaces = next((r["run_id"] for r in rows if slot is not None and r["slot"] == slot), None)
    counted = [r for r in rows if r["model"] == model and r["slot"] != slot]
    standing = {r["run_id"] for r in counted}
    covered: dict[str, list[tuple[str, int | None, set[str]]]] = {}
    history_files: dict[str, tuple[str, tuple[str, ...]]] = {}
    requests = parse_targets(args.target)
    for r in counted:
        same = {m["method"] for m in r["methods"] or [] if fingerprints.get(m["method"]) == m["fingerprint"]}
        if not same:
            continue
        # A shard is done only if the run asked for every class this one asks for; its maps still
        # count per (image, method, class) below.
        for s in (r["shard_list"] or []) if _asked_for(r, requests) else []:
            if set(s["relies_on"] or []) <= standing:  # else a run it skipped through is gone
                covered.setdefault(s["url"], []).append((s["fingerprint"], s["limit"], same & set(s["methods"] or [])))
        for relative in r["files"] or []:
            history_files[storage.join(root, relative)] = (r["run_id"], tuple(sorted(same)))
    last_seen = _last_seen(counted)
    needed = {}
    for url in shards:
        unchanged = found[url] is not None and found[url] == last_seen.get(url)
        done = set().union(*[m for fp, limit, m in covered.get(url, []) if unchanged
                             and fp == found[url] and _covers(limit, args.limit_per_shard)])
        todo = tuple(m for m in methods if m not in done)
        if todo:
            needed[url] = todo
    return Work(root, slot, model, fingerprints, found, args.limit_per_shard, needed, history_files,
                tuple(r["run_id"] for r in counted), replaces, ",".join(requests))


def _asked_for(row: dict[str, Any], requests: tuple[str, ...]) -> bool:
    """Whether a recorded run's --target named every class ``requests`` name (a row of a release
    before several targets: ``predicted``, the only target its fingerprints match)."""
    try:
        return covers(parse_targets(row.get("targets") or PREDICTED), requests)
    except ValueError:
        return False


# --- the history's row for a published run ---------------------------------------------------

def _mean(rows: list[dict], column: str) -> float | None:
    values = [r[column] for r in rows if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])]
    return float(sum(values) / len(values)) if values else None


def shard_list(work: Work, errors: list[dict], skipped: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    """The row's shards and, per shard, the methods every record of it is done with: explained
    by this run, or skipped because a recorded run holds the pair. A skip makes the claim rest
    on the runs the plan counted (``relies_on``): once one of them leaves the history (its slot
    rerun, its row left out), the claim lapses and the shard is read again. A method that failed
    on a record (a failure before any method counts against all) is not done there: a later run
    reads the shard again to retry it, its other ids skipping through the history.
    ``skipped``: (method, shard) -> pairs skipped there."""
    failed: dict[str, set[str | None]] = {}
    for e in errors:
        failed.setdefault(e.get("source"), set()).add(e.get("method"))
    out = []
    for url, todo in work.needed.items():
        bad = failed.get(url, set())
        done = [] if None in bad else [m for m in todo if m not in bad]
        relies = sorted(work.runs) if any(skipped.get((m, url)) for m in done) else []
        out.append({"url": url, "fingerprint": work.shards[url], "limit": work.limit, "methods": done,
                    "relies_on": relies})
    return out


def row(work: Work, manifest: dict[str, Any], verdict: dict | None, summary: list[dict],
        findings: list[dict], errors: list[dict], skipped: dict[tuple[str, str], int]) -> dict[str, Any]:
    """The history's row: the run, its counts and the statistics the gates judge, per method."""
    overall = {r["method"]: r for r in main_summary(summary, work.targets) if r.get("target") is None}
    counts = manifest["counts"]
    methods = []
    for name, fingerprint in work.fingerprints.items():
        c, s = counts.get(name, {}), overall.get(name, {})
        done = c.get("explained", 0) + c.get("errors", 0)
        deletion, random = s.get("mean_deletion_auc"), s.get("mean_deletion_auc_random")
        scores = [f["score"] for f in findings if f.get("method") == name and isinstance(f.get("score"), float)]
        sanity = ((manifest.get("sanity") or {}).get("methods") or {}).get(name) or {}
        methods.append({
            "method": name, "fingerprint": fingerprint, "read": c.get("read"), "explained": c.get("explained"),
            "errors": c.get("errors"), "skipped": c.get("skipped", 0),
            "error_rate": c.get("errors", 0) / done if done else None, "accuracy": s.get("accuracy"),
            "deletion_auc": deletion, "deletion_auc_random": random,
            "insertion_auc": s.get("mean_insertion_auc"),
            "deletion_vs_random": deletion / random if deletion is not None and random else None,
            "constant_share": s.get("constant_share"),
            "sanity_rank_correlation": sanity.get("rank_correlation") if isinstance(sanity, dict) else None,
            "findings_top": max(scores) if scores else None})
    labelled = max((r for r in overall.values()), key=lambda r: r.get("labelled") or 0, default={})
    return {
        "slot": work.slot or manifest["run_id"], "run_id": manifest["run_id"], "model": work.model,
        "started": manifest["started"], "finished": manifest["finished"], "input": manifest["input"]["pattern"],
        "shards": len(work.shards), "shards_read": len(work.needed), "shards_skipped": len(work.skipped_shards),
        "read": next(iter(counts.values()), {}).get("read", 0),
        "labelled": labelled.get("labelled"), "accuracy": labelled.get("accuracy"),
        "verdict": None if verdict is None else verdict["status"],
        "gates_failed": None if verdict is None else verdict["failed"],
        "findings_flagged": (manifest.get("findings") or {}).get("flagged"),
        "targets": work.targets,
        "methods": methods,
        "shard_list": shard_list(work, errors, skipped),
        "files": list(manifest["files"]["saliency"]),
        "manifest": f"_runs/{manifest['run_id']}/manifest.json",
    }
