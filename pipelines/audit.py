"""The audit job: image shards -> saliency, summary and errors in Parquet, plus a manifest.

    python -m pipelines.audit --input 'shards/*.tar' --model m.pt --methods sal,intg --output out/
is the same as ``saliency-audit run ...`` (the form Dataflow and Flink launchers use).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import sys
import uuid
from importlib import metadata
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.utils import shared

from explainers import list_methods
from pipelines.options import UsageError, parse_run_args
from pipelines.preflight import preflight
from pipelines.sanity import run_sanity_check
from transforms import storage
from transforms.abele_protocol import AbeleProtocol
from transforms.batching import ERRORS, READ, ReadShardBatches
from transforms.explain import ExplainBatches, ExplainConfig
from transforms.models import ModelSpec, model_hashes
from transforms.parquet_sink import WriteParquet, write_empty_if_missing
from transforms.preprocess import Preprocessing
from transforms.rows import ERROR_SCHEMA, SUMMARY_SCHEMA, saliency_schema
from transforms.summary import Summarize

log = logging.getLogger("saliency_audit")
ABELE_CONVENTION = (
    "ABELE's protocol (methods.md 15.1): relevance_V = label-flip rate averaged over the percentiles "
    "min,5,...,95,max as pixels below each percentile of the map become pixel value V (0, 127, 255); "
    "relevance_curve = the 3 x 21 flips, fill-major; stability_* = mean/max Lipschitz ratio against "
    "{n} salt-and-pepper copies (1/11 + 1/11) that keep the label; coherence_* = the same against up "
    "to {n} nearest images of the same batch with the same target and predicted class (null if none)")
OUTPUTS = ("saliency", "summary", "errors")
OPTIONAL_OUTPUTS = ("sanity",)  # published (empty when not asked for) so no stale result outlives a rerun


def redact(argv: list[str]) -> list[str]:
    """The command line for the manifest, with the value of --storage-options (keys, tokens)
    replaced."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append("<redacted>")
        elif arg.startswith("--storage-options="):
            out.append("--storage-options=<redacted>")
        else:
            out.append(arg)
        hide = arg == "--storage-options"
    return out


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


def beam_pipeline_options(beam_args: list[str]) -> tuple[PipelineOptions, Any]:
    """Pipeline options and the runner. DirectRunner is pinned to Beam's in-process
    FnApiRunner: the stock DirectRunner first tries Prism, which downloads a binary."""
    options = PipelineOptions(beam_args)
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return options, FnApiRunner()
    return options, runner_name


def build_pipeline(p: beam.Pipeline, *, shards: list[str], staging: str, config: ExplainConfig,
                   prep: Preprocessing, batch_size: int, output_files: int,
                   storage_options: dict[str, Any], limit_per_shard: int | None = None) -> None:
    batched = (p
               | "Shards" >> beam.Create(shards)
               | "SpreadShards" >> beam.Reshuffle()
               | "ReadAndBatch" >> beam.ParDo(ReadShardBatches(prep, batch_size, storage_options, limit_per_shard))
               .with_outputs(ERRORS, READ, main="batches"))
    explained = (batched.batches
                 | "SpreadBatches" >> beam.Reshuffle()
                 | "Explain" >> beam.ParDo(ExplainBatches(config, shared.Shared())).with_outputs(ERRORS, main="rows"))
    rows = explained.rows
    schema = saliency_schema(config.methods)
    rows | "WriteSaliency" >> WriteParquet(storage.join(staging, "saliency"), schema, num_files=output_files,
                                           sort_by=["image_id", "method"], storage_options=storage_options)
    (rows | "Summarize" >> Summarize()
     | "WriteSummary" >> WriteParquet(storage.join(staging, "summary"), SUMMARY_SCHEMA, key="method",
                                      sort_by=["method", "target"], storage_options=storage_options))
    ((batched.errors, explained.errors) | "AllErrors" >> beam.Flatten()
     | "ErrorRows" >> beam.Map(dataclasses.asdict)
     | "WriteErrors" >> WriteParquet(storage.join(staging, "errors"), ERROR_SCHEMA, num_files=output_files,
                                     sort_by=["image_id", "stage", "method"], storage_options=storage_options))
    (batched[READ] | "CountRead" >> beam.CombineGlobally(sum)
     | "WriteReadCount" >> beam.Map(lambda n: storage.write_json_atomic(
         storage.join(staging, "_read.json"), {"read": n}, storage_options)))


def count_outcomes(staging: str, methods: list[str], storage_options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per method: records read (counted at the reader), rows explained and errors, from the
    files themselves; errors without a method (read, decode, preprocess, model) count
    against every method."""
    read = json.loads(storage.read_bytes(storage.join(staging, "_read.json"), storage_options))["read"]

    def method_column(name):
        fs, path = storage.filesystem(storage.join(staging, name), storage_options)
        values = []
        for file in sorted(fs.glob(f"{path}/*.parquet")):
            with fs.open(file, "rb") as f:
                values += pq.read_table(f, columns=["method"]).column("method").to_pylist()
        return values

    explained, errors = method_column("saliency"), method_column("errors")
    shared_errors = sum(1 for m in errors if m is None)
    return {m: {"read": read, "explained": explained.count(m), "errors": shared_errors + errors.count(m)}
            for m in methods}


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


def run(argv: list[str] | None = None) -> dict:
    """Run the audit; returns the manifest. Raises UsageError for bad invocations."""
    args, beam_args = parse_run_args(sys.argv[1:] if argv is None else argv)
    started, run_id = now(), uuid.uuid4().hex[:12]
    storage_options = args.storage_options
    methods = parse_methods(args.methods, args.method_options, args.aae, args.storage_options)
    try:
        prep = Preprocessing(resize=args.resize, channels=args.channels, mean=args.mean, std=args.std,
                             to_grayscale=args.to_grayscale, max_pixels=args.max_pixels)
        shards = storage.expand_glob(args.input, storage_options)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    spec = ModelSpec(args.model, args.weights, args.trust_model, storage_options or None)
    config = ExplainConfig(model=spec, methods=methods, device=args.device, target=args.target, seed=args.seed,
                           metrics=args.metrics, metric_steps=args.metric_steps,
                           metric_substrate=args.metric_substrate,
                           abele=AbeleProtocol(args.abele_neighbours, prep.mean, prep.std)
                           if args.abele_metrics else None)
    resolved = preflight(config, shards, prep, storage_options)  # fails fast, before the job
    output_files = args.output_files or min(len(shards), 256)

    staging = storage.join(args.output, f"_staging-{run_id}")
    options, runner = beam_pipeline_options(beam_args)
    log.info("run %s: %d shard(s), methods %s, runner %s", run_id, len(shards), ",".join(methods), runner)
    try:
        with beam.Pipeline(runner=runner, options=options) as p:
            build_pipeline(p, shards=shards, staging=staging, config=config, prep=prep,
                           batch_size=args.batch_size, output_files=output_files, storage_options=storage_options,
                           limit_per_shard=args.limit_per_shard)
        write_empty_if_missing(storage.join(staging, "saliency"), saliency_schema(methods), storage_options)
        write_empty_if_missing(storage.join(staging, "summary"), SUMMARY_SCHEMA, storage_options)
        write_empty_if_missing(storage.join(staging, "errors"), ERROR_SCHEMA, storage_options)
        sanity = run_sanity_check(config, shards, prep, staging, images=args.sanity_images,
                                  threshold=args.sanity_threshold,
                                  storage_options=storage_options) if args.sanity_check else None
        counts = count_outcomes(staging, list(methods), storage_options)
        storage.publish(staging, args.output, [*OUTPUTS, *OPTIONAL_OUTPUTS], storage_options)
    finally:
        storage.remove_tree(staging, storage_options)

    reconciled = all(c["read"] == c["explained"] + c["errors"] for c in counts.values())
    manifest = {
        "run_id": run_id, "started": started, "finished": now(),
        "status": "succeeded" if reconciled else "counts_do_not_reconcile",
        "command": ["saliency-audit", "run", *redact(sys.argv[1:] if argv is None else argv)],
        "input": {"pattern": args.input, "shards": len(shards)},
        "model": {"model": args.model, "weights": args.weights, "sha256": model_hashes(spec),
                  "device": resolved["device"], "num_classes": resolved["num_classes"]},
        "methods": resolved["methods"],
        "options": {k: v for k, v in vars(args).items() if k not in ("storage_options",)},
        "preprocessing": dataclasses.asdict(prep),
        "conventions": {
            "explained_output": "logit of the target class (pre-softmax)",
            "score": "softmax probability of the target class",
            "channel_reduction": "sum over channels",
            "normalisation": "none: saliency holds raw values",
            "metrics": ("RISE deletion/insertion AUC of the target's softmax probability, pixels ranked by "
                        "signed map value (ties broken by the image's seed), substrate "
                        f"{args.metric_substrate!r}, {args.metric_steps} equal steps; "
                        "*_random: the same for a random order; gini: Gini index of |map|"
                        if args.metrics else "off (--no-metrics)"),
            "abele_metrics": (ABELE_CONVENTION.format(n=args.abele_neighbours) if args.abele_metrics
                              else "off (--abele-metrics to compute them)"),
            "seed": "first 32 bits of sha256('{--seed}:{image_id}')",
        },
        "runner": str(runner if isinstance(runner, str) else type(runner).__name__),
        "beam_args": beam_args,
        "versions": package_versions(),
        "counts": counts,
        "reconciled": reconciled,
        "sanity": sanity,
        "outputs": {name: f"{name}/" for name in (*OUTPUTS, *(("sanity",) if sanity else ()))},
    }
    storage.write_json_atomic(storage.join(args.output, "manifest.json"), manifest, storage_options)
    if not reconciled:
        raise RuntimeError(f"counts do not reconcile (read != explained + errors): {counts}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        manifest = run(argv)
    except UsageError as e:
        print(f"saliency-audit: error: {e}", file=sys.stderr)
        return 2
    out = manifest["options"]["output"]
    for method, c in manifest["counts"].items():
        print(f"{method:>10}: read {c['read']}, explained {c['explained']}, errors {c['errors']}")
    print(f"outputs in {out} ({', '.join(manifest['outputs'].values())}, manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
