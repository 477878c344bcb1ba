"""Command-line options of the audit job; everything not listed here goes to Beam."""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import re

from saliency_audit.transforms.io.publication import MIN_STALE_S

DEFAULT_METHODS = "sal,grad,intg,deeplift"
REDACTED = "<redacted>"
# Our flags whose values are free-form JSON that may hold credentials (fsspec keys, an endpoint's
# headers, abele's storage_options): the recorded command line hides them; the manifest's resolved
# spec keeps what is safe of them (saliency_audit.pipelines.config.spec).
_FREE_FORM = ("--storage-options", "--endpoint-options", "--method-options")
# The Beam options whose values the manifest (and so the report) records, by any of their flag
# names: where and how the job ran. Every other Beam option's value is recorded as <redacted>:
# Beam has options that hold credentials under plain names (--azure_connection_string,
# --hdfs_user, --s3_endpoint_url with a key in it), so no pattern of names can find them all.
# Free-form options (experiments, labels, environment_config, resource_hints) are left out: any
# text can go there.
BEAM_RECORDED = frozenset({
    "runner", "project", "region", "zone", "worker_region", "worker_zone", "job_name", "machine_type",
    "network", "subnetwork", "disk_type", "min_cpu_platform", "flexrs_goal", "autoscaling_algorithm",
    "environment_type", "direct_running_mode", "pickle_library", "type_check_strictness", "flink_version",
    "spark_version", "sdk_container_image", "worker_harness_container_image",  # image references hold no password
    # counts Beam itself parses as numbers
    "num_workers", "max_num_workers", "disk_size_gb", "number_of_worker_harness_threads", "direct_num_workers",
    "parallelism", "max_parallelism", "dask_npartitions", "dask_partition_size",
})
# Addresses and storage locations: recorded unless they carry credentials (user:password@host, a
# ?query such as an Azure SAS token or a presigned signature, a #fragment), then <redacted>.
BEAM_LOCATIONS = frozenset({"temp_location", "staging_location", "job_endpoint", "flink_master", "spark_master_url",
                            "dask_client_address"})


class UsageError(Exception):
    """A bad invocation: reported in one line, before any work starts."""


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad command line as a UsageError (one line, exit 2 in main) instead of
    printing the whole usage."""

    def error(self, message: str):
        raise UsageError(message)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    return h, w


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _target(text: str) -> str:
    if text in ("predicted", "label") or (text.isascii() and text.isdigit()):
        return str(int(text)) if text.isdigit() else text
    raise argparse.ArgumentTypeError(f"must be predicted, label or a class index >= 0, got {text!r}")


def _threads(text: str) -> int | None:
    """--torch-threads: ``auto`` (None: each worker's share of its cores) or a count."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of threads, got {text!r}") from None


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def location(text: str) -> str:
    """A path or URL of ours (--input, --output, --model, --weights, --aae, --baseline, an audit's
    directory): refused with credentials in it (``s3://key:secret@bucket/``, ``https://token@host``),
    which would reach the manifest, the verdict and the report. They belong in --storage-options
    or the environment, which are never recorded."""
    if _USERINFO.match(text):
        raise argparse.ArgumentTypeError("a URL with credentials in it (user:password@host) is refused: "
                                         "give them in --storage-options or the environment")
    return text


def _slot(text: str) -> str:
    from saliency_audit.transforms.io.history import check_slot
    try:
        return check_slot(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class OneSpec(argparse.Action):
    """--config, given at most once: a second spec would silently replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice; give one spec")
        setattr(namespace, self.dest, values)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", action=OneSpec, metavar="SPEC",
        help="audit spec (.toml, .yaml or .yml) giving any of these options; flags given on the command line "
             "override it (docs/spec.md)")
    add("--input", type=location, required=True, help="glob of shards on any fsspec URL (.tar, .parquet, .png/.jpg/.npy)")
    add("--model", type=location, required=True, help="TorchScript file, torch.export .pt2 archive, or module:Callable")
    add("--weights", type=location, help="state dict for --model module:Callable (loaded with weights_only=True)")
    add("--trust-model", action="store_true", help="allow model files that need arbitrary unpickling")
    _add_off_switch(parser, "trust-model")
    add("--methods", default=DEFAULT_METHODS, help=f"comma list of methods (default {DEFAULT_METHODS})")
    add("--output", type=location, required=True, help="output directory (any fsspec URL)")
    add("--target", type=_target, default="predicted", help="predicted | label | INT (default predicted)")
    add("--batch-size", type=int, default=32, help="images per batch (default 32)")
    add("--limit-per-shard", type=int, metavar="N",
        help="read only the first N records of every shard (a deterministic sample)")
    add("--device", default="auto", help="cpu | cuda | auto (default auto)")
    add("--torch-threads", type=_threads, default=None, metavar="N|auto",
        help="torch threads per worker process, also the size of the methods' own thread pools (default auto: "
             "the cores the worker may use divided by the SDK worker processes the runner starts per machine, "
             "e.g. --direct_num_workers with --direct_running_mode multi_processing; at least 1)")
    add("--metrics", dest="metrics", action="store_true", default=True,
        help="compute explanation-quality metrics (default on)")
    add("--no-metrics", dest="metrics", action="store_false", help="skip the metrics")
    add("--metric-steps", type=int, default=16,
        help="deletion/insertion steps (default 16: 2 x 17 forward passes per map)")
    add("--metric-substrate", default="zero", choices=("zero", "blur", "mean"),
        help="what deleted pixels become in deletion/insertion (default zero)")
    add("--abele-metrics", action="store_true",
        help="also ABELE's relevance, coherence and stability per image (costly: about --abele-neighbours "
             "times each method's own cost)")
    _add_off_switch(parser, "abele-metrics")
    add("--road", action="store_true",
        help="also ROAD per image (Rong et al. 2022): the target's probability as 1-99%% of the pixels are "
             "removed most and least relevant first and filled by noisy linear imputation (costly: 100 forward "
             "passes and 100 sparse solves per image and method)")
    _add_off_switch(parser, "road")
    add("--abele-neighbours", type=int, default=20,
        help="salt-and-pepper copies for stability, and at most this many same-class batch images for "
             "coherence (default 20, as ABELE)")
    add("--sanity-check", action="store_true",
        help="after the job: cascading randomisation of the model's layers (Adebayo et al. 2018) on a sample")
    _add_off_switch(parser, "sanity-check")
    add("--sanity-images", type=int, default=16,
        help="images in the sanity check: the first N decodable ones in shard order (default 16)")
    add("--sanity-threshold", type=float, default=0.5,
        help="flag a method whose mean rank correlation with the fully randomised model's maps stays "
             "above this (default 0.5)")
    add("--method-options", type=_json_object, default={},
        help='per-method options, e.g. \'{"intg": {"n_steps": 32}}\'')
    add("--aae", type=location, help="adversarial autoencoder for abele")
    add("--seed", type=int, default=0, help="base seed; each image's seed derives from it and the image id")
    add("--endpoint-options", type=_json_object, default={},
        help="for a --model http(s):// endpoint: max_batch, max_in_flight, rate, timeout, retries, backoff, "
             "output (logits|probabilities), headers, token_env (docs in README; never in the manifest)")
    add("--storage-options", type=_json_object, default={},
        help='fsspec storage options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    add("--resize", type=_size, help="resize images to H,W (bilinear, antialiased)")
    add("--mean", type=_floats, help="per-channel mean subtracted after scaling to [0,1]")
    add("--std", type=_floats, help="per-channel std divided by after subtracting the mean")
    add("--channels", type=int, choices=(1, 3), help="channels the model takes")
    add("--to-grayscale", action="store_true", help="convert RGB images for a 1-channel model")
    _add_off_switch(parser, "to-grayscale")
    add("--max-pixels", type=int, default=4096 * 4096, help="reject larger images (default 4096*4096)")
    add("--output-files", type=int, help=argparse.SUPPRESS)  # accepted for old scripts: files now roll by size
    add("--map-dtype", choices=("float32", "float16"), default="float32",
        help="stored form of the saliency maps: float32 (default) or float16 (half the bytes; 3 significant "
             "digits, values beyond +-65504 clipped; the row's saliency_min/max keep the exact range)")
    add("--dry-run", action="store_true",
        help="print the plan (shards, records, methods, passes and seconds per image, estimated time from a "
             "short calibration on sample images) and exit without running")
    add("--reclaim-after", type=float, default=30.0, metavar="MINUTES",
        help="remove the folders of an earlier run of this --output whose heartbeat is older than this "
             "(a killed run; default 30)")
    add("--incremental", action="store_true",
        help="keep every run of --output as an audit history and explain only the (image, method) pairs it "
             "lacks for this model and these method options (docs/history.md)")
    _add_off_switch(parser, "incremental")
    add("--slot", type=_slot, metavar="NAME",
        help="the schedule slot this run fills in the history (e.g. 2026-11-30); a rerun of a slot replaces "
             "its earlier run, so reruns are idempotent (default: the run's own id, a new slot)")
    # here, not at the top: gates reads audits (heavier imports)
    from saliency_audit.pipelines.checks.gates import add_gate_arguments
    add_gate_arguments(parser)  # --baseline, --gate NAME=VALUE: decided after the run is published


def _add_off_switch(parser: argparse.ArgumentParser, flag: str) -> None:
    """--no-FLAG, so that a command line can turn off a switch that a --config spec turns on."""
    parser.add_argument(f"--no-{flag}", dest=flag.replace("-", "_"), action="store_false",
                        help=f"turn --{flag} off (where a --config spec turns it on)")


# (flag, lowest, highest) for the numeric options; None where unbounded.
_RANGES = (("batch_size", 1, None), ("limit_per_shard", 1, None), ("metric_steps", 1, None),
           ("abele_neighbours", 1, None), ("sanity_images", 1, None), ("sanity_threshold", -1, 1),
           ("max_pixels", 1, None), ("output_files", 1, None), ("torch_threads", 1, 1024),
           ("reclaim_after", MIN_STALE_S / 60, None))


def range_problem(name: str, value) -> str | None:
    """Why ``value`` is out of range for the option ``name`` (its dest), or None; also used for
    the values of a --config spec."""
    for option, low, high in _RANGES:
        if option != name or value is None:  # None: an optional flag left out
            continue
        if not (low <= value if high is None else low <= value <= high):  # NaN fails both
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            return f"must be {bound}, got {value}"
    return None


def _check_ranges(args: argparse.Namespace) -> None:
    for name, _, _ in _RANGES:
        problem = range_problem(name, getattr(args, name, None))
        if problem:
            raise UsageError(f"--{name.replace('_', '-')} {problem}")


def _flag_name(token: str) -> str:
    return token.split("=", 1)[0]


@functools.lru_cache(maxsize=1)
def beam_option_parser() -> argparse.ArgumentParser:
    """A parser of every Beam pipeline option (as PipelineOptions.get_all_options builds it)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
    try:  # registers the Dask options (--dask_client_address...) when dask is installed
        import apache_beam.runners.dask.dask_runner  # noqa: F401  pylint: disable=unused-import
    except (ImportError, AttributeError):  # without dask, Beam's module fails on ddist.Client
        pass

    class Parser(_BeamArgumentParser):
        def error(self, message: str):
            raise UsageError(f"Beam option: {message}")

    parser = Parser(allow_abbrev=False, add_help=False)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)  # a class seen twice (e.g. via the main session) counts once
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def _check_beam_args(beam_args: list[str], ours: list[str]) -> None:
    """Beam only logs arguments it cannot parse and runs on, so anything that is neither ours
    nor a Beam option fails here, with the nearest known flag."""
    beam = beam_option_parser()
    _, unknown = beam.parse_known_args(beam_args)
    flags = [t for t in unknown if t.startswith("-") and t != "--"]
    if flags:
        name = _flag_name(flags[0])
        close = _closest(name, ours + [f for f in beam._option_string_actions if f.startswith("--")])
        raise UsageError(f"unknown option {name}" + (f"; did you mean {close}?" if close else ""))
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0][:60]!r} (every value follows its flag)")


def _closest(name: str, known: list[str]) -> str | None:
    """The flag a prefix spelling stands for (the shortest that starts with it), else the most
    similar known flag."""
    extended = sorted((f for f in known if f.startswith(name) and len(name) > 2), key=len)
    close = extended or difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


def run_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="saliency-audit run", description="Run a saliency audit.", allow_abbrev=False,
                            usage="%(prog)s --input GLOB --model MODEL --output DIR [options] [Beam options]")
    add_run_arguments(parser)
    return parser


def parse_run_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options and the remaining arguments, which must be Beam pipeline options.
    Raises UsageError for a bad command line."""
    parser = run_parser()
    args, beam_args = parser.parse_known_args(argv)
    _check_ranges(args)
    _check_beam_args(beam_args, [f for f in parser._option_string_actions if f.startswith("--")])
    return args, beam_args


@functools.lru_cache(maxsize=1)
def _own_actions() -> dict[str, argparse.Action]:
    return run_parser()._option_string_actions


def _takes_value(flag: str) -> bool:
    """Whether a known flag reads the next argument (booleans do not); unknown flags are
    assumed to, so that a secret after one is still hidden."""
    for actions in (_own_actions(), beam_option_parser()._option_string_actions):
        action = actions.get(flag)
        if action is not None:
            return action.nargs != 0
    return True


def carries_credentials(text: str) -> bool:
    """Whether a URL or address may hold credentials: user:password@host, a ?query (an Azure SAS
    token, a presigned signature) or a #fragment."""
    return any(mark in text for mark in "@?#")


def recorded_value(flag: str, value: str) -> str:
    """``value`` as the manifest records it for ``flag``: as given for our own flags (but the
    free-form JSON ones) and for the Beam options on the allow-list; <redacted> for any other
    flag, a prefix spelling or a flag of no parser included."""
    if flag in _own_actions():
        return REDACTED if flag in _FREE_FORM else value
    action = beam_option_parser()._option_string_actions.get(flag)
    names = {f[2:] for f in action.option_strings} if action is not None else set()
    if names & BEAM_RECORDED or (names & BEAM_LOCATIONS and not carries_credentials(value)):
        return value
    return REDACTED


def redact_argv(argv: list[str]) -> list[str]:
    """The command line as the manifest records it: every flag's value through recorded_value,
    in both the ``--flag VALUE`` and ``--flag=VALUE`` forms."""
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
