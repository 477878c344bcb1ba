"""The audit job's entry: ``python -m saliency_audit.pipelines.audit ...`` is ``saliency-audit run ...``.

The job's phases live in saliency_audit.pipelines.job: plan (checks, preflight), graph (the Beam
pipeline), phases (execute, verify, publish, judge, record), manifest and dry_run. This module
keeps the names callers use: ``main`` (exit codes), ``run`` (the manifest) and ``plan``.
"""
from __future__ import annotations

import logging
import sys

from saliency_audit.pipelines.config.options import UsageError
from saliency_audit.pipelines.job.dry_run import print_plan
from saliency_audit.pipelines.job.plan import Plan, plan

__all__ = ["FAILED", "Plan", "UsageError", "main", "plan", "run", "run_plan"]  # noqa: F822 (FAILED, run_plan: below)
# The phases import Beam, which parsing does not need (run --help, a bad value): they load with the
# first of these names (PEP 562), once there is a plan to run.
_PHASES = ("FAILED", "log", "run_plan")


def __getattr__(name: str):
    if name not in _PHASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from saliency_audit.pipelines.job import phases
    return getattr(phases, name)


def run(argv: list[str] | None = None) -> dict:
    """Run the audit; returns the manifest. Raises UsageError for bad invocations.

    Phases: plan (checks, preflight, and for an incremental run what the history lacks), execute
    (the job, into this run's own folders), verify (the counts reconcile), publish (the manifest
    becomes the pointer, in one put), judge (the gates) and record (the history's row), reclaim
    (folders of runs that can no longer be the result). A failure before publishing leaves the
    previous result as it was and removes this run's files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    audit_plan = plan(argv)
    from saliency_audit.pipelines.job.phases import run_plan
    return run_plan(audit_plan)[0]


def main(argv: list[str] | None = None) -> int:
    from saliency_audit.explainers.core.paths import redacted_streams
    with redacted_streams():  # storage clients quote storage-option values in their errors
        return _main(argv)


def _main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # Beam configured it on import
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        audit_plan = plan(argv)
        if audit_plan.options.dry_run:
            print_plan(audit_plan)
            return 0
        from saliency_audit.pipelines.job.phases import run_plan
        manifest, code = run_plan(audit_plan)
    except UsageError as e:
        print(f"saliency-audit: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # 3, not Python's 1: a scheduler must tell "nothing published" from "a gate failed"
        from saliency_audit.pipelines.job.phases import FAILED, log
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
