"""The run's options, each declared once, and the one frozen, typed run configuration they make.

Every option is an ``Option`` (saliency_audit.explainers.core.options): its name, kind, default,
range, help, spec key, whether it enters a method's fingerprint and whether it may hold a secret.
The core options are listed here; each metric declares its own (explainers.metrics) and each
method the files it needs (abele's --aae). From the declarations come the command line's flags
(``add_options``), the range checks, the spec's keys (saliency_audit.pipelines.config.spec), the
methods' fingerprints (``fingerprint_values``) and the manifest's record (``recorded_options``).
Everything on the command line that is not ours goes to Beam (saliency_audit.pipelines.config.beam).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, Iterable

from saliency_audit.explainers import asset_options
from saliency_audit.explainers.core.options import Option
from saliency_audit.explainers.core.paths import keep_secret
from saliency_audit.explainers.metrics import metric_options
from saliency_audit.pipelines.config import UsageError
from saliency_audit.pipelines.config.beam import (
    BEAM_LOCATIONS,
    BEAM_RECORDED,
    REDACTED,
    beam_option_parser,
    beam_value,
    carries_credentials,
    check_beam_args,
    closest,
)
from saliency_audit.pipelines.config.kinds import KINDS, location
from saliency_audit.transforms.io.publication import MIN_STALE_S
from saliency_audit.transforms.model.precision import PRECISIONS

__all__ = ["BEAM_LOCATIONS", "BEAM_RECORDED", "DEFAULT_METHODS", "OPTIONS", "REDACTED", "RunConfig", "UsageError",
           "add_options", "add_run_arguments", "all_options", "beam_option_parser", "carries_credentials",
           "fingerprint_values", "location", "parse_run_args", "range_problem", "recorded_options", "redact_argv",
           "run_parser"]

DEFAULT_METHODS = "sal,grad,intg,deeplift"

OPTIONS: tuple[Option, ...] = (
    Option("config", "spec", metavar="SPEC",
           help="audit spec (.toml, .yaml or .yml) giving any of these options; flags given on the command line "
                "override it (docs/spec.md)"),
    Option("input", "location", required=True, spec="input.path",
           help="glob of shards on any fsspec URL (.tar, .parquet, .png/.jpg/.npy)"),
    Option("model", "location", required=True, spec="model.path",
           help="TorchScript file, torch.export .pt2 archive, ONNX file, http(s):// endpoint, module:Callable, "
                "hf:FOLDER (a Hugging Face model folder) or timm:NAME (docs/inputs.md)"),
    Option("weights", "location", spec="model.weights",
           help="state dict for --model module:Callable or timm:NAME: a .safetensors file, or a torch file "
                "(loaded with weights_only=True)"),
    Option("model_options", "json", default={}, spec="model.options",
           help='for --model timm:NAME: timm.create_model\'s keyword arguments, e.g. \'{"img_size": 224}\''),
    Option("trust_model", "switch", spec="model.trust",
           help="allow model files that need arbitrary unpickling, and an hf: folder's own code (auto_map)"),
    Option("methods", "names", default=DEFAULT_METHODS, spec="explain.methods",
           help=f"comma list of methods (default {DEFAULT_METHODS})"),
    Option("output", "location", required=True, spec="output.path", help="output directory (any fsspec URL)"),
    # Not in the fingerprint: an audit history keys maps by (image, method, target class) instead.
    Option("target", "target", default="predicted", spec="explain.target",
           help="predicted | label | topN | INT, or a comma list of them, e.g. predicted,label,top3,7: one row "
                "per distinct class, with its rank (default predicted)"),
    Option("batch_size", "batch", default=32, low=1, spec="explain.batch_size", metavar="N|auto",
           help="images per batch (default 32); auto: per method, the largest batch that fits the device's memory, "
                "found at preflight on the first image (a fixed 32 on a CPU; docs/performance.md). Whatever the "
                "size, a method that runs out of memory halves its batch and retries"),
    Option("precision", "choice", default="fp32", choices=PRECISIONS, spec="explain.precision", fingerprint=True,
           help="the model's forward passes: fp32 (default), tf32 (CUDA's TensorFloat-32 matmuls; fp32 on a CPU), "
                "bf16 or fp16 (autocast); maps and metrics are summed in float32, and the relevance methods run "
                "fp32 (docs/performance.md)"),
    Option("compile", "switch", spec="explain.compile",
           help="torch.compile the model for the methods that allow it (not those that hook layers); falls back "
                "to eager, with one warning, where compilation fails"),
    Option("limit_per_shard", "integer", low=1, spec="input.limit_per_shard", metavar="N",
           help="read only the first N records of every shard (a deterministic sample)"),
    Option("device", "text", default="auto", spec="model.device", help="cpu | cuda | auto (default auto)"),
    Option("torch_threads", "threads", low=1, high=1024, spec="explain.torch_threads", metavar="N|auto",
           help="torch threads per worker process, also the size of the methods' own thread pools (default auto: "
                "the cores the worker may use divided by the SDK worker processes the runner starts per machine, "
                "e.g. --direct_num_workers with --direct_running_mode multi_processing; at least 1, less the image "
                "decoding pool's share: one thread in 8, on a GPU worker half; one torch thread where preflight's "
                "sample image has at most 3x32x32 values, as MNIST's and CIFAR's; docs/performance.md)"),
    Option("sanity_check", "switch", spec="sanity_check.enabled",
           help="after the job: cascading randomisation of the model's layers (Adebayo et al. 2018) on a sample"),
    Option("sanity_images", "integer", default=16, low=1, spec="sanity_check.images",
           help="images in the sanity check: the first N decodable ones in shard order (default 16)"),
    Option("sanity_threshold", "number", default=0.5, low=-1, high=1, spec="sanity_check.threshold",
           help="flag a method whose mean rank correlation with the fully randomised model's maps stays above "
                "this (default 0.5)"),
    Option("method_options", "method_options", default={}, spec="explain.options",
           help='per-method options, e.g. \'{"intg": {"n_steps": 32}}\''),
    Option("seed", "integer", default=0, spec="explain.seed", fingerprint=True,
           help="base seed; each image's seed derives from it and the image id"),
    Option("endpoint_options", "json", default={}, spec="model.endpoint", secret=True,
           help="for a --model http(s):// endpoint: max_batch, max_in_flight, rate, timeout, retries, backoff, "
                "output (logits|probabilities), headers, token_env (docs/inputs.md; never in the manifest)"),
    Option("storage_options", "json", default={}, spec="storage.options", secret=True,
           help='fsspec storage options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\''),
    Option("resize", "size", spec="preprocessing.resize", fingerprint=True,
           help="resize images to H,W (bilinear, antialiased)"),
    Option("mean", "numbers", spec="preprocessing.mean", fingerprint=True,
           help="per-channel mean subtracted after scaling to [0,1]"),
    Option("std", "numbers", spec="preprocessing.std", fingerprint=True,
           help="per-channel std divided by after subtracting the mean"),
    Option("channels", "integer", choices=(1, 3), spec="preprocessing.channels", fingerprint=True,
           help="channels the model takes"),
    Option("to_grayscale", "switch", spec="preprocessing.to_grayscale", fingerprint=True,
           help="convert RGB images for a 1-channel model"),
    Option("max_pixels", "integer", default=4096 * 4096, low=1, spec="input.max_pixels", fingerprint=True,
           help="reject larger images (default 4096*4096)"),
    Option("output_files", "integer", low=1, hidden=True),  # accepted for old scripts: files now roll by size
    Option("map_dtype", "choice", default="float32", choices=("float32", "float16"), spec="output.map_dtype",
           fingerprint=True,
           help="stored form of the saliency maps: float32 (default) or float16 (half the bytes; 3 significant "
                "digits, values beyond +-65504 clipped; the row's saliency_min/max keep the exact range)"),
    Option("dry_run", "switch",
           help="print the plan (shards, records, methods, passes and seconds per image, estimated time from a "
                "short calibration on sample images) and exit without running"),
    Option("reclaim_after", "number", default=30.0, low=MIN_STALE_S / 60, spec="output.reclaim_after",
           metavar="MINUTES",
           help="remove the folders of an earlier run of this --output whose heartbeat is older than this "
                "(a killed run; default 30)"),
    Option("incremental", "switch", spec="history.incremental",
           help="keep every run of --output as an audit history and explain only the (image, method) pairs it "
                "lacks for this model and these method options (docs/history.md)"),
    Option("slot", "slot", spec="history.slot", metavar="NAME",
           help="the schedule slot this run fills in the history (e.g. 2026-11-30); a rerun of a slot replaces "
                "its earlier run, so reruns are idempotent (default: the run's own id, a new slot)"),
    Option("baseline", "location", spec="baseline.path", metavar="PREVIOUS",
           help="a published audit to compare with (its directory)"),
    Option("gates", "gates", spec="gates", flag="--gate", metavar="NAME=VALUE",
           help="a gate's threshold, or NAME=off; repeatable (docs/gates.md)"),
)
GATE_OPTIONS = ("baseline", "gates")  # what `check` reads too


def all_options() -> tuple[Option, ...]:
    """The core options, then every metric's, then the files the methods need."""
    return _ALL


def _collect() -> tuple[Option, ...]:
    options = (*OPTIONS, *metric_options(), *asset_options())
    names = [o.name for o in options]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TypeError(f"option(s) declared twice: {', '.join(twice)}")
    return options


def _default(opt: Option) -> Any:
    return bool(opt.default) if opt.kind == "switch" else opt.default


def _field(opt: Option) -> tuple[str, Any, Any]:
    python = KINDS[opt.kind].python
    default = _default(opt)
    if isinstance(default, (dict, list)):  # a mutable default: a fresh one per config
        return opt.name, python, dataclasses.field(default_factory=lambda d=default: type(d)(d))
    return opt.name, python if default is not None else python | None, dataclasses.field(default=default)


_ALL = _collect()
RunConfig = dataclasses.make_dataclass("RunConfig", [_field(o) for o in _ALL], frozen=True)
RunConfig.__module__ = __name__  # (make_dataclass takes module= only from Python 3.12) for pickling
RunConfig.__doc__ = "A run's options, checked and typed, one field per declared option (all_options)."


# --- the command line ------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad command line as a UsageError (one line, exit 2 in main) instead of printing the
    whole usage."""

    def error(self, message: str):
        raise UsageError(message)


class OneSpec(argparse.Action):
    """--config, given at most once: a second spec would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; give one spec")
        setattr(namespace, self.dest, values)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """One flag per option (and --no-FLAG for a switch, so a command line can turn off what a
    spec turns on)."""
    for opt in options:
        kind = KINDS[opt.kind]
        shown = argparse.SUPPRESS if opt.hidden else opt.help
        if opt.kind == "switch":
            parser.add_argument(opt.flag_name, dest=opt.name, action="store_true", default=bool(opt.default),
                                help=shown)
            parser.add_argument(f"--no-{opt.flag_name[2:]}", dest=opt.name, action="store_false",
                                help=argparse.SUPPRESS if opt.hidden else f"turn {opt.flag_name} off")
            continue
        if opt.kind == "spec":  # given at most once
            parser.add_argument(opt.flag_name, dest=opt.name, action=OneSpec, metavar=opt.metavar, help=shown)
            continue
        extra: dict[str, Any] = {"action": "append"} if opt.kind == "gates" else {}
        if opt.choices:
            extra["choices"] = opt.choices
        parser.add_argument(opt.flag_name, dest=opt.name, type=kind.flag, default=_default(opt),
                            required=opt.required, metavar=opt.metavar, help=shown, **extra)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, all_options())


def range_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is out of range for the option ``name``, or None; also used for the values of
    a --config spec."""
    opt = next((o for o in all_options() if o.name == name), None)
    if opt is None or value is None or isinstance(value, str) or (opt.low is None and opt.high is None):
        return None
    low, high = opt.low, opt.high
    if not (low <= value if high is None else value <= high if low is None else low <= value <= high):
        bound = f"at least {low:g}" if high is None else f"at most {high:g}" if low is None \
            else f"between {low:g} and {high:g}"
        return f"must be {bound}, got {value}"  # NaN fails every comparison
    return None


def run_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="saliency-audit run", description="Run a saliency audit.", allow_abbrev=False,
                            usage="%(prog)s --input GLOB --model MODEL --output DIR [options] [Beam options]")
    add_run_arguments(parser)
    return parser


def parse_run_args(argv: list[str]):
    """The run configuration and the remaining arguments, which must be Beam pipeline options.
    Raises UsageError for a bad command line."""
    parser = run_parser()
    args, beam_args = parser.parse_known_args(argv)
    for opt in all_options():
        problem = range_problem(opt.name, getattr(args, opt.name))
        if problem:
            raise UsageError(f"{opt.flag_name} {problem}")
    check_beam_args(beam_args, [f for f in parser._option_string_actions if f.startswith("--")])
    config = RunConfig(**{o.name: getattr(args, o.name) for o in all_options()})
    keep_secret(config.storage_options)  # its values are redacted from every message
    return config, beam_args


# --- what the options change and what the manifest records -------------------------------------------

def fingerprint_values(config) -> dict[str, Any]:
    """The values of the options that change the rows a method writes (its fingerprint's part)."""
    return {o.name: getattr(config, o.name) for o in all_options() if o.fingerprint}


def recorded_method_options(value: Any) -> Any:
    """Method options as the manifest records them. They are the explainers' own parameters
    (preflight refuses any other): numbers, names, a layer, abele's aae path, so they are kept;
    but abele's storage_options (fsspec credentials) and any text carrying credentials (a URL
    with user:password@ or a ?query) read <redacted>."""
    if isinstance(value, dict):
        return {k: REDACTED if k == "storage_options" else recorded_method_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [recorded_method_options(v) for v in value]
    return REDACTED if isinstance(value, str) and carries_credentials(value) else value


# free-form JSON (--method-options, --model-options): a URL with user:password@ or a ?query may be in it
FREE_FORM = ("method_options", "json")


def recorded_options(config) -> dict[str, Any]:
    """The run's options for the manifest: the secret ones left out, method options as
    recorded_method_options keeps them."""
    return {o.name: recorded_method_options(value) if o.kind in FREE_FORM else value
            for o in all_options() if not o.secret for value in [getattr(config, o.name)]}


@functools.lru_cache(maxsize=1)
def _own_actions() -> dict[str, argparse.Action]:
    return run_parser()._option_string_actions


def _takes_value(flag: str) -> bool:
    """Whether a known flag reads the next argument (booleans do not); unknown flags are assumed to,
    so that a secret after one is still hidden."""
    for actions in (_own_actions(), beam_option_parser()._option_string_actions):
        action = actions.get(flag)
        if action is not None:
            return action.nargs != 0
    return True


def recorded_value(flag: str, value: str) -> str:
    """``value`` as the manifest records it for ``flag``: as given for our own flags but the ones that
    may hold credentials (secret options, free-form method options), and for the Beam options on
    the allow-list; <redacted> for any other flag, a prefix spelling or a flag of no parser included."""
    action = _own_actions().get(flag)
    if action is not None:
        opt = next((o for o in all_options() if o.name == action.dest), None)
        return REDACTED if opt is not None and (opt.secret or opt.kind in FREE_FORM) else value
    return beam_value(flag, value)


def redact_argv(argv: list[str]) -> list[str]:
    """The command line as the manifest records it: every flag's value through recorded_value, in
    both the ``--flag VALUE`` and ``--flag=VALUE`` forms."""
    out: list[str] = []
    pending = None  # a flag whose value is the next argument
    for token in argv:
        if pending is not None and not token.startswith("--"):
            out.append(recorded_value(pending, token))
            pending = None
            continue
        pending = None
        flag, eq, value = token.partition("=")
        if token.startswith("-") and eq:
            token = f"{flag}={recorded_value(flag, value)}"
        elif token.startswith("-") and _takes_value(flag):
            pending = flag
        out.append(token)
    return out


_closest = closest  # the spec's suggestions use the same nearest-flag rule
