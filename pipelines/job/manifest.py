"""The manifest: what a published run records (options, model, counts, conventions, files) and
the run's tables read back for it."""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from importlib import metadata
from typing import Any, Iterable

import pyarrow.parquet as pq

from saliency_audit.pipelines.checks.findings import SCORE_THRESHOLD
from saliency_audit.explainers.metrics import metric_classes
from saliency_audit.pipelines.config.options import recorded_method_options, recorded_options, redact_argv
from saliency_audit.pipelines.config.spec import manifest_entry
from saliency_audit.pipelines.job.plan import Plan
from saliency_audit.pipelines.job.preflight import worker_device_entry
from saliency_audit.pipelines.runners.beam import runner_name
from saliency_audit.transforms.io import map_storage, publication, storage
from saliency_audit.transforms.io.publication import Run
from saliency_audit.transforms.model.handler import ALL, COMPILE, HTTP, NOT_COUNTED
from saliency_audit.transforms.model.load import model_hashes

OUTPUTS = publication.OUTPUTS  # sanity: empty unless --sanity-check


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


def metric_conventions(options) -> dict[str, str]:
    """Each metric's convention under its switch's name (or its own), or how to turn it on or off."""
    settings = vars(options)
    out = {}
    for cls in metric_classes():
        if cls.enabled(settings):
            out[cls.switch or cls.name] = cls(settings).convention()
            continue
        switch = next(o for o in cls.options if o.name == cls.switch)
        turn_on = f"--no-{switch.flag_name[2:]}" if switch.default else f"{switch.flag_name} to compute it"
        out[cls.switch] = f"off ({turn_on})"
    return out


def build_manifest(plan: Plan, run: Run, started: str, counts: dict, sanity: dict | None,
                   files: dict[str, dict[str, int]]) -> dict:
    args = plan.options
    saliency_rows = sum(c["explained"] for c in counts.values())
    return {
        "run_id": run.run_id, "started": started, "finished": now(), "status": "succeeded",
        "layout": "run-folders",
        "command": ["saliency-audit", "run", *redact_argv(plan.argv)],
        "spec": manifest_entry(args, plan.beam_args),  # the resolved spec: file, then flags; secrets redacted
        "input": {"pattern": args.input, "shards": len(plan.shards)},
        "model": {"model": args.model, "weights": args.weights, "sha256": model_hashes(plan.config.model),
                  **worker_device_entry(plan.resolved, _worker_devices(run, plan.storage_options)),
                  "num_classes": plan.resolved["num_classes"], **plan.resolved.get("model_loading", {})},
        "torch_threads": plan.resolved["torch_threads"],  # per worker process; per_process None: decided there
        "execution": execution_entry(plan, run),  # precision, compile, batch sizes; per method in "methods"
        "methods": {name: {**info, "options": recorded_method_options(info["options"])}
                    for name, info in plan.resolved["methods"].items()},
        # the metrics' forward passes per image at the model input's size (preflight's sample), beside the methods'
        "metric_passes": plan.resolved.get("metrics"),
        "options": recorded_options(args),  # our own flags; Beam's are in spec.resolved.beam and beam_args
        "preprocessing": {**dataclasses.asdict(plan.prep), "sources": plan.prep_sources},
        "conventions": {
            "explained_output": "logit of the target class (pre-softmax)",
            "score": "softmax probability of the target class",
            "channel_reduction": "sum over channels",
            "normalisation": "none: saliency holds raw values",
            "map_storage": map_storage.convention(args.map_dtype),
            "image_ids": ("unique per audit: a record whose id was already read from an earlier shard (in shard "
                          "order) or earlier in the same shard is an error (stage read), not explained twice"),
            **metric_conventions(plan.options),
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


def execution_entry(plan: Plan, run: Run) -> dict[str, Any]:
    """How the model ran: the precision (as requested, and as the maps were made: tf32 off CUDA is
    fp32), --compile and whether a worker fell back to eager, the reader's batch size, and each
    method's smallest batch after running out of memory (the workers' side output)."""
    try:
        adapted = json.loads(storage.read_bytes(run.private("adapted.json"), plan.storage_options))
    except FileNotFoundError:
        adapted = {}
    return {"precision_requested": plan.options.precision, "precision": plan.resolved.get("precision"),
            "compile": plan.options.compile, "compile_failed": adapted.pop(COMPILE, None),
            "batch_size_requested": plan.options.batch_size, "batch_size": plan.resolved.get("batch_size"),
            "batch_sizes_after_out_of_memory": adapted}


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
