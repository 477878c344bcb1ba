"""The Beam runner a run's options name, with DirectRunner pinned to the in-process FnApiRunner."""
from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions


def beam_pipeline_options(beam_args: list[str]) -> tuple[PipelineOptions, Any]:
    """Pipeline options and the runner. DirectRunner is pinned to Beam's in-process
    FnApiRunner: the stock DirectRunner first tries Prism, which downloads a binary. DaskRunner
    is ours (saliency_audit.pipelines.runners.dask): Beam's drops tagged outputs and all sinks but one."""
    options = PipelineOptions(beam_args)
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in (None, "DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        return options, FnApiRunner()
    if runner_name in ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        from saliency_audit.pipelines.runners.dask import DaskRunner
        return options, DaskRunner()
    return options, runner_name


def runner_name(beam_args: list[str]) -> str:
    runner = beam_pipeline_options(beam_args)[1]
    return runner if isinstance(runner, str) else type(runner).__name__
