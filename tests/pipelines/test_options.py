"""Every run option is declared once (pipelines.config.options, each metric's file, a method's assets),
and everything about it is generated from that declaration: this walks each one through its flag,
its spec key, its range check, the methods' fingerprint and the manifest's record."""
from __future__ import annotations

import dataclasses

import pytest

from saliency_audit.pipelines.config import spec
from saliency_audit.pipelines.config.options import (REDACTED, UsageError, all_options, fingerprint_values,
                                                     parse_run_args, recorded_options)
from saliency_audit.pipelines.job.incremental import method_fingerprints

BASE = {"--input": "in.tar", "--model": "m.pt", "--output": "out"}  # the required ones
# A value other than the default for each kind: (flag text, spec value).
SAMPLES = {
    "text": ("cpu", "cpu"), "location": ("dir/file", "dir/file"), "names": ("grad,intg", ["grad", "intg"]),
    "target": ("label", "label"), "threads": ("3", 3), "batch": ("auto", "auto"), "numbers": ("0.5,0.25", [0.5, 0.25]),
    "size": ("8,8", [8, 8]), "json": ('{"a": 1}', {"a": 1}), "slot": ("s1", "s1"),
    "method_options": ('{"intg": {"n_steps": 8}}', {"intg": {"n_steps": 8}}), "gates": ("top_k=5", {"top_k": 5}),
}
OPTIONS = [o for o in all_options() if o.kind != "spec"]  # --config is the spec itself


def sample(option) -> tuple[str, object]:
    """(flag text, spec value) of a valid value other than the option's default."""
    if option.kind == "switch":
        return "", not option.default
    if option.kind in SAMPLES:
        return SAMPLES[option.kind]
    if option.choices:
        value = next(c for c in option.choices if c != option.default)
        return str(value), value
    if option.kind == "integer":
        value = max(int(option.low or 0) + 3, (option.default or 0) + 1)
        return str(value), value
    if option.kind == "number":
        low, high = option.low if option.low is not None else -1e9, option.high if option.high is not None else 1e9
        value = next(v for v in (0.25, 45.0, -0.25) if low <= v <= high and v != option.default)
        return repr(value), value
    raise AssertionError(f"no sample for {option.name} ({option.kind})")


def flag_tokens(option, text: str) -> list[str]:
    if option.kind == "switch":
        return [f"--no-{option.flag_name[2:]}" if option.default else option.flag_name]
    return [f"{option.flag_name}={text}"]


def parse(argv: list[str]):
    given = {token.split("=")[0] for token in argv}
    return parse_run_args([f"{flag}={value}" for flag, value in BASE.items() if flag not in given] + argv)[0]


def test_every_option_has_one_declaration_a_help_and_a_flag():
    names = [o.name for o in all_options()]
    assert len(names) == len(set(names))
    for option in all_options():
        assert option.hidden or option.help, f"{option.name} has no help"
    flags = [o.flag_name for o in all_options()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_an_option_reads_the_same_from_its_flag_and_its_spec_key(option, tmp_path):
    text, value = sample(option)
    by_flag = parse(flag_tokens(option, text))
    default = parse([])
    assert getattr(by_flag, option.name) != getattr(default, option.name), "the flag changed nothing"
    if option.spec is None:
        return
    if option.kind == "switch":
        value = not option.default
    table, _, key = option.spec.partition(".")
    document = {table: value if option.kind == "gates" else {key: value}}
    if option.kind == "method_options":
        document["explain"]["methods"] = ["intg"]
        by_flag = parse(flag_tokens(option, text) + ["--methods=intg"])
    argv = spec.spec_arguments(document, str(tmp_path / "audit.toml"))
    by_spec = parse(argv)
    expected = getattr(by_flag, option.name)
    if option.kind == "location":  # a spec's relative path is the spec folder's
        expected = str(tmp_path / expected)
    assert getattr(by_spec, option.name) == expected, f"spec {option.spec} and {option.flag_name} disagree"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_an_option_enters_the_fingerprint_exactly_when_declared_to(option):
    text, _ = sample(option)
    resolved = {"methods": {"intg": {"options": {}}}}
    before = method_fingerprints(parse([]), resolved)
    after = method_fingerprints(parse(flag_tokens(option, text)), resolved)
    assert (before != after) == option.fingerprint, (
        f"{option.name} {'should' if option.fingerprint else 'should not'} change the fingerprint")
    assert (option.name in fingerprint_values(parse([]))) == option.fingerprint


# The options that do not change the rows a method writes, each for a reason; any other option must
# be declared fingerprint=True (a new option lands in one list or the other, by a decision).
NOT_IN_FINGERPRINT = {
    "config": "the spec only sets other options", "input": "rows are keyed by image; shards by their own fingerprint",
    "model": "the history keys maps by the model's sha256", "weights": "part of the model's sha256",
    "model_options": "part of the model's sha256 (a timm model's identity holds them)",
    "trust_model": "how the model loads", "methods": "each method has its own fingerprint",
    "output": "where rows go", "batch_size": "rows do not depend on batching (batch independence)",
    "limit_per_shard": "a shard's limit is recorded with it", "device": "where the model runs",
    "torch_threads": "how many threads", "sanity_check": "a separate table", "sanity_images": "a separate table",
    "sanity_threshold": "a separate table", "method_options": "enter their own method's fingerprint",
    "endpoint_options": "how an endpoint is called", "storage_options": "credentials",
    "output_files": "ignored", "dry_run": "nothing is written", "reclaim_after": "housekeeping",
    "incremental": "the history itself", "slot": "the history's slot", "baseline": "the gates",
    "gates": "the gates", "aae": "enters abele's options, by its file's contents",
    "target": "maps are keyed by their target class: a history skips per (image, method, class)",
    "compile": "the same computation by other kernels, as on another --device: float rounding differs",
}


def test_every_option_is_fingerprinted_or_known_not_to_change_rows():
    undecided = [o.name for o in all_options() if not o.fingerprint and o.name not in NOT_IN_FINGERPRINT]
    assert not undecided, f"options that may change rows but are not in the methods' fingerprint: {undecided}"
    wrongly = [o.name for o in all_options() if o.fingerprint and o.name in NOT_IN_FINGERPRINT]
    assert not wrongly


def test_a_metric_option_is_always_fingerprinted():
    """A metric's options change its columns: the registry refuses one that would not re-explain."""
    from saliency_audit.explainers.core.options import Option
    from saliency_audit.explainers.metrics.registry import Metric, register_metric

    class Careless(Metric):
        name = "careless"
        columns = {"careless": "float32"}
        options = (Option("careless_steps", "integer", default=3, help="steps"),)

    with pytest.raises(TypeError, match="fingerprint"):
        register_metric(Careless)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_the_manifest_records_an_option_unless_it_may_hold_a_secret(option):
    text, _ = sample(option)
    config = parse(flag_tokens(option, text))
    recorded = recorded_options(config)
    assert (option.name in recorded) == (not option.secret)
    resolved = spec.resolved(config, [])
    if option.spec and option.kind not in ("gates", "switch"):
        table, key = option.spec.split(".")
        assert resolved[table][key] == REDACTED if option.secret else key in resolved[table]


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.low is not None or o.high is not None],
                         ids=lambda o: o.name)
def test_a_value_out_of_its_declared_range_is_refused_from_flag_and_spec(option, tmp_path):
    bad = (option.low - 1) if option.low is not None else option.high + 1
    text = str(int(bad)) if option.kind in ("integer", "threads", "batch") else repr(float(bad))
    with pytest.raises(UsageError, match=option.flag_name):
        parse([f"{option.flag_name}={text}"])
    if option.spec is None:
        return
    table, key = option.spec.split(".")
    value = int(bad) if option.kind in ("integer", "threads", "batch") else float(bad)
    with pytest.raises(UsageError, match=f"{table}.{key}"):
        spec.spec_arguments({table: {key: value}}, str(tmp_path / "a.toml"))


def test_the_run_configuration_is_frozen_and_typed():
    config = parse(["--batch-size=8", "--mean=0.5"])
    assert config.batch_size == 8 and config.mean == (0.5,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 9
    assert {f.name for f in dataclasses.fields(config)} == {o.name for o in all_options()}


def test_a_metric_or_method_option_is_declared_beside_its_metric():
    """Options that only a metric or a method reads live in its file, not in the job's list."""
    from saliency_audit.explainers import asset_options
    from saliency_audit.explainers.metrics import metric_options
    from saliency_audit.pipelines.config.options import OPTIONS as CORE
    core = {o.name for o in CORE}
    assert {"road", "metric_steps", "abele_neighbours"} <= {o.name for o in metric_options()}
    assert "aae" in {o.name for o in asset_options()}
    assert not core & {o.name for o in [*metric_options(), *asset_options()]}
