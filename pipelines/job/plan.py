"""The plan: the invocation parsed and checked, the shards found and preflight run, before any work
starts; a bad run fails here, in seconds, with UsageError."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from saliency_audit.explainers import explainer_class, list_methods, method_parameters
from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.config.options import RunConfig, UsageError, fingerprint_values
from saliency_audit.pipelines.config.spec import parse_invocation
from saliency_audit.pipelines.job import incremental
from saliency_audit.pipelines.job.preflight import (check_forward_only, check_shards, first_sample, preflight,
                                                   thread_budget)
from saliency_audit.transforms.io import map_storage, storage
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.rows import saliency_schema
from saliency_audit.transforms.model.fitting import CPU_AUTO_BATCH
from saliency_audit.transforms.model.handler import ExplainConfig
from saliency_audit.transforms.model.load import BINARY_LOGIT, ModelSpec, model_preprocessing


def parse_methods(options) -> dict[str, dict[str, Any]]:
    """Each method of --methods with its options: --method-options, then the files it needs (its
    assets, e.g. abele's --aae) from their run options, and the run's storage options for a method
    that reads such files, unless --method-options gives its own."""
    names = [m.strip() for m in options.methods.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods is empty")
    known = list_methods()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; known methods: {', '.join(known)}")
    stray = sorted(set(options.method_options) - set(names))
    if stray:
        raise UsageError(f"--method-options names method(s) not in --methods: {', '.join(stray)}")
    methods = {}
    for name in dict.fromkeys(names):
        given = options.method_options.get(name, {})
        if not isinstance(given, dict):
            raise UsageError(f"--method-options for {name} must be a JSON object")
        check_option_locations(name, given)
        methods[name] = {**_assets(name, given, options), **given}
    return methods


def _assets(name: str, given: dict[str, Any], options) -> dict[str, Any]:
    """The files method ``name`` needs that --method-options does not give, from their run options."""
    assets = explainer_class(name).assets
    parameters = method_parameters(name)
    found = {}
    for asset in assets:
        value = getattr(options, asset.name)
        if asset.name in given or value is None:
            if asset.name not in given and parameters.get(asset.name) is inspect.Parameter.empty:
                raise UsageError(f"{name} needs {asset.flag_name} {asset.metavar or 'PATH'}: {asset.help}")
            continue
        found[asset.name] = value
    if assets and options.storage_options and "storage_options" in parameters:
        found["storage_options"] = options.storage_options  # read its files where the data is
    return found


def check_option_locations(name: str, given: dict[str, Any]) -> None:
    """A method option's text may be a path or URL (abele's aae, expected_gradients' background):
    refused with credentials in it, as --aae is, before any work and without repeating it (errors
    about the file would quote it; the manifest records method options)."""
    from argparse import ArgumentTypeError

    from saliency_audit.pipelines.config.options import location
    for key, value in given.items():
        if isinstance(value, str):
            try:
                location(value)
            except ArgumentTypeError as e:
                raise UsageError(f"--method-options {name}.{key}: {e}") from None


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


@dataclasses.dataclass
class Plan:
    """Everything the run needs, checked before any work starts."""

    argv: list[str]
    options: RunConfig
    beam_args: list[str]
    methods: dict[str, dict[str, Any]]
    prep: Preprocessing
    shards: list[str]
    config: ExplainConfig
    resolved: dict[str, Any]
    schema: Any
    work: incremental.Work | None = None  # an incremental run: what the history lacks
    prep_sources: dict[str, str] = dataclasses.field(default_factory=dict)  # preprocessing value -> where from

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.options.storage_options


def plan(argv: list[str]) -> Plan:
    """Parse and check the invocation (a --config spec, then the flags that override it), find
    the shards and run preflight (the model on a sample image with every method): a bad run fails
    here, in seconds, with UsageError."""
    options, beam_args = parse_invocation(argv)  # the run's options (a RunConfig) and Beam's
    if options.slot and not options.incremental:
        raise UsageError("--slot names a slot of an audit history: it needs --incremental")
    if options.baseline:  # a bad baseline fails now, not after the run; never the run's own output
        if gates.same_place(options.baseline, options.output):
            raise UsageError(f"--baseline {options.baseline} is the run's own --output: the run would be compared "
                             f"with itself once published; use a copy of the earlier audit, or an --output per run")
        try:  # its manifest and every value of the files it names (streamed: flat in its size), before any work
            gates.open_audit(options.baseline, options.storage_options, "--baseline", deep=True)
        except (ValueError, OSError) as e:
            raise UsageError(" ".join(str(e).split())) from None
    methods = parse_methods(options)
    spec = ModelSpec(options.model, options.weights, options.trust_model, options.storage_options or None,
                     options.endpoint_options or None, model_options=options.model_options or None)
    try:
        shards = check_shards(storage.expand_glob(options.input, options.storage_options), options.input)
        prep, prep_sources = resolve_preprocessing(options, spec)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    check_top_k(options.gates, shards, prep, options.storage_options)
    set_input_bounds(methods, prep)
    check_forward_only(spec, list(methods), options.sanity_check)
    # the metrics read the normalisation in use (ABELE's pixel values), the model's own where it gave it
    settings = {**fingerprint_values(options), "mean": prep.mean, "std": prep.std}
    config = ExplainConfig(model=spec, methods=methods, device=options.device, target=options.target,
                           seed=options.seed, settings=settings,
                           threads=thread_budget(options.torch_threads, beam_args),
                           precision=options.precision, compile=options.compile)
    auto = options.batch_size == "auto"
    resolved = preflight(config, shards, prep, options.storage_options, beam_args, auto_batch=auto)
    # the workers' model must answer as many classes as preflight's did (an endpoint redeployed meanwhile),
    # and read probabilities as their logs where preflight found the model answers them; auto gives them the
    # torch threads preflight chose from the sample image's size
    outputs = resolved["model_loading"].get("outputs", spec.outputs)
    # (the count the model answers, which the reading of a single logit doubles: an endpoint's client checks it)
    answered = 1 if outputs == BINARY_LOGIT else resolved["num_classes"]
    config = dataclasses.replace(config, model=dataclasses.replace(spec, num_classes=answered, outputs=outputs),
                                 threads=dataclasses.replace(config.threads,
                                                             small_images=resolved["torch_threads"]["small_images"]))
    if auto:  # each method explains in its own batch; the reader cuts batches for the largest
        sizes = {name: info["batch_size"] for name, info in resolved["methods"].items() if "batch_size" in info}
        config = dataclasses.replace(config, batch_sizes=sizes)
        resolved["batch_size"] = max(sizes.values(), default=CPU_AUTO_BATCH)
    else:
        resolved["batch_size"] = options.batch_size
    schema = map_storage.saliency_schema(saliency_schema(methods), options.map_dtype)
    work = None
    if options.incremental:
        try:
            work = incremental.plan_work(options.output, options.slot, spec, resolved["model_state_sha256"], options,
                                         resolved, shards, options.storage_options)
        except OSError as e:
            raise UsageError(f"--incremental: cannot read the history or the shards: {e}") from None
    return Plan(argv, options, beam_args, methods, prep, shards, config, resolved, schema, work, prep_sources)


PROVENANCE = ("resize", "resize_shortest", "crop", "crop_offset", "interpolation", "channels", "mean", "std")


def resolve_preprocessing(options, spec: ModelSpec) -> tuple[Preprocessing, dict[str, str]]:
    """The run's preprocessing: its flags, and what they leave unset from the model's own files (an
    hf: folder's preprocessor_config.json, a timm architecture's pretrained config); a --resize
    replaces the model's whole geometry (its resize, crop and interpolation). With where each
    value came from ("flag", the model's file, or "default"), for the manifest."""
    flags = {"resize": options.resize, "mean": options.mean, "std": options.std, "channels": options.channels}
    given = {name: value for name, value in flags.items() if value is not None}
    values, sources = model_preprocessing(spec, {"geometry" if name == "resize" else name for name in given})
    prep = Preprocessing(**{**values, **given}, to_grayscale=options.to_grayscale, max_pixels=options.max_pixels)
    sources = {**sources, **dict.fromkeys(given, "flag")}
    return prep, {name: sources.get(name, "default") for name in PROVENANCE}


def check_top_k(given, shards: list[str], prep: Preprocessing, storage_options: dict[str, Any]) -> None:
    """--gate top_k=N (a pixel count, or a fraction as the gates round it) must leave pixels of a map
    out (the model input's, from the first decodable image), or the top-k overlap gate could never
    fail."""
    top_k = gates.thresholds(given)["top_k"]
    sample = first_sample(shards, prep, storage_options) if "top_k" in dict(given or ()) else None
    if sample is not None:
        try:
            gates.check_top_k(top_k, sample[1].shape[-2] * sample[1].shape[-1])
        except gates.GateError as e:
            raise UsageError(str(e)) from None
