"""How each kind of option value is written and checked: on the command line (text -> value, the
argparse type) and in a spec file (a TOML/YAML value -> the text its flag takes), so a spec value
goes through the very conversion and checks its flag does. The option declarations name a kind
(saliency_audit.explainers.core.options.KINDS); this is their one implementation.

A value that may be a credential is never repeated in an error: a message names what was expected,
not what was given, for the kinds that carry free text (json, location).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any


class Bad(Exception):
    """A spec value of the wrong kind; the message says what was expected. ``plain``: the same
    without the value itself, for secrets."""

    def __init__(self, message: str, plain: str | None = None):
        super().__init__(message)
        self.plain = plain or message


def kind_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table", type(None): "an empty value"}
    return names.get(type(value), f"a {type(value).__name__}")


def expect(what: str, value: Any) -> Bad:
    plain = f"expected {what}, got {kind_name(value)}"
    shown = repr(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
    return Bad(plain + (f" ({shown[:40]})" if shown else ""), plain)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_bad(values: list, good: Callable[[Any], bool]) -> Any:
    return next((v for v in values if not good(v)), values)


# --- command-line text -> value --------------------------------------------------------------------

def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    return h, w


def json_object(text: str) -> dict:
    """A JSON object; an error says where it breaks, never what it holds (it may hold credentials)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer over 4300 digits, nesting beyond the parser: argparse
        # would echo the whole text for a bare ValueError and crash on a RecursionError
        raise argparse.ArgumentTypeError(f"invalid JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {kind_name(value)}")
    return value


def target(text: str) -> str:
    """``predicted``, ``label``, ``topN``, a class index, or a comma list of them
    (saliency_audit.transforms.model.targets), normalised."""
    from saliency_audit.transforms.model.targets import TargetError, normalise
    try:
        return normalise(text)
    except TargetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _auto_or_count(text: str, auto, counted: str):
    """``auto`` as ``auto``, or a count of ``counted`` (images, threads)."""
    if text == "auto":
        return auto
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of {counted}, got {text!r}") from None


def batch(text: str) -> int | str:
    """``auto`` (each method's largest batch that fits) or a count of images."""
    return _auto_or_count(text, "auto", "images")


def threads(text: str) -> int | None:
    """``auto`` (None: each worker's share of its cores) or a count."""
    return _auto_or_count(text, None, "threads")


# after an optional --model prefix (hf:s3://key:secret@bucket/ is a URL with credentials too)
_USERINFO = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def location(text: str) -> str:
    """A path or URL of ours (--input, --output, --model, --weights, --aae, --baseline, an audit's
    directory): refused with credentials in it (``s3://key:secret@bucket/``, ``https://token@host``),
    which would reach the manifest, the verdict and the report. They belong in --storage-options
    or the environment, which are never recorded."""
    if _USERINFO.match(text):
        raise argparse.ArgumentTypeError("a URL with credentials in it (user:password@host) is refused: "
                                         "give them in --storage-options or the environment")
    return text


def slot(text: str) -> str:
    from saliency_audit.transforms.io.history import check_slot
    try:
        return check_slot(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def gate(text: str) -> tuple[str, float | bool]:
    """``--gate NAME=VALUE``."""
    from saliency_audit.pipelines.checks.gates import GateError, parse_gate
    try:
        return parse_gate(text)
    except GateError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- spec value -> the flag's text -----------------------------------------------------------------

def spec_text(value: Any) -> str:
    if not isinstance(value, str):
        raise expect("a string", value)
    return value


def spec_integer(value: Any) -> str:
    if not _is_int(value):
        raise expect("an integer", value)
    return str(value)


def spec_number(value: Any) -> str:
    if not is_number(value):
        raise expect("a number", value)
    return repr(float(value))


def spec_numbers(value: Any) -> str:
    if not isinstance(value, list) or not value or not all(is_number(v) for v in value):
        raise expect("a list of numbers, e.g. [0.5, 0.5, 0.5]",
                     _first_bad(value, is_number) if isinstance(value, list) and value else value)
    return ",".join(repr(float(v)) for v in value)


def spec_size(value: Any) -> str:
    if not isinstance(value, list) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise expect("[height, width]", value)
    return f"{value[0]},{value[1]}"


def spec_names(value: Any) -> str:
    def name(v: Any) -> bool:
        return isinstance(v, str) and bool(v) and "," not in v

    if not isinstance(value, list) or not all(name(v) for v in value):
        raise expect('a list of method names, e.g. ["grad", "intg"]',
                     _first_bad(value, name) if isinstance(value, list) else value)
    return ",".join(value)


def spec_target(value: Any) -> str:
    """A target, or a list of them (``["predicted", "label", "top3", 7]``) -> the flag's comma text."""
    def one(v: Any) -> bool:
        return (isinstance(v, str) and "," not in v) or _is_int(v)

    if isinstance(value, list) and value and all(one(v) for v in value):
        return ",".join(str(v) for v in value)
    if not (isinstance(value, str) or _is_int(value)):
        raise expect('"predicted", "label", "topN", a class index or a list of them',
                     _first_bad(value, one) if isinstance(value, list) and value else value)
    return str(value)


def spec_threads(value: Any) -> str:
    if value != "auto" and not _is_int(value):
        raise expect('"auto" or a number of threads', value)
    return str(value)


def spec_batch(value: Any) -> str:
    if value != "auto" and not _is_int(value):
        raise expect('"auto" or a number of images', value)
    return str(value)


def spec_switch(value: Any) -> bool:
    if not isinstance(value, bool):
        raise expect("true or false", value)
    return value


def spec_table(value: Any) -> str:
    if not isinstance(value, dict):
        raise expect("a table", value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # a TOML/YAML date or the like: the options are JSON values
        raise Bad("expected plain values (strings, numbers, booleans, lists, tables)") from None


def spec_tables(value: Any) -> str:
    """Method options: one table per method."""
    if not isinstance(value, dict):
        raise expect("a table with one table per method", value)
    return spec_table(value)


def spec_gate(name: str) -> Callable[[Any], str]:
    """A [gates] key: a threshold, true (on at its default) or false (off) -> NAME=VALUE."""
    def kind(value: Any) -> str:
        if not (isinstance(value, bool) or is_number(value)):
            raise expect("a number, true (its default) or false (off)", value)
        return f"{name}={'on' if value is True else 'off' if value is False else repr(float(value))}"
    return kind


# --- the kinds ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of value is read: ``python`` its type in the run configuration, ``flag`` the
    argparse type (None: the text as it is), ``spec`` a spec value -> its flag's text (a bool for
    a switch), ``path`` whether a spec value is a path resolved against the spec's folder."""

    python: Any
    flag: Callable[[str], Any] | None
    spec: Callable[[Any], Any]
    path: bool = False


KINDS: dict[str, Kind] = {
    "text": Kind(str, None, spec_text),
    "location": Kind(str, location, spec_text, path=True),
    "integer": Kind(int, int, spec_integer),
    "number": Kind(float, float, spec_number),
    "numbers": Kind(tuple, floats, spec_numbers),
    "size": Kind(tuple, size, spec_size),
    "names": Kind(str, None, spec_names),
    "target": Kind(str, target, spec_target),
    "threads": Kind(int, threads, spec_threads),
    "batch": Kind(int | str, batch, spec_batch),
    "switch": Kind(bool, None, spec_switch),
    "choice": Kind(str, None, spec_text),
    "json": Kind(dict, json_object, spec_table),
    "method_options": Kind(dict, json_object, spec_tables),
    "slot": Kind(str, slot, spec_text),
    "gates": Kind(list, gate, spec_gate),  # spec: one key per gate, see spec.SCHEMA
    "spec": Kind(str, None, spec_text),  # --config itself: given at most once
}
