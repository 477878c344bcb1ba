"""Checks made before a job starts, so that a bad run fails in seconds with one clear line
instead of on the workers: the model loads, takes the preprocessed images, and every
method runs on a real sample image with its options. A method that cannot explain the model at
all (UnsupportedModel: the relevance rules on a transformer, attention methods on a CNN) is
refused with one line per such method, naming why and what to use instead.

On a runner whose workers run elsewhere (Dataflow, a Flink or Spark cluster, a remote job
server or Dask scheduler) the launcher checks what it can on its own CPU and leaves the
worker device to the workers; a model's code must then be something the workers can import."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import logging
import time
from typing import Any, Iterable

import torch

from saliency_audit.explainers.core.base import UnsupportedModel
from saliency_audit.explainers.metrics import enabled_metrics, metric_costs, metric_forward_passes
from saliency_audit.pipelines.config.options import UsageError
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess
from saliency_audit.transforms.io.readers import SHARD_SUFFIXES, read_shard, shard_kind
from saliency_audit.transforms.io.records import RawImage, seed_for
from saliency_audit.transforms.model.fitting import largest_fitting
from saliency_audit.transforms.model.handler import ExplainConfig, build_explainers, runs_compiled
from saliency_audit.transforms.model.load import (
    BINARY_LOGIT,
    PROBABILITIES,
    ModelLoadError,
    ModelSpec,
    check_device_name,
    device_available,
    loading_entry,
    resolve_device,
    state_sha256,
)
from saliency_audit.transforms.model.precision import effective_precision, precision_problem
from saliency_audit.transforms.model.targets import TargetError, check_classes, parse_targets
from saliency_audit.transforms.model.threads import ThreadBudget, is_small_image

SAMPLE_SEARCH = 64  # records looked at to find one decodable sample image
# A method whose first explanation of the sample image took less is timed again, warm, for the
# estimate the run is held to (docs/performance.md); a slower one's first call is its estimate.
WARM_TIMING_S = 2.0
log = logging.getLogger("saliency_audit")
LOCAL_MASTERS = ("[local]", "[auto]")  # Flink: an embedded cluster in the launcher's process tree
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# Beam options that ship code to the workers (or a worker image that may hold it).
SHIPPING_OPTIONS = ("extra_packages", "setup_file", "requirements_file", "sdk_container_image")


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where the model runs. ``requested``: --device as given; ``check``: where preflight runs
    on this launcher; ``worker``: the device recorded for the workers until they report theirs
    (the requested one on a remote runner, which the workers resolve themselves; the launcher's
    resolved device otherwise, since the workers run here); ``remote``: the workers run elsewhere."""

    requested: str
    check: str
    worker: str
    remote: bool


def _runner_options(beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions
    return PipelineOptions(beam_args)


def runner_short_name(beam_args: list[str]) -> str:
    """``dataflow``, ``flink``, ``direct``... from --runner (a name or a dotted class path)."""
    from apache_beam.options.pipeline_options import StandardOptions
    runner = _runner_options(beam_args).view_as(StandardOptions).runner or "DirectRunner"
    name = runner.rsplit(".", 1)[-1].lower()
    return name[:-len("runner")] if name.endswith("runner") and name != "runner" else name


def _dask_address(beam_args: list[str]) -> str | None:
    """--dask_client_address or --dask_scheduler_file (parsed here: Beam registers the Dask
    options only once apache_beam.runners.dask is imported)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--dask_client_address")
    parser.add_argument("--dask_scheduler_file")
    known, _ = parser.parse_known_args(beam_args)
    return known.dask_client_address or known.dask_scheduler_file


def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0] if ":" in address else address
    return host in LOOPBACK_HOSTS


def workers_are_remote(beam_args: list[str]) -> bool:
    """Whether the runner's workers may run on other machines than this launcher, so that its
    devices say nothing about theirs. DirectRunner, Prism, an embedded Flink and
    ``--job_endpoint=embed`` run their workers here; Dataflow, a Flink or Spark master, any other
    job endpoint (a port-forwarded one included) and a non-local Dask scheduler do not."""
    from apache_beam.options.pipeline_options import PortableOptions
    name = runner_short_name(beam_args)
    options = _runner_options(beam_args).get_all_options(drop_default=True, retain_unknown_options=True)
    if name in ("dataflow", "testdataflow"):
        return True
    if name == "flink":
        return options.get("flink_master", "[auto]") not in LOCAL_MASTERS
    if name == "spark":
        return not str(options.get("spark_master_url", "local[4]")).startswith("local")
    if name == "dask":
        address = _dask_address(beam_args)
        return address is not None and not _is_loopback(address)
    if name == "portable":
        endpoint = _runner_options(beam_args).view_as(PortableOptions).job_endpoint
        return endpoint not in (None, "embed")
    return False


def worker_processes(beam_args: list[str]) -> int:
    """SDK worker processes the runner starts on each machine (0: one per core), which share its
    cores: DirectRunner's --direct_num_workers in multi_processing mode (its other modes run
    one process, whose bundles take turns on the model), Dataflow's one per vCPU unless
    ``no_use_multiple_sdk_containers``, and --sdk_worker_parallelism on portable runners (Flink,
    Spark; 0 lets the runner choose, taken as one per core). A Dask worker uses its own threads."""
    from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PortableOptions
    options = _runner_options(beam_args)
    name = runner_short_name(beam_args)
    if name in ("direct", "fnapi"):
        direct = options.view_as(DirectOptions)
        return direct.direct_num_workers if direct.direct_running_mode == "multi_processing" else 1
    if name in ("dataflow", "testdataflow"):
        return 1 if "no_use_multiple_sdk_containers" in (options.view_as(DebugOptions).experiments or []) else 0
    if name == "dask":
        return 1
    try:  # Beam types it as a string
        return max(0, int(options.view_as(PortableOptions).sdk_worker_parallelism or 0))
    except ValueError:
        return 0


def thread_budget(torch_threads: int | None, beam_args: list[str], small_images: bool = False) -> ThreadBudget:
    """--torch-threads (None: auto) with the runner's worker processes per machine; ``small_images``:
    preflight's sample image is small (auto: one torch thread, transforms.model.threads)."""
    return ThreadBudget(torch_threads, worker_processes(list(beam_args)), small_images)


def threads_entry(budget: ThreadBudget, beam_args: list[str], remote: bool) -> dict[str, Any]:
    """The manifest's record of the torch threads: per worker process as resolved here, or None
    where auto is resolved on the workers (remote ones, from their own cores; Dask workers, from
    their threads)."""
    # auto on small images is one thread wherever the workers run
    local = budget.threads is not None or budget.small_images or not (remote or runner_short_name(beam_args) == "dask")
    return {"requested": "auto" if budget.threads is None else budget.threads,
            "worker_processes": budget.processes, "small_images": budget.small_images,
            "per_process": budget.resolve() if local else None}


def plan_devices(requested: str, beam_args: list[str]) -> Devices:
    """The launcher's check device and the device recorded for the workers. A device missing
    here fails (ModelLoadError) unless the workers run elsewhere."""
    check_device_name(requested)
    remote = workers_are_remote(beam_args)
    if remote and not device_available(requested):
        log.info("--device %s is not available on this launcher: preflight runs on its CPU and the "
                 "workers of the %s runner use their own %s device", requested, runner_short_name(beam_args),
                 requested)
        return Devices(requested, "cpu", requested, True)
    local = str(resolve_device(requested))
    return Devices(requested, local, requested if remote else local, remote)


def _shipping_options(beam_args: list[str]) -> list[str]:
    options = _runner_options(beam_args).get_all_options(drop_default=True, retain_unknown_options=True)
    return [f"--{name}" for name in SHIPPING_OPTIONS if options.get(name)]


def check_model_shipping(spec: ModelSpec, beam_args: list[str], remote: bool) -> None:
    """A ``module:Callable`` model must be importable on remote workers: its module belongs to an
    installed distribution (which the worker image or --requirements_file provides), or code is
    shipped (--extra_package, --setup_file, --requirements_file, --sdk_container_image).
    Model files (TorchScript, .pt2) carry no code and always pass."""
    if not remote or not spec.is_callable() or _shipping_options(beam_args):
        return
    top = spec.model.partition(":")[0].split(".", 1)[0]
    if top in importlib.metadata.packages_distributions():
        return
    raise UsageError(
        f"--model {spec.model}: module {top!r} is not part of an installed distribution, so the "
        f"{runner_short_name(beam_args)} workers cannot import it; ship it with --extra_package DIST.whl, "
        "--setup_file ./setup.py or --requirements_file, bake it into --sdk_container_image, or export "
        "the model to a TorchScript or .pt2 file")


def worker_device_entry(resolved: dict[str, Any], worker_devices: Iterable[str] | None) -> dict[str, Any]:
    """The manifest's model device fields: ``device`` is what the workers used (the one device
    they reported, or several joined by ","), else the device recorded before the run;
    ``device_requested`` is --device; ``device_check`` where preflight ran on the launcher."""
    seen = sorted(set(worker_devices or ()))
    return {"device": ",".join(seen) if seen else resolved["device"],
            "device_requested": resolved["device_requested"], "device_check": resolved["device_check"],
            "worker_devices": seen}


def check_shards(shards: list[str], pattern: str | None = None) -> list[str]:
    """The shards to read: all of them when at least one has a supported type (the others then
    become one errors/ row each, so they are counted); a UsageError when none has."""
    supported = [url for url in shards if _is_shard(url)]
    if not supported:
        found = sorted({_suffix(url) for url in shards})
        listed = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        from saliency_audit.transforms.io.storage import shown
        raise UsageError(f"no image shards among the {len(shards)} file(s) matching {shown(pattern or '--input')} "
                         f"(found: {listed}); supported: {', '.join(SHARD_SUFFIXES)}")
    return shards


def _is_shard(url: str) -> bool:
    try:
        shard_kind(url)
    except ValueError:
        return False
    return True


def _suffix(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else "(no extension)"


def check_target(target: str, num_classes: int) -> None:
    """A class index the model does not have, or a topN beyond its classes, would only fill
    errors/; refuse it up front."""
    try:
        check_classes(parse_targets(target), num_classes)
    except TargetError as e:
        raise UsageError(str(e)) from None


def first_sample(shards: list[str], prep: Preprocessing, storage_options: dict) -> tuple[str, torch.Tensor] | None:
    """The first image of the first shards that decodes and preprocesses, or None where none of the
    SAMPLE_SEARCH records looked at does. Where those were every record of the input and some failed,
    the input cannot be read at all: UsageError with the first reason (a run would only fill errors/,
    and exit 0 as if it had audited something)."""
    readable = [url for url in shards if _is_shard(url)][:4]
    records = itertools.chain.from_iterable(read_shard(url, storage_options, max_pixels=prep.max_pixels)
                                            for url in readable)
    looked, problem = 0, None
    for record in itertools.islice(records, SAMPLE_SEARCH):
        looked += 1
        if isinstance(record, RawImage):
            try:
                return record.image_id, torch.from_numpy(preprocess(decode(record, prep.max_pixels), prep))[None]
            except BadImage as e:
                problem = problem or f"{record.image_id} ({e.stage}): {e}"
        else:
            problem = problem or f"{record.image_id} ({record.stage}): {record.reason}"
    if problem and looked < SAMPLE_SEARCH and len(readable) == len(shards):
        raise UsageError(f"no image of the input can be read: {looked} record(s), the first {problem}")
    return None


def metric_cost_entry(settings: dict[str, Any], size: tuple[int, int], methods: dict[str, dict]) -> dict[str, Any]:
    """The metrics' cost per image (and target) on model inputs of ``size``: each one's passes
    (explainers.metrics' Metric.passes) and their forward passes all together beside the methods'
    (``methods``: the report's entries, with their passes). The plan prints it, the manifest keeps it."""
    costs = metric_costs(settings, *size)
    forwards = [info["passes"].get("forward", 0) for info in methods.values()]
    return {"image_size": list(size), "passes": costs, "forward_passes": metric_forward_passes(costs, forwards),
            "methods_forward_passes": sum(forwards)}


def check_metrics(config: ExplainConfig, size: tuple[int, int], image_id: str) -> None:
    """Each metric the run turns on, on model inputs of the sample image's size: a setting it cannot
    run with would fail on every image, after the job started."""
    for metric in enabled_metrics(config.settings):
        problem = metric.check(*size)
        if problem:
            raise UsageError(f"{problem} (sample image {image_id})")


def check_forward_only(spec: ModelSpec, methods: list[str], sanity_check: bool) -> None:
    """A black box (an ONNX file, an endpoint) answers forward passes only: the methods that need
    its gradients, and the sanity check (which randomises its layers), fail here in one line."""
    if not spec.is_black_box():
        return
    from saliency_audit.explainers import list_methods
    from saliency_audit.explainers.core.registry import explainer_class
    needing = [m for m in methods if explainer_class(m).needs_gradients]
    if needing:
        able = [m for m in list_methods() if not explainer_class(m).needs_gradients]
        raise UsageError(f"method(s) {', '.join(needing)} need gradients of the model, and {spec.model} (a black box: "
                         f"an ONNX file or an endpoint) answers forward passes only; the methods that need only its answers: {', '.join(able)}")
    if sanity_check:
        raise UsageError(f"--sanity-check randomises the model's layers one by one, which a black box "
                         f"({spec.model}) does not expose; audit its torch source for the sanity check")


def preflight(config: ExplainConfig, shards: list[str], prep: Preprocessing,
              storage_options: dict[str, Any], beam_args: list[str] | None = None,
              auto_batch: bool = False) -> dict[str, Any]:
    """Checks the run on this launcher; ``beam_args`` (the runner's options) decide whether the
    worker device is checked here or left to remote workers. ``auto_batch`` (--batch-size auto):
    each method's batch, found on copies of the sample image (transforms.model.fitting)."""
    check_shards(shards)  # before the model loads: nothing to audit is the cheaper finding
    beam_args = list(beam_args or [])
    try:
        devices = plan_devices(config.device, beam_args)
        check_model_shipping(config.model, beam_args, devices.remote)
        problem = precision_problem(config.precision, devices.check, config.model.is_black_box())
        if problem:
            raise UsageError(problem)
        # not compiled here: compiling takes minutes, and the workers compile their own model
        loaded = build_explainers(dataclasses.replace(config, device=devices.check, compile=False))
    except ModelLoadError as e:
        raise UsageError(str(e)) from None
    except UnsupportedModel as e:
        raise UsageError(refusal(e)) from None
    except (ValueError, TypeError) as e:  # an explainer refused its options or the model
        raise UsageError(f"cannot set up the methods: {e}") from None
    report = {"device": devices.worker, "device_requested": devices.requested, "device_check": devices.check,
              "num_classes": None, "sample_image": None, "model_state_sha256": state_sha256(loaded.model),
              "model_loading": loading_entry(config.model, loaded.model),  # its form; a transformer's attention
              "torch_threads": threads_entry(thread_budget(config.threads.threads, beam_args), beam_args,
                                             devices.remote),
              "precision": effective_precision(config.precision, devices.worker),  # as the fingerprints see it
              "methods": {name: {"options": ex.options(), "signed": ex.signed, "passes": ex.passes(),
                                 "extras": dict(ex.extras), "control": ex.control, "caveats": dict(ex.caveats),
                                 "precision": effective_precision(config.precision, devices.worker, ex.autocast),
                                 "compiled": runs_compiled(name, config.compile)}
                          for name, ex in loaded.explainers.items()}}
    approximate = [name for name, ex in loaded.explainers.items()
                   if report["methods"][name]["precision"] not in ("fp32", *ex.agrees_at)]
    if approximate:
        log.warning("--precision %s: the maps of %s are not known to keep float32's ranking at this precision "
                    "(docs/performance.md); use fp32 where they must match an fp32 audit's",
                    report["precision"], ", ".join(approximate))
    sample = first_sample(shards, prep, storage_options)
    if sample is None:
        return report  # nothing decodable among the first records of a larger input: they reach errors/
    image_id, image = sample
    check_metrics(config, tuple(image.shape[-2:]), image_id)
    # auto's torch threads follow the images' size (the plan hands the workers the same budget)
    budget = thread_budget(config.threads.threads, beam_args, is_small_image(image.shape))
    report["torch_threads"] = threads_entry(budget, beam_args, devices.remote)
    image = image.to(loaded.device)
    graph_input = getattr(loaded.model, "input", None)  # an ONNX graph's own input spec
    problem = graph_input.problem(tuple(image.shape)) if graph_input is not None else None
    if problem:
        raise UsageError(f"{config.model.model} does not fit the images: {problem}")
    try:
        with torch.inference_mode():
            logits = loaded.model(image)
    except Exception as e:
        if getattr(e, "stage", None) == "model":  # an endpoint that does not answer: down now, so fail now
            raise UsageError(f"the model endpoint fails on sample image {image_id}: {e}") from None
        dtypes = parameter_dtypes(loaded.model)
        hint = (f"its parameters are {', '.join(dtypes)} and the job feeds float32 images (a reduced precision is "
                f"--precision's autocast): have the factory return model.float()" if dtypes
                else "check --channels/--resize")
        raise UsageError(f"the model rejects input of shape {list(image.shape)} (image {image_id}): "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}; {hint}") from None
    if not isinstance(logits, torch.Tensor):  # a tuple, a dict, a Hugging Face ModelOutput
        raise UsageError(f"the model must return one logits tensor [B,K], returned {type(logits).__name__}: "
                         f"have the factory wrap it so forward returns the logits alone (out[0], out['logits'] "
                         f"or out.logits)")
    if logits.dim() != 2:
        one = " (one value per image: for a sigmoid head's logit z, return z[:, None], which is read as two classes)"
        raise UsageError(f"the model must return logits [B,K], returned shape {list(logits.shape)}"
                         f"{one if logits.dim() == 1 else ''}")
    reading = output_reading(logits)
    if reading:
        unit = reading == BINARY_LOGIT and bool(((logits >= 0) & (logits <= 1)).all())
        log.warning("%s (sample image %s)%s", READING_WORDS[reading], image_id,
                    "; its value there lies in [0, 1]: if the head ends in a sigmoid, return the logit before it"
                    if unit else "")
        # the workers' model reads its outputs so (plan.py hands them the spec); this one too, from here on
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, outputs=reading))
        loaded = build_explainers(dataclasses.replace(config, device=devices.check, compile=False))
        report["model_loading"]["outputs"] = reading
        with torch.inference_mode():
            logits = loaded.model(image)
    report["num_classes"], report["sample_image"] = int(logits.shape[1]), image_id
    check_target(config.target, report["num_classes"])
    target = logits.argmax(dim=1)
    seeds = torch.tensor([seed_for(image_id, config.seed)])
    refused = []  # every method that cannot explain this model, so one run names them all
    threads = report["torch_threads"]["per_process"]
    for name, explainer in loaded.explainers.items():
        try:
            seconds = _seconds(lambda: explainer.explain(image, target, seeds), loaded.device)
        except UnsupportedModel as e:
            refused.append(refusal(e, name))
            continue
        except Exception as e:
            raise UsageError(f"method {name} fails on sample image {image_id}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if getattr(explainer, "layer_used", None):  # a default layer found by running the model (gradcam)
            report["methods"][name]["layer_used"] = explainer.layer_used
        if getattr(explainer, "layer_reshape", None):  # how a CAM read the layer: "tokens[1:] -> 14x14 grid"
            report["methods"][name]["layer_reshape"] = explainer.layer_reshape
        if getattr(explainer, "captured", None):  # what a transformer method read: attention layers, grid, rules
            report["methods"][name]["captured"] = explainer.captured
        report["methods"][name]["passes"] = explainer.passes()  # scorecam's: the channels of the layer it found
        if seconds < WARM_TIMING_S:  # the first call paid for warming up: time one more
            seconds = _seconds(lambda: explainer.explain(image, target, seeds), loaded.device, threads)
        # what the dry run prints as "explain ms" and the report holds the run's own time to
        report["methods"][name]["preflight_ms_per_image"] = round(1000 * seconds, 3)
    if refused:
        raise UsageError("\n".join(refused))
    report["metrics"] = metric_cost_entry(config.settings, tuple(image.shape[-2:]), report["methods"])
    if auto_batch:
        for name, explainer in loaded.explainers.items():
            report["methods"][name]["batch_size"] = largest_fitting(
                lambda n: explainer.explain(image.repeat(n, 1, 1, 1), target.repeat(n), seeds.repeat(n)),
                loaded.device)
    return report


READING_WORDS = {
    BINARY_LOGIT: "the model returns a single logit z per image (a sigmoid head): the job reads it as two classes' "
                  "logits (-z/2, z/2), class 1 the positive side with probability sigmoid(z), class 0 its complement "
                  "(its maps explain -z)",
    PROBABILITIES: "the model's outputs look like probabilities (non-negative, summing to 1): the job reads their logs "
                   "as the logits, so the maps explain log-probabilities; export the logits to explain those"}


def output_reading(logits: torch.Tensor) -> str | None:
    """How the job must read the sample image's outputs [B,K] to have logits of K >= 2 classes (load.READINGS):
    a single column is a sigmoid head's logit; probabilities (the softmax of them would flatten every score
    and metric: K=1000, all within 0.001 to 0.003) are read as their logs, whose softmax gives them back."""
    if logits.shape[1] == 1:
        return BINARY_LOGIT
    if bool((logits >= 0).all()) and float((logits.float().sum(dim=1) - 1).abs().max()) < 1e-3:
        return PROBABILITIES
    return None


def _seconds(call, device: torch.device, threads: int | None = None) -> float:
    """Seconds one call takes on ``device`` (at ``threads`` torch threads, a worker's, if given)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def parameter_dtypes(model: torch.nn.Module) -> list[str]:
    """The floating dtypes other than float32 among the model's parameters and buffers (a model
    cast to half or double), named as torch prints them."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype != torch.float32})


def refusal(error: UnsupportedModel, name: str | None = None) -> str:
    """One line: the method, why it cannot explain the model, and what to use instead."""
    return f"method {name or error.method} cannot explain this model: {error.reason}"
