"""Beam's pipeline options on our command line: every argument that is not ours must be one of them,
and what the manifest records of them goes through an allow-list.

Beam has options that hold credentials under plain names (--azure_connection_string, --hdfs_user,
--s3_endpoint_url with a key in it), so no pattern of names can find them all: only the options
known to be safe are recorded as given (where and how the job ran), every other value as <redacted>.
"""
from __future__ import annotations

import argparse
import difflib
import functools

from saliency_audit.pipelines.config import UsageError

REDACTED = "<redacted>"
# Recorded as given, by any of their flag names. Free-form options (experiments, labels,
# environment_config, resource_hints) are left out: any text can go there.
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


def flag_name(token: str) -> str:
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


def closest(name: str, known: list[str]) -> str | None:
    """The flag a prefix spelling stands for (the shortest that starts with it), else the most
    similar known flag."""
    extended = sorted((f for f in known if f.startswith(name) and len(name) > 2), key=len)
    close = extended or difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


def repeats(action: argparse.Action | None) -> bool:
    """Whether a Beam option adds up over repeats (append, comma lists, dict unions)."""
    return action is not None and action.nargs != 0 and not isinstance(action, argparse._StoreAction)


def check_beam_args(beam_args: list[str], ours: list[str]) -> None:
    """Beam only logs arguments it cannot parse and runs on, so anything that is neither ours
    nor a Beam option fails here, with the nearest known flag."""
    beam = beam_option_parser()
    _, unknown = beam.parse_known_args(beam_args)
    flags = [t for t in unknown if t.startswith("-") and t != "--"]
    if flags:
        name = flag_name(flags[0])
        close = closest(name, ours + [f for f in beam._option_string_actions if f.startswith("--")])
        raise UsageError(f"unknown option {name}" + (f"; did you mean {close}?" if close else ""))
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0][:60]!r} (every value follows its flag)")


def check_one_spelling(beam_args: list[str], where: str) -> None:
    """One source (a spec's [beam] table, or the command line) gives each Beam option under one name:
    --machine_type and --worker_machine_type set one option, and the last would silently win."""
    actions = beam_option_parser()._option_string_actions
    seen: dict[int, str] = {}
    for token in beam_args:
        action = actions.get(flag_name(token)) if token.startswith("--") else None
        if action is None or repeats(action):
            continue
        first = seen.setdefault(id(action), flag_name(token))
        if first != flag_name(token):
            raise UsageError(f"{where}: {first} and {flag_name(token)} name one Beam option; give it once")


def carries_credentials(text: str) -> bool:
    """Whether a URL or address may hold credentials: user:password@host, a ?query (an Azure SAS
    token, a presigned signature) or a #fragment."""
    return any(mark in text for mark in "@?#")


def beam_value(flag: str, value: str) -> str:
    """A Beam option's value as the manifest records it: as given on the allow-list, else
    <redacted> (a prefix spelling or a flag of no parser included)."""
    action = beam_option_parser()._option_string_actions.get(flag)
    names = {f[2:] for f in action.option_strings} if action is not None else set()
    if names & BEAM_RECORDED or (names & BEAM_LOCATIONS and not carries_credentials(value)):
        return value
    return REDACTED
