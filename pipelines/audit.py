"""The audit job: image shards -> saliency, summary and errors in Parquet, plus a manifest.

    python -m pipelines.audit --input 'shards/*.tar' --model m.pt --methods sal,intg --output out/
is the same as ``saliency-audit run ...`` (the form Dataflow and Flink launchers use).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import platform
import sys
import time
from importlib import metadata
from typing import Any, Iterable

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.utils import shared

from explainers import list_methods, method_parameters
from pipelines import gates, incremental
from pipelines.options import UsageError, redact_argv
from pipelines.findings import FINDINGS_SCHEMA, SCORE_THRESHOLD, find_clever_hans
from pipelines.preflight import (check_forward_only, check_shards, first_sample, preflight, thread_budget,
                                 worker_device_entry)
from pipelines.sanity import SANITY_SCHEMA, run_sanity_check
from pipelines.spec import manifest_entry, parse_invocation, recorded_method_options, recorded_options
from transforms import history, map_storage, progress, publication, storage
from transforms.abele_protocol import AbeleProtocol
from transforms.batching import ERRORS, READ, ReadShardBatches
from transforms.duplicates import DropRepeatedIds, FirstShardOfRepeatedIds, ListShardIds
from transforms.explain import (ALL, DEVICE, HTTP, MODEL_CALLS, NOT_COUNTED, ExplainBatches, ExplainConfig,
                                build_explainers)
from transforms.models import ModelSpec, model_hashes
from transforms.parquet_sink import WriteParquet, write_table
from transforms.readers import read_shard
from transforms.records import ImageBatch
from transforms.preprocess import Preprocessing
from transforms.publication import Heartbeat, Run
from transforms.rows import ERROR_SCHEMA, SUMMARY_SCHEMA, saliency_schema
from transforms.skip_explained import SKIPPED, ExplainedBefore, SkipExplained
from transforms.summary import Summarize

log = logging.getLogger("saliency_audit")
ABELE_CONVENTION = (
    "ABELE's protocol (methods.md 15.1): relevance_V = label-flip rate averaged over the percentiles "
    "min,5,...,95,max as pixels below each percentile of the map become pixel value V (0, 127, 255); "
    "relevance_curve = the 3 x 21 flips, fill-major; stability_* = mean/max Lipschitz ratio against "
    "{n} salt-and-pepper copies (1/11 + 1/11) that keep the label; coherence_* = the same against up "
    "to {n} nearest images of the same batch with the same target and predicted class (null if none)")
OUTPUTS = publication.OUTPUTS  # sanity: empty unless --sanity-check
FAILED = 3  # main's exit code for a run that failed (0 done, 1 a gate failed, 2 a usage error)


def parse_methods(text: str, method_options: dict[str, Any], aae: str | None,
                  storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty")
    known = list_methods()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; known methods: {', '.join(known)}")
    stray = sorted(set(method_options) - set(names))
    if stray:
        raise UsageError(f"--method-options names method(s) not in --methods: {', '.join(stray)}")
    methods = {}
    for name in dict.fromkeys(names):
        options = method_options.get(name, {})
        if not isinstance(options, dict):
            raise UsageError(f"--method-options for {name} must be a JSON object")
        if name == "abele":
            if not aae and "aae" not in options:
                raise UsageError("abele needs --aae PATH (train one with saliency-audit train-aae)")
            options = {"aae": aae, **options}
            if storage_options and "storage_options" not in options:  # read the AAE where the data is
                options["storage_options"] = storage_options
        methods[name] = options
    return methods


def set_input_bounds(methods: dict[str, dict[str, Any]], prep: Preprocessing) -> None:
    """Give methods that take ``input_bounds`` (lrp's z-box rule) the model input's range, pixels in
    [0, 1] after --mean and --std, unless --method-options set it."""
    if prep.mean is None and prep.std is None:
        return  # the explainers' default, [0, 1]
    n = max(len(prep.mean or ()), len(prep.std or ()))
    mean = list(prep.mean or [0.0]) * (n if not prep.mean or len(prep.mean) == 1 else 1)
    std = list(prep.std or [1.0]) * (n if not prep.std or len(prep.std) == 1 else 1)
    bounds = [[(0.0 - m) / s for m, s in zip(mean, std)], [(1.0 - m) / s for m, s in zip(mean, std)]]
    for name, options in methods.items():
        if "input_bounds" in method_parameters(name) and "input_bounds" not in options:
            options["input_bounds"] = bounds


def beam_pipeline_options(beam_args: list[str]) -> tuple[PipelineOptions, Any]:
    """Pipeline options and the runner. DirectRunner is pinned to Beam's in-process
    FnApiRunner: the stock DirectRunner first tries Prism, which downloads a binary. DaskRunner
    is ours (pipelines.dask_runner): Beam's drops tagged outputs and all sinks but one."""
    options = PipelineOptions(beam_args)
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return options, FnApiRunner()
    if runner_name in ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        from pipelines.dask_runner import DaskRunner
        return options, DaskRunner()
    return options, runner_name


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("saliency-audit", "apache-beam", "torch", "captum", "scikit-image", "pyarrow", "fsspec", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def runner_name(beam_args: list[str]) -> str:
    runner = beam_pipeline_options(beam_args)[1]
    return runner if isinstance(runner, str) else type(runner).__name__


@dataclasses.dataclass
class Plan:
    """Everything the run needs, checked before any work starts."""

    argv: list[str]
    args: Any
    beam_args: list[str]
    methods: dict[str, dict[str, Any]]
    prep: Preprocessing
    shards: list[str]
    config: ExplainConfig
    resolved: dict[str, Any]
    schema: Any
    work: incremental.Work | None = None  # an incremental run: what the history lacks

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.args.storage_options


def plan(argv: list[str]) -> Plan:
    """Parse and check the invocation (a --config spec, then the flags that override it), find
    the shards and run preflight (the model on a sample image with every method): a bad run fails
    here, in seconds, with UsageError."""
    args, beam_args = parse_invocation(argv)
    if args.slot and not args.incremental:
        raise UsageError("--slot names a slot of an audit history: it needs --incremental")
    if args.baseline:  # a bad baseline fails now, not after the run; never the run's own output
        if gates.same_place(args.baseline, args.output):
            raise UsageError(f"--baseline {args.baseline} is the run's own --output: the run would be compared "
                             f"with itself once published; use a copy of the earlier audit, or an --output per run")
        try:  # its manifest, and the footers of the files it names: cheap, and flat in its size
            gates.open_audit(args.baseline, args.storage_options, "--baseline")
        except (ValueError, OSError) as e:
            raise UsageError(" ".join(str(e).split())) from None
    methods = parse_methods(args.methods, args.method_options, args.aae, args.storage_options)
    try:
        prep = Preprocessing(resize=args.resize, channels=args.channels, mean=args.mean, std=args.std,
                             to_grayscale=args.to_grayscale, max_pixels=args.max_pixels)
        shards = check_shards(storage.expand_glob(args.input, args.storage_options), args.input)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    check_top_k(args.gates, shards, prep, args.storage_options)
    set_input_bounds(methods, prep)
    spec = ModelSpec(args.model, args.weights, args.trust_model, args.storage_options or None,
                     args.endpoint_options or None)
    check_forward_only(spec, list(methods), args.sanity_check)
    config = ExplainConfig(model=spec, methods=methods, device=args.device, target=args.target, seed=args.seed,
                           metrics=args.metrics, metric_steps=args.metric_steps,
                           metric_substrate=args.metric_substrate,
                           abele=AbeleProtocol(args.abele_neighbours, prep.mean, prep.std)
                           if args.abele_metrics else None, road=args.road,
                           threads=thread_budget(args.torch_threads, beam_args))
    resolved = preflight(config, shards, prep, args.storage_options, beam_args)
    # the workers' model must answer as many classes as preflight's did (an endpoint redeployed meanwhile)
    config = dataclasses.replace(config, model=dataclasses.replace(spec, num_classes=resolved["num_classes"]))
    schema = map_storage.saliency_schema(saliency_schema(methods), args.map_dtype)
    work = None
    if args.incremental:
        try:
            work = incremental.plan_work(args.output, args.slot, spec, resolved["model_state_sha256"], args, resolved,
                                         prep, shards, args.storage_options)
        except OSError as e:
            raise UsageError(f"--incremental: cannot read the history or the shards: {e}") from None
    return Plan(argv, args, beam_args, methods, prep, shards, config, resolved, schema, work)


def check_top_k(given, shards: list[str], prep: Preprocessing, storage_options: dict[str, Any]) -> None:
    """--gate top_k=N as a pixel count must be under the pixels of a map (the model input's, from
    the first decodable image), or the top-k overlap gate could never fail."""
    top_k = gates.thresholds(given)["top_k"]
    sample = first_sample(shards, prep, storage_options) if top_k >= 1 else None
    if sample is not None:
        try:
            gates.check_top_k(top_k, sample[1].shape[-2] * sample[1].shape[-1])
        except gates.GateError as e:
            raise UsageError(str(e)) from None


def build_pipeline(p: beam.Pipeline, *, shards: list[str], run: Run, config: ExplainConfig, prep: Preprocessing,
                   batch_size: int, storage_options: dict[str, Any], schema=None, map_dtype: str = "float32",
                   limit_per_shard: int | None = None, work: incremental.Work | None = None) -> None:
    """The Beam job: shards -> batches -> explanations -> Parquet files in the run's folders.

    Shards are the unit of parallelism (one reader per shard, batches explained where they are
    read), so nothing between the reader and the sink is held for the whole dataset. An image id
    read from several shards is explained once, from the first of them in shard order. With
    ``work`` (an incremental run) only the shards it needs are read, and only the (image, method)
    pairs the history lacks are explained."""
    schema = schema or saliency_schema(config.methods)
    config = dataclasses.replace(config, progress=progress.sink_for(run),  # workers report to the launcher
                                 fingerprints=work.fingerprints if work is not None else {})
    reader = ReadShardBatches(prep, batch_size, storage_options, limit_per_shard, progress=config.progress)
    if work is not None:
        shards = [url for url in shards if url in work.needed]
    shard_urls = p | "Shards" >> beam.Create(shards)
    history_files = work.history_files if work is not None else {}
    listed = (shard_urls | "ListIds" >> ListShardIds(reader)) if len(shards) > 1 or history_files else None
    first_shard = (listed | "FindRepeatedIds" >> FirstShardOfRepeatedIds() if len(shards) > 1
                   else p | "NoRepeatedIds" >> beam.Create([]))  # one shard: the reader keeps ids unique
    done = (listed | "ExplainedBefore" >> ExplainedBefore(history_files, storage_options) if history_files
            else p | "NothingExplainedBefore" >> beam.Create([]))
    batched = (shard_urls
               | "SpreadShards" >> beam.Reshuffle()
               | "ReadAndBatch" >> beam.ParDo(reader).with_outputs(ERRORS, READ, main="batches"))
    unique = (batched.batches
              | "DropRepeatedIds" >> beam.ParDo(DropRepeatedIds(), beam.pvalue.AsDict(first_shard))
              .with_outputs(ERRORS, main="batches"))
    todo = (unique.batches
            | "SkipExplained" >> beam.ParDo(SkipExplained(list(config.methods), work.needed if work else {}),
                                            beam.pvalue.AsDict(done)).with_outputs(SKIPPED, main="batches"))
    explained = (todo.batches
                 | "Explain" >> beam.ParDo(ExplainBatches(config, shared.Shared()))
                 .with_outputs(ERRORS, DEVICE, SKIPPED, MODEL_CALLS, main="rows"))
    (explained[MODEL_CALLS] | "KeyCalls" >> beam.Map(lambda c: (c[0], (c[1], c[2])))
     | "SumCalls" >> beam.CombinePerKey(lambda pairs: tuple(map(sum, zip(*pairs))))
     | "ListCalls" >> beam.combiners.ToList()
     | "WriteCalls" >> beam.Map(lambda calls: storage.write_json_atomic(
         run.private("model-calls.json"), sorted([key, *value] for key, value in calls), storage_options)))
    ((todo[SKIPPED], explained[SKIPPED]) | "AllSkipped" >> beam.Flatten()
     | "CountSkipped" >> beam.CombinePerKey(sum) | "ListSkipped" >> beam.combiners.ToList()
     | "WriteSkipped" >> beam.Map(lambda pairs: storage.write_json_atomic(
         run.private("skipped.json"), sorted([method, shard, n] for (method, shard), n in pairs), storage_options)))
    (explained[DEVICE] | "WorkerDevices" >> beam.Distinct() | "ListDevices" >> beam.combiners.ToList()
     | "WriteDevices" >> beam.Map(_write_sorted_list, run.private("devices.json"), storage_options))
    rows = explained.rows
    files = {
        "saliency": (rows | "StoredMaps" >> beam.Map(map_storage.stored_row, map_dtype)
                     | "WriteSaliency" >> WriteParquet(run.folder("saliency"), schema, storage_options=storage_options)),
        "summary": (rows | "Summarize" >> Summarize()
                    | "WriteSummary" >> WriteParquet(run.folder("summary"), SUMMARY_SCHEMA,
                                                     storage_options=storage_options)),
        "errors": ((batched.errors, unique.errors, explained.errors) | "AllErrors" >> beam.Flatten()
                   | "ErrorRows" >> beam.Map(dataclasses.asdict)
                   | "WriteErrors" >> WriteParquet(run.folder("errors"), ERROR_SCHEMA, storage_options=storage_options)),
    }
    for name, urls in files.items():  # the files a committed bundle wrote: the run's result
        (urls | f"List{name.title()}" >> beam.combiners.ToList()
         | f"Commit{name.title()}" >> beam.Map(_write_sorted_list, run.private(f"files-{name}.json"), storage_options))
    (batched[READ] | "CountRead" >> beam.CombineGlobally(sum)
     | "WriteReadCount" >> beam.Map(lambda n: storage.write_json_atomic(run.private("read.json"), {"read": n},
                                                                        storage_options)))


def _write_sorted_list(values: list[str], target: str, storage_options: dict[str, Any]) -> None:
    storage.write_json_atomic(target, sorted(values), storage_options)


def execute(plan: Plan, run: Run) -> dict | None:
    """Run the Beam job and, if asked, the sanity check, into the run's own folders; returns the
    sanity check's manifest entry."""
    args = plan.args
    options, runner = beam_pipeline_options(plan.beam_args)
    log.info("run %s: %d shard(s), methods %s, runner %s", run.run_id, len(plan.shards), ",".join(plan.methods),
             runner_name(plan.beam_args))
    shards = len(plan.work.needed) if plan.work is not None else len(plan.shards)
    if plan.work is not None:
        log.info("incremental: model %s, %d of %d shard(s) to read (%d run(s) of the history count), slot %s",
                 plan.work.model[:12], shards, len(plan.shards), len(plan.work.runs), plan.work.slot or run.run_id)
    display = progress.Display(progress.sink_for(run), shards, args.limit_per_shard)
    with display, beam.Pipeline(runner=runner, options=options) as p:  # the job runs as this block ends
        build_pipeline(p, shards=plan.shards, run=run, config=plan.config, prep=plan.prep,
                       batch_size=args.batch_size, storage_options=plan.storage_options, schema=plan.schema,
                       map_dtype=args.map_dtype, limit_per_shard=args.limit_per_shard, work=plan.work)
    commit_files(plan, run)
    write_findings(plan, run)
    if not args.sanity_check:
        return None
    return run_sanity_check(plan.config, plan.shards, plan.prep, sanity_dir=run.folder("sanity"),
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
        for path in fs.glob(f"{folder}/*.parquet"):
            if path.rsplit("/", 1)[-1] not in committed:
                fs.rm_file(path)
        if not committed:
            write_table(run.folder(name), schema.empty_table(), plan.storage_options)
    if not plan.args.sanity_check:
        write_table(run.folder("sanity"), SANITY_SCHEMA.empty_table(), plan.storage_options)


def write_findings(plan: Plan, run: Run) -> None:
    """Clever-Hans discovery on the committed maps (pipelines.findings): per method and class,
    attribution concentrated where other classes put none, and SpRAy's clusters."""
    urls = json.loads(storage.read_bytes(run.private("files-saliency.json"), plan.storage_options))
    try:
        table = find_clever_hans(urls, plan.storage_options)
    except Exception as e:  # an analysis of the maps must never cost the maps: report it, publish the run
        log.warning("Clever-Hans discovery failed (findings/ left empty): %s: %s", type(e).__name__, e)
        storage.write_json_atomic(run.private("findings-error.json"), {"error": f"{type(e).__name__}: {e}"},
                                  plan.storage_options)
        table = FINDINGS_SCHEMA.empty_table()
    write_table(run.folder("findings"), table, plan.storage_options)


def read_rows(run: Run, relative: Iterable[str], storage_options: dict[str, Any],
              columns: list[str] | None = None) -> list[dict]:
    """The rows of some of the run's files (paths relative to the output directory)."""
    fs, root = storage.filesystem(run.output, storage_options)
    rows = []
    for path in relative:
        with fs.open(f"{root}/{path}", "rb") as f:
            rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


def findings_entry(run: Run, storage_options: dict[str, Any], files: dict[str, dict[str, int]]) -> dict:
    """The manifest's summary of findings/: the threshold, how many are flagged, the top one."""
    rows = read_rows(run, files["findings"], storage_options, ["method", "class", "kind", "score", "region", "flagged"])
    top = max(rows, key=lambda r: r["score"], default=None)
    entry = {"threshold": SCORE_THRESHOLD, "candidates": len(rows), "flagged": sum(bool(r["flagged"]) for r in rows),
             "top": top}
    try:
        entry.update(json.loads(storage.read_bytes(run.private("findings-error.json"), storage_options)))
    except FileNotFoundError:
        pass
    return entry


def run_files(run: Run, storage_options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per output, the run's files (relative to the output directory) and their sizes, listed once
    for the counts, the manifest and the bytes per row."""
    out = {}
    for name in OUTPUTS:
        fs, folder = storage.filesystem(run.folder(name), storage_options)
        fs.invalidate_cache()
        found = fs.glob(f"{folder}/*.parquet", detail=True)
        out[name] = {f"{run.relative(name)}/{path.rsplit('/', 1)[-1]}": int(info["size"])
                     for path, info in sorted(found.items())}
    return out


def count_outcomes(run: Run, methods: list[str], storage_options: dict[str, Any],
                   files: dict[str, dict[str, int]], incremental_run: bool = False) -> dict[str, dict[str, int]]:
    """Per method: records read (counted at the reader), rows explained and errors, from the
    files themselves; errors without a method (read, decode, preprocess, model) count
    against every method. An incremental run adds the pairs it skipped (already explained)."""
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
    for m in methods:
        if incremental_run or skipped.get(m):
            counts[m]["skipped"] = int(skipped.get(m, 0))
    return counts


def read_skipped(run: Run, storage_options: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(method, shard, pairs) an incremental run skipped there (already in the history)."""
    return [tuple(entry) for entry in json.loads(storage.read_bytes(run.private("skipped.json"), storage_options))]


def verify(plan: Plan, run: Run, files: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The counts from the files; a run whose counts do not reconcile is never published."""
    counts = count_outcomes(run, list(plan.methods), plan.storage_options, files, plan.work is not None)
    if not all(c["read"] == c["explained"] + c["errors"] + c.get("skipped", 0) for c in counts.values()):
        raise RuntimeError(f"counts do not reconcile (read != explained + errors + skipped): {counts}; "
                           "the previous results are left as they were")
    return counts


def build_manifest(plan: Plan, run: Run, started: str, counts: dict, sanity: dict | None,
                   files: dict[str, dict[str, int]]) -> dict:
    args = plan.args
    saliency_rows = sum(c["explained"] for c in counts.values())
    return {
        "run_id": run.run_id, "started": started, "finished": now(), "status": "succeeded",
        "layout": "run-folders",
        "command": ["saliency-audit", "run", *redact_argv(plan.argv)],
        "spec": manifest_entry(args, plan.beam_args),  # the resolved spec: file, then flags; secrets redacted
        "input": {"pattern": args.input, "shards": len(plan.shards)},
        "model": {"model": args.model, "weights": args.weights, "sha256": model_hashes(plan.config.model),
                  **worker_device_entry(plan.resolved, _worker_devices(run, plan.storage_options)),
                  "num_classes": plan.resolved["num_classes"]},
        "torch_threads": plan.resolved["torch_threads"],  # per worker process; per_process None: decided there
        "methods": {name: {**info, "options": recorded_method_options(info["options"])}
                    for name, info in plan.resolved["methods"].items()},
        "options": recorded_options(args),  # our own flags; Beam's are in spec.resolved.beam and beam_args
        "preprocessing": dataclasses.asdict(plan.prep),
        "conventions": {
            "explained_output": "logit of the target class (pre-softmax)",
            "score": "softmax probability of the target class",
            "channel_reduction": "sum over channels",
            "normalisation": "none: saliency holds raw values",
            "map_storage": map_storage.convention(args.map_dtype),
            "image_ids": ("unique per audit: a record whose id was already read from an earlier shard (in shard "
                          "order) or earlier in the same shard is an error (stage read), not explained twice"),
            "metrics": ("RISE deletion/insertion AUC of the target's softmax probability, pixels ranked by "
                        "signed map value (ties broken by the image's seed), substrate "
                        f"{args.metric_substrate!r}, {args.metric_steps} equal steps; "
                        "*_random: the same for a random order; gini: Gini index of |map|"
                        if args.metrics else "off (--no-metrics)"),
            "road": ("ROAD (Rong et al. 2022): target softmax probability after removing 1, 3, ..., 99% of the "
                     "pixels, most relevant first (road_morf_auc) and least relevant first (road_lerf_auc), "
                     "ties broken by the image's seed; removed pixels filled by noisy linear imputation "
                     "(8-neighbour weights 1/6 and 1/12, noise std 0.01 in model-input space); AUC = the "
                     "curve's mean height; road_gap = LeRF - MoRF" if args.road else "off (--road to compute it)"),
            "localisation": ("against the ground truth the shards carry (a KEY.mask.png or KEY.json member, a "
                             "mask or boxes column; see docs/ground_truth.md), at the model input's size: "
                             "pointing_game, relevance_mass (positive relevance only), relevance_rank; ties count "
                             "as a random pick among the tied pixels; null without ground truth"),
            "abele_metrics": (ABELE_CONVENTION.format(n=args.abele_neighbours) if args.abele_metrics
                              else "off (--abele-metrics to compute them)"),
            "seed": "first 32 bits of sha256('{--seed}:{image_id}')",
        },
        "runner": runner_name(plan.beam_args),
        "beam_args": redact_argv(plan.beam_args),
        "versions": package_versions(),
        "counts": counts,
        "reconciled": True,
        "incremental": plan.work.entry(run.run_id) if plan.work is not None else None,
        "sanity": sanity,
        "findings": findings_entry(run, plan.storage_options, files),
        "model_calls": model_calls_entry(run, plan.storage_options, counts),
        "outputs": run.relative_outputs(OUTPUTS),
        "files": {name: list(sizes) for name, sizes in files.items()},
        "map_bytes_per_row": round(sum(files["saliency"].values()) / saliency_rows, 1) if saliency_rows else None,
    }


def model_calls_entry(run: Run, storage_options: dict[str, Any], counts: dict) -> dict:
    """What the model was asked (forward calls through its root module, and the images they
    carried): per method for its explanations alone, and in all (predictions and metrics too);
    for an endpoint, its HTTP requests and retries. The cost of a black box, per image explained."""
    try:
        rows = json.loads(storage.read_bytes(run.private("model-calls.json"), storage_options))
    except FileNotFoundError:
        return {"counted": False}
    found = {key: (calls, images) for key, calls, images in rows}
    explained = sum(c["explained"] for c in counts.values()) // max(1, len(counts))
    entry: dict[str, Any] = {"counted": NOT_COUNTED not in found}
    if HTTP in found:
        entry["http"] = {"requests": found[HTTP][0], "retries": found[HTTP][1]}
    if not entry["counted"]:  # TorchScript modules take no hook
        return entry
    entry["methods"] = {}
    for method, c in counts.items():
        calls, images = found.get(method, (0, 0))
        entry["methods"][method] = {"calls": calls, "images": images,
                                    "images_per_image": round(images / c["explained"], 1) if c["explained"] else None}
    if ALL in found:
        calls, images = found[ALL]
        entry["all"] = {"calls": calls, "images": images,
                        "images_per_image": round(images / explained, 1) if explained else None}
    return entry


def _worker_devices(run: Run, storage_options: dict[str, Any]) -> list[str]:
    """The devices the explain step ran on, as the workers reported them."""
    return json.loads(storage.read_bytes(run.private("devices.json"), storage_options))


def run(argv: list[str] | None = None) -> dict:
    """Run the audit; returns the manifest. Raises UsageError for bad invocations.

    Phases: plan (checks, preflight, and for an incremental run what the history lacks), execute
    (the job, into this run's own folders), verify (the counts reconcile), publish (the manifest
    becomes the pointer, in one put), judge (the gates) and record (the history's row), reclaim
    (folders of runs that can no longer be the result). A failure before publishing leaves the
    previous result as it was and removes this run's files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_plan(plan(argv))[0]


def run_plan(audit_plan: Plan) -> tuple[dict, int]:
    """The phases after ``plan`` (see ``run``); returns the manifest and the gates' exit code."""
    started = now()
    current = Run(audit_plan.args.output, publication.new_run_id(), audit_plan.storage_options,
                  audit_plan.work.model if audit_plan.work is not None else None)
    stale_after = 60.0 * audit_plan.args.reclaim_after
    publication.reclaim(current.output, current.storage_options, stale_after, keep=current.run_id)
    try:
        with Heartbeat(current):
            sanity = execute(audit_plan, current)
            files = run_files(current, audit_plan.storage_options)
            counts = verify(audit_plan, current, files)
            manifest = build_manifest(audit_plan, current, started, counts, sanity, files)
            manifest["verdict"] = gates.VERDICT if gates.gated(audit_plan.args) else None  # see gates.judge_run
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
            decision["exit"], verdict = gates.judge_run(manifest, audit_plan.args, audit_plan.storage_options)
            if audit_plan.work is not None:
                gated = decision["exit"]
                decision["exit"] = FAILED  # published, not recorded: a scheduler must hear of it
                record(audit_plan, current, manifest, verdict)
                decision["exit"] = gated

    publication.publish(current, manifest, stale_after, after_pointer=judge_and_record)
    return manifest, decision["exit"]


def record(plan: Plan, run: Run, manifest: dict, verdict: dict | None) -> None:
    """An incremental run's row in the audit history (transforms.history): it becomes the slot's run."""
    files = manifest["files"]
    summary = read_rows(run, files["summary"], plan.storage_options)
    findings = read_rows(run, files["findings"], plan.storage_options, ["method", "score"])
    errors = read_rows(run, files["errors"], plan.storage_options, ["source", "method"])
    skipped = {(method, shard): n for method, shard, n in read_skipped(run, plan.storage_options)}
    row = incremental.row(plan.work, manifest, verdict, summary, findings, errors, skipped)
    url = history.record(run.output, row, plan.storage_options)
    log.info("recorded run %s as slot %s of the history (%s)", run.run_id, row["slot"], url)


def shards_to_read(plan: Plan) -> list[str]:
    """The shards the job reads: all, or for an incremental run those the history lacks."""
    return plan.shards if plan.work is None else [url for url in plan.shards if url in plan.work.needed]


def count_records(plan: Plan) -> int:
    """Records the job would read (shards read, nothing decoded), with --limit-per-shard."""
    total = 0
    for url in shards_to_read(plan):
        records = read_shard(url, plan.storage_options, max_pixels=plan.prep.max_pixels)
        total += sum(1 for _ in itertools.islice(records, plan.args.limit_per_shard))
    return total


def calibrate(plan: Plan, images: int = 8) -> dict[str, float]:
    """Seconds per image on this machine, on the first decodable images, after a warm-up: each
    method's own cost (its metrics included) and, under None, the per-batch work every method
    shares (the forward pass and the random-order reference of the metrics)."""
    import copy
    from pipelines.sanity import sample_images
    from transforms.explain import apply_threads
    ids, pixels, labels = sample_images(plan.shards, plan.prep, plan.storage_options, images)
    if not ids:
        return {}
    apply_threads(plan.config.threads.resolve())  # as one worker process of the run would
    loaded = build_explainers(plan.config)

    def seconds(methods: dict, n: int = len(ids)) -> float:
        batch = ImageBatch(ids[:n], ["calibration"] * n, labels[:n], [tuple(pixels.shape[2:])] * n,
                           pixels[:n].numpy())
        step = ExplainBatches(dataclasses.replace(plan.config, methods=methods), shared.Shared())
        # The step runs every explainer its state holds, so it gets only the measured ones
        # (with all of them, every figure was the cost of all the methods).
        step._state = copy.copy(loaded)
        step._state.explainers = {name: loaded.explainers[name] for name in methods}
        start = time.perf_counter()
        list(step.process(batch))
        return (time.perf_counter() - start) / n

    seconds(plan.methods, 1)  # warm-up: first calls allocate and compile (one image is enough)
    shared_cost = seconds({})
    out: dict[str | None, float] = {name: max(0.0, seconds({name: options}) - shared_cost)
                                    for name, options in plan.methods.items()}
    out[None] = shared_cost
    return out


def print_plan(plan: Plan) -> None:
    """``run --dry-run``: what the job would do and about how long it would take here."""
    records = count_records(plan)
    seconds = calibrate(plan)
    print(f"input: {plan.args.input}: {len(plan.shards)} shard(s), {records} record(s)"
          + (f" (at most {plan.args.limit_per_shard} per shard)" if plan.args.limit_per_shard else "")
          + (f" in the {len(plan.work.needed)} shard(s) to read" if plan.work is not None else ""))
    if plan.work is not None:
        work = plan.work
        print(f"incremental: model {work.model[:12]}, slot {work.slot or '(a new one)'}"
              + (f" (replaces run {work.replaces})" if work.replaces else "") + f"; {len(work.runs)} recorded run(s) "
              f"of this model count; {len(work.skipped_shards)} shard(s) skipped (every method explained them), "
              f"{len(work.needed)} to read; images the history holds are skipped there too, so the estimate is "
              f"an upper bound")
    print(f"model: {plan.args.model} on {plan.resolved['device']}, {plan.resolved['num_classes']} classes; "
          f"batch size {plan.args.batch_size}; metrics {'on' if plan.args.metrics else 'off'}")
    print(f"{'method':>12}  {'passes / image':>16}  {'s / image':>10}  {'estimate':>10}")
    total = seconds.get(None, 0.0) * records
    for name, info in plan.resolved["methods"].items():
        passes = "+".join(str(v) for v in info["passes"].values()) if isinstance(info["passes"], dict) \
            else str(info["passes"])
        per_image = seconds.get(name)
        estimate = per_image * records if per_image is not None else None
        total += estimate or 0.0
        print(f"{name:>12}  {passes:>16}  {per_image if per_image is not None else float('nan'):>10.4f}  "
              f"{_duration(estimate):>10}")
    print(f"{'(shared)':>12}  {'1+0':>16}  {seconds.get(None, float('nan')):>10.4f}  "
          f"{_duration(seconds.get(None, 0.0) * records):>10}")
    print(f"estimated time: {_duration(total)} in one process on this machine (calibrated on "
          f"{min(8, records)} image(s); the sanity check and reading are extra). Nothing was run (--dry-run).")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # Beam configured it on import
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        audit_plan = plan(argv)
        if audit_plan.args.dry_run:
            print_plan(audit_plan)
            return 0
        manifest, code = run_plan(audit_plan)
    except UsageError as e:
        print(f"saliency-audit: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # 3, not Python's 1: a scheduler must tell "nothing published" from "a gate failed"
        log.exception("saliency-audit: the run failed; nothing was published and the previous result stands")
        return FAILED
    out = manifest["options"]["output"]
    for method, c in manifest["counts"].items():
        print(f"{method:>10}: read {c['read']}, explained {c['explained']}, errors {c['errors']}"
              + (f", skipped {c['skipped']} (already in the history)" if "skipped" in c else ""))
    print(f"outputs in {out} ({', '.join(manifest['outputs'].values())}, manifest.json)")
    return code  # the gates': 0 when no gates are set


if __name__ == "__main__":
    sys.exit(main())
