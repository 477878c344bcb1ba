"""The phases of a run after its plan: execute (the Beam job into the run's own folders), verify
(the counts reconcile), publish (the manifest becomes the pointer, in one put), judge (the gates)
and record (an incremental run's history row)."""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq

from saliency_audit.explainers.core.paths import redact
from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.checks.findings import FINDINGS_SCHEMA, findings_from_statistics
from saliency_audit.pipelines.checks.sanity import SANITY_SCHEMA, run_sanity_check
from saliency_audit.pipelines.job import incremental
from saliency_audit.pipelines.job.findings_step import STATISTICS, read_statistics
from saliency_audit.pipelines.job.graph import build_pipeline
from saliency_audit.pipelines.job.manifest import OUTPUTS, build_manifest, now, read_rows
from saliency_audit.pipelines.job.plan import Plan
from saliency_audit.pipelines.runners.beam import beam_pipeline_options, runner_name
from saliency_audit.transforms.io import history, progress, publication, storage
from saliency_audit.transforms.io.publication import Heartbeat, Run
from saliency_audit.transforms.io.rows import ERROR_SCHEMA, SUMMARY_SCHEMA
from saliency_audit.transforms.model.targets import several
from saliency_audit.transforms.parquet_sink import write_table

log = logging.getLogger("saliency_audit")


FAILED = 3  # main's exit code for a run that failed (0 done, 1 a gate failed, 2 a usage error)


def execute(plan: Plan, run: Run) -> dict | None:
    """Run the Beam job and, if asked, the sanity check, into the run's own folders; returns the
    sanity check's manifest entry."""
    args = plan.options
    beam_options, runner = beam_pipeline_options(plan.beam_args)
    log.info("run %s: %d shard(s), methods %s, runner %s", run.run_id, len(plan.shards), ",".join(plan.methods),
             runner_name(plan.beam_args))
    shards = len(plan.work.needed) if plan.work is not None else len(plan.shards)
    if plan.work is not None:
        log.info("incremental: model %s, %d of %d shard(s) to read (%d run(s) of the history count), slot %s",
                 plan.work.model[:12], shards, len(plan.shards), len(plan.work.runs), plan.work.slot or run.run_id)
    display = progress.Display(progress.sink_for(run), shards, args.limit_per_shard)
    with display, beam.Pipeline(runner=runner, options=beam_options) as p:  # the job runs as this block ends
        build_pipeline(p, shards=plan.shards, run=run, config=plan.config, prep=plan.prep,
                       batch_size=plan.resolved["batch_size"], storage_options=plan.storage_options, schema=plan.schema,
                       map_dtype=args.map_dtype, limit_per_shard=args.limit_per_shard, work=plan.work)
    commit_files(plan, run)
    write_findings(plan, run)
    if not args.sanity_check:
        return None
    # float32 and eager: the randomised models' maps it compares with are made so
    config = dataclasses.replace(plan.config, precision="fp32", compile=False)
    return run_sanity_check(config, plan.shards, plan.prep, sanity_dir=run.folder("sanity"),
                            summary_dir=run.folder("summary"), images=args.sanity_images,
                            threshold=args.sanity_threshold, storage_options=plan.storage_options)


def commit_files(plan: Plan, run: Run) -> None:
    """Keep exactly the files the job committed: delete any that a failed and retried bundle left
    behind, and give an output without rows one empty file, so readers still find its schema."""
    schemas = {"saliency": plan.schema, "summary": SUMMARY_SCHEMA, "errors": ERROR_SCHEMA}
    for name, schema in schemas.items():
        urls = json.loads(storage.read_bytes(run.private(f"files-{name}.json"), plan.storage_options))
        committed = {url.rsplit("/", 1)[-1] for url in urls}  # all in the run's folder of this output
        fs, folder = storage.filesystem(run.folder(name), plan.storage_options)
        fs.invalidate_cache()
        for path in storage.glob_in(fs, folder, "*.parquet"):
            if path.rsplit("/", 1)[-1] not in committed:
                fs.rm_file(path)
        if not committed:
            write_table(run.folder(name), schema.empty_table(), plan.storage_options)
    if not plan.options.sanity_check:
        write_table(run.folder("sanity"), SANITY_SCHEMA.empty_table(), plan.storage_options)


def write_findings(plan: Plan, run: Run) -> None:
    """Clever-Hans discovery on the committed maps (saliency_audit.pipelines.checks.findings): per method and class,
    attribution concentrated where other classes put none, and SpRAy's clusters. From the statistics
    the job gathered (saliency_audit.pipelines.job.findings_step; with several targets, of the main
    request's maps, one per image): no saliency file is read here."""
    try:
        table = findings_from_statistics(read_statistics(run.private(STATISTICS), plan.storage_options))
    except Exception as e:  # an analysis of the maps must never cost the maps: report it, publish the run
        log.warning("Clever-Hans discovery failed (findings/ left empty): %s: %s", type(e).__name__, e)
        storage.write_json_atomic(run.private("findings-error.json"), {"error": redact(f"{type(e).__name__}: {e}")},
                                  plan.storage_options)
        table = FINDINGS_SCHEMA.empty_table()
    write_table(run.folder("findings"), table, plan.storage_options)


def run_files(run: Run, storage_options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per output, the run's files (relative to the output directory) and their sizes, listed once
    for the counts, the manifest and the bytes per row."""
    out = {}
    for name in OUTPUTS:
        fs, folder = storage.filesystem(run.folder(name), storage_options)
        fs.invalidate_cache()
        found = storage.glob_in(fs, folder, "*.parquet", detail=True)
        out[name] = {f"{run.relative(name)}/{path.rsplit('/', 1)[-1]}": int(info["size"])
                     for path, info in sorted(found.items())}
    return out


def count_outcomes(run: Run, methods: list[str], storage_options: dict[str, Any],
                   files: dict[str, dict[str, int]], incremental_run: bool = False,
                   several_targets: bool = False) -> dict[str, dict[str, int]]:
    """Per method: records read (counted at the reader), rows explained and errors, from the
    files themselves; errors without a method (read, decode, preprocess, model, target) count
    against every method. An incremental run adds the pairs it skipped (already explained).
    With several targets, ``targets``: the (image, target) pairs the rows, errors and skips
    account for (read + the pairs beyond one per record)."""
    read = json.loads(storage.read_bytes(run.private("read.json"), storage_options))["read"]
    skipped: dict[str, int] = {}
    for method, _, n in read_skipped(run, storage_options):
        skipped[method] = skipped.get(method, 0) + n
    fs, root = storage.filesystem(run.output, storage_options)

    def method_counts(name) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for relative in files[name]:
            with fs.open(f"{root}/{relative}", "rb") as f:
                column = pq.read_table(f, columns=["method"]).column("method")
            for entry in column.value_counts().to_pylist():
                counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
        return counts

    explained, errors = method_counts("saliency"), method_counts("errors")
    counts = {m: {"read": read, "explained": explained.get(m, 0), "errors": errors.get(None, 0) + errors.get(m, 0)}
              for m in methods}
    if several_targets:  # (image, target) pairs: one per distinct class and per target an image failed
        extra = json.loads(storage.read_bytes(run.private("targets.json"), storage_options))["extra"]
        for m in methods:
            counts[m]["targets"] = read + int(extra)
    for m in methods:
        if incremental_run or skipped.get(m):
            counts[m]["skipped"] = int(skipped.get(m, 0))
    return counts


def read_skipped(run: Run, storage_options: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(method, shard, pairs) an incremental run skipped there (already in the history)."""
    return [tuple(entry) for entry in json.loads(storage.read_bytes(run.private("skipped.json"), storage_options))]


def verify(plan: Plan, run: Run, files: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counts from the files; a run whose counts do not reconcile is never published."""
    counts = count_outcomes(run, list(plan.methods), plan.storage_options, files, plan.work is not None,
                            several(plan.options.target))
    if not all(c.get("targets", c["read"]) == c["explained"] + c["errors"] + c.get("skipped", 0)
               for c in counts.values()):
        raise RuntimeError(f"counts do not reconcile (read or targets != explained + errors + skipped): {counts}; "
                           "the previous results are left as they were")
    return counts


def run_plan(audit_plan: Plan) -> tuple[dict, int]:
    """The phases after ``plan`` (see ``run``); returns the manifest and the gates' exit code."""
    started = now()
    current = Run(audit_plan.options.output, publication.new_run_id(), audit_plan.storage_options,
                  audit_plan.work.model if audit_plan.work is not None else None)
    stale_after = 60.0 * audit_plan.options.reclaim_after
    publication.reclaim(current.output, current.storage_options, stale_after, keep=current.run_id)
    try:
        with Heartbeat(current):
            sanity = execute(audit_plan, current)
            files = run_files(current, audit_plan.storage_options)
            counts = verify(audit_plan, current, files)
            manifest = build_manifest(audit_plan, current, started, counts, sanity, files)
            manifest["verdict"] = gates.VERDICT if gates.gated(audit_plan.options) else None  # see gates.judge_run
    except BaseException as e:
        try:
            publication.abandon(current, f"{type(e).__name__}: {e}")
        except Exception as e2:  # storage is failing too: reclaim removes the run once its heartbeat is stale
            log.warning("could not remove the files of failed run %s: %s", current.run_id, e2)
        raise
    decision = {"exit": 0}

    def judge_and_record() -> None:  # after the pointer, before the marker says published
        with Heartbeat(current):
            decision["exit"] = gates.FAILED_CHECK  # published: until the gates have decided, the check failed
            decision["exit"], verdict = gates.judge_run(manifest, audit_plan.options, audit_plan.storage_options)
            if audit_plan.work is not None:
                gated = decision["exit"]
                decision["exit"] = FAILED  # published, not recorded: a scheduler must hear of it
                record(audit_plan, current, manifest, verdict)
                decision["exit"] = gated

    publication.publish(current, manifest, stale_after, after_pointer=judge_and_record)
    return manifest, decision["exit"]


def record(plan: Plan, run: Run, manifest: dict, verdict: dict | None) -> None:
    """An incremental run's row in the audit history (saliency_audit.transforms.io.history): it becomes the slot's run."""
    files = manifest["files"]
    summary = read_rows(run, files["summary"], plan.storage_options)
    findings = read_rows(run, files["findings"], plan.storage_options, ["method", "score"])
    errors = read_rows(run, files["errors"], plan.storage_options, ["source", "method"])
    skipped = {(method, shard): n for method, shard, n in read_skipped(run, plan.storage_options)}
    row = incremental.row(plan.work, manifest, verdict, summary, findings, errors, skipped)
    url = history.record(run.output, row, plan.storage_options)
    log.info("recorded run %s as slot %s of the history (%s)", run.run_id, row["slot"], url)
