"""Entry point of the Dataflow Flex Template (FLEX_TEMPLATE_PYTHON_PY_FILE).

The template launcher passes every parameter as ``--name=value``, names spelled with
underscores (metadata.json) and booleans as true/false. This turns our own parameters into
``saliency-audit run`` flags (``--batch_size=8`` -> ``--batch-size=8``, ``--metrics=false`` ->
``--no-metrics``) and leaves every other one, a Beam or Dataflow option, as it is.
"""
from __future__ import annotations

import argparse
import sys

TRUE, FALSE = "true", "false"


def _run_options() -> dict[str, list[argparse.Action]]:
    from saliency_audit.pipelines.config.options import add_run_arguments
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    actions: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            actions.setdefault(action.dest, []).append(action)
    return actions


def _switch(actions: list[argparse.Action], name: str, value: str) -> list[str]:
    """The flag that sets a boolean option to ``value`` (true/false), or none for its default."""
    if value.lower() not in (TRUE, FALSE):
        raise SystemExit(f"saliency-audit: error: parameter {name} must be true or false, got {value!r}")
    wanted = value.lower() == TRUE
    for action in actions:
        if action.const is wanted:  # store_true sets True, store_false False
            return [action.option_strings[0]]
    return []  # e.g. trust_model=false: leaving the flag out is false


def run_argv(argv: list[str]) -> list[str]:
    """Template parameters -> the command line of ``saliency-audit run``."""
    actions, out = _run_options(), []
    for token in argv:
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        options = actions.get(name)
        if not eq or not options:
            out.append(token)  # a Beam or Dataflow pipeline option
        elif options[0].nargs == 0:
            out.extend(_switch(options, name, value))
        else:
            out.append(f"{options[0].option_strings[0]}={value}")
    return out


def main() -> int:
    from saliency_audit.pipelines.audit import main as audit_main
    return audit_main(run_argv(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
