"""The plan: the invocation parsed and checked, the shards found and preflight run, before any work
starts; a bad run fails here, in seconds, with UsageError."""
from __future__ import annotations

import dataclasses
from typing import Any

from saliency_audit.explainers import list_methods, method_parameters
from saliency_audit.explainers.metrics.abele_protocol import AbeleProtocol
from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.config.options import UsageError
from saliency_audit.pipelines.config.spec import parse_invocation
from saliency_audit.pipelines.job import incremental
from saliency_audit.pipelines.job.preflight import (check_forward_only, check_shards, first_sample, preflight,
                                                   thread_budget)
from saliency_audit.transforms.io import map_storage, storage
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.io.rows import saliency_schema
from saliency_audit.transforms.model.handler import ExplainConfig
from saliency_audit.transforms.model.load import ModelSpec


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
