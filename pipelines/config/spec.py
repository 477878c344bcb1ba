"""The audit spec: ``saliency-audit run --config audit.toml`` (or .yaml/.yml).

A spec is a file of tables whose keys stand for the run's flags (SCHEMA, generated from each option's
declared ``spec`` key: saliency_audit.pipelines.config.options) plus a ``[beam]`` table of Beam
pipeline options. It is turned into flags that go
before the command line's, so a flag given on the command line overrides the file. Every key and
value is checked here, with the flags' own conversions and range checks, and a bad one fails in
one line that names the key. The manifest records the resolved spec (after the overrides), with
the secrets redacted as in its ``command``.

An option with a ``spec`` key is a spec key; loading, checking, path resolution and the
manifest's resolved spec follow. ``[gates]`` and ``[baseline]`` stand for ``--gate NAME=VALUE`` and
``--baseline``, which ``check`` reads from the same file.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import tomllib

from saliency_audit.pipelines.checks import gates
from saliency_audit.pipelines.config import UsageError
from saliency_audit.pipelines.config.beam import REDACTED, beam_option_parser, check_one_spelling, closest, repeats
from saliency_audit.pipelines.config.kinds import KINDS, Bad, expect, is_number, kind_name, spec_gate, spec_switch
from saliency_audit.pipelines.config.options import (
    DEFAULT_METHODS,
    GATE_OPTIONS,
    OneSpec,
    _OneLineParser,
    _takes_value,
    add_options,
    all_options,
    parse_run_args,
    range_problem,
    recorded_method_options,
    recorded_value,
    run_parser,
)

MAX_BYTES = 1 << 20  # a spec is a page of settings; anything bigger is a mistake or hostile
MAX_DEPTH = 8        # deepest real use: explain.options.lime.segmentation_options.KEY (5)
MAX_VALUES = 10_000  # also stops YAML alias bombs, whose values are shared, not copied
BEAM = "beam"
GATE_FLAG = "--gate"


def gate_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """--baseline and --gate: the gates the run decides with after it is published."""
    parser = parser or _OneLineParser(add_help=False, allow_abbrev=False)
    add_options(parser, [o for o in all_options() if o.name in GATE_OPTIONS])
    return parser


_flags = functools.lru_cache(maxsize=1)(run_parser)  # the run's flags (the gates' included), built once
SUFFIXES = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
_Bad, _expect, _kind_name = Bad, expect, kind_name


@dataclasses.dataclass(frozen=True)
class Key:
    """One spec key: the run flag it stands for, how its value is checked, whether it is a path
    that resolves relative to the spec file's folder, whether it may hold a secret."""

    flag: str
    kind: Callable[[Any], Any]
    path: bool = False
    secret: bool = False  # recorded as <redacted> in the manifest


def _schema() -> dict[str, dict[str, Key]]:
    """table -> key -> Key, from every option's declared spec key; [gates] has a key per gate."""
    schema: dict[str, dict[str, Key]] = {}
    for opt in all_options():
        if opt.spec is None:
            continue
        if opt.kind == "gates":
            schema[opt.spec] = {name: Key(opt.flag_name, spec_gate(name)) for name in [*gates.GATES, *gates.SETTINGS]}
            continue
        table, key = opt.spec.split(".")
        kind = KINDS[opt.kind]
        schema.setdefault(table, {})[key] = Key(opt.flag_name, kind.spec, path=kind.path, secret=opt.secret)
    return schema


SCHEMA = _schema()
METHOD_OPTIONS = ("explain", "options")


def dotted(*parts: Any) -> str:
    """A key path for a message: plain names as they are, anything else quoted and escaped."""
    return ".".join(p if isinstance(p, str) and re.fullmatch(r"[\w-]{1,40}", p, re.ASCII)
                    else json.dumps(str(p)[:40]) for p in parts)


# --- reading the file -----------------------------------------------------------------------

def load(path: str) -> dict[str, Any]:
    """The spec file's document, parsed safely (no YAML tag builds an object) and bounded in size,
    depth and number of values. Raises UsageError in one line."""
    file = Path(path)
    kind = SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise UsageError(f"--config {path}: expected a .toml, .yaml or .yml file")
    try:
        if not file.is_file():
            raise UsageError(f"--config {path}: " + ("not a file" if file.exists() else "no such file"))
        with file.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"--config {path}: larger than {MAX_BYTES // 1024} KiB; a spec is a page of settings")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    try:
        document = _parse_toml(text) if kind == "TOML" else _parse_yaml(text)
    except RecursionError:  # the parsers recurse per level; the handler runs with the stack unwound
        raise UsageError(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    except _Bad as e:
        raise UsageError(f"{path}: invalid {kind}: {e}") from None
    except (ValueError, OverflowError) as e:  # a value the parser cannot build: a date 2001-13-45, !!float x
        raise UsageError(f"{path}: invalid {kind} value: {_one_line(e)}") from None
    if document is None:  # an empty YAML file
        return {}
    if not isinstance(document, dict):
        raise UsageError(f"{path}: expected a table of settings at the top, got {_kind_name(document)}")
    _check_shape(path, document)
    return document


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:200]


def _parse_toml(text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message ends "(at line L, column C)" or "(at end of document)"
        end = f"(at end of document, line {text.count(chr(10)) + 1})"
        raise _Bad(_one_line(str(e).replace("(at end of document)", end))) from None


@functools.lru_cache(maxsize=1)
def _unique_key_loader() -> type:
    """yaml.SafeLoader that refuses a key given twice in one mapping: safe_load keeps the last and
    silently drops the first (a second ``gates:`` table would replace the first), TOML refuses it.
    Keys a ``<<`` merge brings in may still be overridden, as in safe_load."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _parse_yaml(text: str) -> Any:
    import yaml
    try:
        return yaml.load(text, Loader=_unique_key_loader())  # plain values only: a python/* tag is refused
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (at line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise _Bad(_one_line(e.problem or e.context or "syntax error") + where) from None
    except yaml.YAMLError as e:
        raise _Bad(_one_line(e)) from None


def _check_shape(path: str, document: dict) -> None:
    """Keys are strings; at most MAX_DEPTH levels and MAX_VALUES values."""
    count = 0
    stack: list[tuple[tuple, Any]] = [((), document)]
    while stack:
        where, value = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise UsageError(f"{path}: more than {MAX_VALUES} values; a spec is a page of settings")
        if len(where) > MAX_DEPTH:
            raise UsageError(f"{path}: {dotted(*where[:MAX_DEPTH])}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise UsageError(f"{path}: {dotted(*where, key)}: keys must be strings, got {_kind_name(key)}")
                stack.append(((*where, key), item))
        elif isinstance(value, list):
            stack.extend(((*where, f"[{i}]"), item) for i, item in enumerate(value))


# --- the spec as flags ----------------------------------------------------------------------

def spec_arguments(document: dict[str, Any], path: str, cli_methods: str | None = None) -> list[str]:
    """The flags the spec stands for, each value checked with its flag's own conversion and range
    check. ``cli_methods``: a --methods given on the command line, which keeps only the spec's
    options for the methods it names."""
    folder = Path(path).resolve().parent
    argv: list[str] = []
    for table, values in document.items():
        if table == BEAM:
            argv += _beam_arguments(values, path)
            continue
        keys = SCHEMA.get(table)
        if keys is None:
            raise UsageError(f"{path}: unknown key {dotted(table)}" + _suggest(table, [*SCHEMA, BEAM]))
        if not isinstance(values, dict):
            hint = f"; write it as {table}.path" if "path" in keys else ""
            raise UsageError(f"{path}: {dotted(table)}: expected a table, got {_kind_name(values)}{hint}")
        for name, value in values.items():
            key = keys.get(name)
            if key is None:
                raise UsageError(f"{path}: unknown key {dotted(table, name)}"
                                 + _suggest(name, list(keys), prefix=f"{table}."))
            if (table, name) == METHOD_OPTIONS:
                value = _method_options(value, document, path, cli_methods)
            argv += _key_arguments(key, value, dotted(table, name), path, folder)
    return argv


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    """The nearest key of this table, else the table that has the key (batch_size -> explain.batch_size)."""
    elsewhere = [f"{table}.{name}" for table, keys in SCHEMA.items() if name in keys and f"{table}." != prefix]
    if elsewhere and not (prefix and name in known):
        return f"; did you mean {elsewhere[0]}?"
    close = closest(name, known)
    return f"; did you mean {prefix}{close}?" if close else f"; known keys: {', '.join(prefix + k for k in known)}"


def _key_arguments(key: Key, value: Any, where: str, path: str, folder: Path) -> list[str]:
    action = _flags()._option_string_actions[key.flag]
    try:
        text = key.kind(value)
        if isinstance(text, bool):  # a switch: its flag, or the flag that turns it off
            return [_switch_flag(action.dest, text)]
        if key.path:
            text = _resolved_path(key, text, folder)
        converted = action.type(text) if action.type else text
        if action.choices and converted not in action.choices:
            raise _Bad(f"must be one of {', '.join(map(str, action.choices))}, got {value!r}")
        problem = range_problem(action.dest, converted)
        if problem:
            raise _Bad(problem)
    except _Bad as e:
        raise UsageError(f"{path}: {where}: {_one_line(e.plain if key.secret else e)}") from None
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UsageError(f"{path}: {where}: {'invalid value' if key.secret else _one_line(e)}") from None
    return [f"{key.flag}={text}"]


def _switch_flag(dest: str, on: bool) -> str:
    """The flag that sets the boolean option ``dest`` to ``on``."""
    for action in _flags()._actions:
        if action.dest == dest and action.const is on:
            return action.option_strings[0]
    raise AssertionError(f"no flag sets {dest} to {on}")  # every switch in SCHEMA has both


def _resolved_path(key: Key, text: str, folder: Path) -> str:
    """A relative path resolved against the spec's folder (an hf:FOLDER model's folder too); URLs,
    absolute paths and a model's module:Callable or timm:NAME stay as written."""
    from saliency_audit.transforms.model.load import HF, ModelSpec
    prefix = HF if key.flag == "--model" and text.startswith(HF) else ""
    path = text[len(prefix):]
    model = ModelSpec(text) if key.flag == "--model" else None
    if "://" in path or Path(path).is_absolute() or (model is not None and (model.is_callable() or model.is_timm())):
        return text
    return prefix + str(folder / path)


def _method_options(value: Any, document: dict, path: str, cli_methods: str | None) -> Any:
    """Options for methods that will run: a --methods on the command line drops the spec's options
    for the methods it leaves out; without one, options for a method not listed are an error."""
    if not isinstance(value, dict):
        return value  # its kind check reports it
    for name, options in value.items():
        if not isinstance(options, dict):
            raise UsageError(f"{path}: {dotted(*METHOD_OPTIONS, name)}: "
                             + str(_expect("a table of the method's options", options)))
    if cli_methods is not None:
        names = {m.strip() for m in cli_methods.split(",")}
        return {m: o for m, o in value.items() if m in names}
    listed = document["explain"].get("methods", DEFAULT_METHODS.split(","))
    if not isinstance(listed, list):
        return value  # explain.methods' own check reports it
    for name in value:
        if name not in listed:
            raise UsageError(f"{path}: {dotted(*METHOD_OPTIONS, name)}: {name} is not in explain.methods"
                             + (f"; did you mean {closest(name, listed)}?" if closest(name, listed) else ""))
    return value


def _beam_arguments(values: Any, path: str) -> list[str]:
    """[beam]: KEY = VALUE for every Beam pipeline option --KEY; true/false for its switches and
    a list for the options that may repeat (e.g. experiments)."""
    if not isinstance(values, dict):
        raise UsageError(f"{path}: {BEAM}: expected a table, got {_kind_name(values)}")
    beam = beam_option_parser()
    known = [f[2:] for f in beam._option_string_actions if f.startswith("--")]
    argv: list[str] = []
    for name, value in values.items():
        where = dotted(BEAM, name)
        action = beam._option_string_actions.get(f"--{name}")
        if action is None:
            raise UsageError(f"{path}: unknown key {where}" + _suggest(name, known, prefix=f"{BEAM}."))
        try:
            tokens = _beam_tokens(name, action, value)
            beam.parse_known_args(tokens)  # Beam's own conversion of the value
        except _Bad as e:
            raise UsageError(f"{path}: {where}: {e}") from None
        except UsageError as e:
            raise UsageError(f"{path}: {where}: {_one_line(str(e).split(': ', 1)[-1])}") from None
        argv += tokens
    check_one_spelling(argv, f"{path}: {BEAM}")
    return argv


def _beam_tokens(name: str, action: argparse.Action, value: Any) -> list[str]:
    if action.nargs == 0:
        return [f"--{name}"] if spec_switch(value) else []
    values = value if isinstance(value, list) and repeats(action) else [value]
    if not all(isinstance(v, str) or is_number(v) for v in values):
        raise _expect("a string or a number" + (" (or a list of them)" if repeats(action) else ""), value)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise _Bad(f"expected a finite number, got {value!r}")
    return [f"--{name}={v}" for v in values]


# --- the command line -----------------------------------------------------------------------

def _command_line(argv: list[str]) -> argparse.Namespace:
    """What the command line says of the spec: --config, a --methods that picks the spec's method
    options, and --incremental/--no-incremental (None: neither)."""
    parser = _OneLineParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", action=OneSpec)
    parser.add_argument("--methods")
    parser.add_argument("--incremental", action="store_true", default=None)
    parser.add_argument("--no-incremental", dest="incremental", action="store_false")
    return parser.parse_known_args(argv)[0]


def parse_invocation(argv: list[str]) -> tuple[Any, list[str]]:
    """``parse_run_args`` with --config: the spec's flags first, so the command line's override
    them. Raises UsageError for a bad spec or command line."""
    given = _command_line(argv)
    from_spec: list[str] = []
    if given.config is not None:
        from_spec = spec_arguments(load(given.config), given.config, given.methods)
        if given.incremental is False:  # --no-incremental turns the spec's history off, its slot with it
            from_spec = [token for token in from_spec if not token.startswith("--slot=")]
    parsed = parse_run_args([*from_spec, *argv])
    # After parsing: this check reads Beam's parser, which --help and a bad value of ours need not import.
    check_one_spelling(argv, "the command line")
    return parsed


# --- the resolved spec, for the manifest ----------------------------------------------------

def resolved(config, beam_args: list[str]) -> dict[str, Any]:
    """The spec the run used, after the command line's overrides: every option with a spec key that
    has a value and the Beam options given, anything that may be a secret as <redacted> (storage and
    endpoint options, Beam options off the allow-list, credentials in method options). Fed back
    as a spec, it runs the same audit (unless something was redacted)."""
    out: dict[str, Any] = {}
    for opt in all_options():
        value = getattr(config, opt.name)
        if opt.spec is None or value is None:
            continue  # TOML has no null: an unset optional key is left out
        if opt.kind == "gates":
            given = dict(value)  # each gate's own value, the last one given
            for name in [*gates.GATES, *gates.SETTINGS]:
                if name in given:
                    out.setdefault(opt.spec, {})[name] = given[name]
            continue
        if opt.kind == "names":
            value = [m.strip() for m in value.split(",") if m.strip()]
        elif opt.kind == "target":  # one target as before; several as a list
            items = [int(v) if v.isdigit() else v for v in value.split(",")]
            value = items[0] if len(items) == 1 else items
        elif isinstance(value, tuple):
            value = list(value)
        if opt.secret and value:
            value = REDACTED
        elif opt.kind in ("method_options", "json"):  # --model-options as free-form as method options
            value = recorded_method_options(value)
        table, key = opt.spec.split(".")
        out.setdefault(table, {})[key] = value
    beam = _beam_table(beam_args)
    if beam:
        out[BEAM] = beam
    return out


def _beam_table(beam_args: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    tokens = iter(beam_args)
    for token in tokens:
        if not token.startswith("--"):
            continue  # parse_run_args refuses stray values
        flag, eq, value = token.partition("=")
        if not eq:
            value = next(tokens, "") if _takes_value(flag) else True  # a switch: no value to hide
        if value is not True:
            value = recorded_value(flag, value)  # by the allow-list of Beam options (config.beam)
        name = flag[2:]
        if repeats(beam_option_parser()._option_string_actions.get(flag)):
            table.setdefault(name, []).append(value)
        else:
            table[name] = value
    return table


def manifest_entry(config, beam_args: list[str]) -> dict[str, Any]:
    return {"file": config.config, "resolved": resolved(config, beam_args)}
