"""An option, declared once: what a run option (and a metric's or a method's asset option) is.

The job generates from these declarations its command-line flags, its spec keys, its range checks,
each method's fingerprint and the manifest's record of the run (saliency_audit.pipelines.config),
so an option is written down in one place only: core options in the job's configuration, a
metric's options in the metric's file, an asset a method needs (abele's autoencoder) on the method.
Nothing here knows of argparse or Beam: ``kind`` names how the value is written and checked.
"""
from __future__ import annotations

import dataclasses
from typing import Any

# The kinds of value an option takes (their parsers are in saliency_audit.pipelines.config.kinds).
KINDS = ("text", "location", "integer", "number", "numbers", "size", "names", "target", "threads", "batch", "switch",
         "choice", "json", "method_options", "slot", "gates", "spec")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a run.

    name: the run configuration's attribute (``batch_size``); the flag is ``--batch-size`` unless
        ``flag`` says otherwise, and a switch also gets ``--no-...``.
    kind: one of KINDS.
    spec: where a spec file sets it (``explain.batch_size``); None for flags only.
    low, high: the range of a number (inclusive); choices: the values a ``choice`` takes.
    fingerprint: the option changes the rows a method writes (its maps, targets or metrics), so an
        audit history explains again when it changes.
    secret: the value may hold credentials: recorded as <redacted>, never as given.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    spec: str | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    fingerprint: bool = False
    secret: bool = False
    required: bool = False
    metavar: str | None = None
    flag: str | None = None
    hidden: bool = False  # accepted, not shown in --help (a flag kept for old scripts)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"option {self.name}: a choice needs its choices")

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")
