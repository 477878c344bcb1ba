"""run --config SPEC: a TOML/YAML audit spec, overridden by flags, recorded resolved in the manifest;
a bad spec fails in one line with exit code 2, naming the key."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml
from audit_fixtures import sample_shard
from conftest import DEMO_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.config import spec
from saliency_audit.pipelines.config.options import REDACTED, UsageError

N_IMAGES = 8
SPEC = """\
[input]
path = "shards/sample.tar"          # relative to this file's folder

[model]
path = "saliency_audit.pipelines.training.reference_model:mnist_cnn"
weights = "{weights}"
device = "cpu"

[preprocessing]
channels = 1

[explain]
methods = ["grad"]
batch_size = 4
seed = 7

[metrics]
steps = 4

[output]
path = "out"
"""
# The same audit as flags (paths absolute: the flags resolve against the working directory).
FLAGS = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt"),
         "--device", "cpu", "--channels", "1", "--methods", "grad", "--batch-size", "4", "--seed", "7",
         "--metric-steps", "4"]
BASE = ["--input", "x.tar", "--model", "m.pt", "--output", "out"]


def write(folder: Path, name: str, text: str | bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.fixture()
def spec_file(tmp_path) -> Path:
    folder = tmp_path / "audit"
    sample_shard(folder / "shards", N_IMAGES)
    return Path(write(folder, "audit.toml", SPEC.format(weights=DEMO_DATA / "mnist_cnn.pt")))


def rows(output: Path, name: str, drop: tuple[str, ...] = ()) -> list[dict]:
    table = ds.dataset(str(output / name), format="parquet").to_table()
    table = table.drop([c for c in drop if c in table.column_names])
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


@pytest.mark.slow
def test_a_spec_runs_the_same_audit_as_its_flags(spec_file, tmp_path):
    by_spec = audit.run(["--config", str(spec_file)])
    flags_out = tmp_path / "flags-out"
    by_flags = audit.run(["--input", str(spec_file.parent / "shards" / "sample.tar"), *FLAGS,
                          "--output", str(flags_out)])
    spec_out = spec_file.parent / "out"  # relative to the spec's folder, not the working directory
    assert by_spec["counts"] == by_flags["counts"] == {"grad": {"read": N_IMAGES + 1, "explained": N_IMAGES,
                                                                "errors": 1}}
    for name, drop in (("saliency", ("time_ms",)), ("errors", ()), ("summary", ("mean_time_ms",))):
        assert rows(spec_out, name, drop) == rows(flags_out, name, drop), name
    skip = {"output", "config"}
    assert {k: v for k, v in by_spec["options"].items() if k not in skip} == \
        {k: v for k, v in by_flags["options"].items() if k not in skip}
    resolved = by_spec["spec"]["resolved"]
    assert by_spec["spec"]["file"] == str(spec_file) and by_flags["spec"]["file"] is None
    assert resolved["output"]["path"] == str(spec_out)
    assert resolved["input"]["path"] == str(spec_file.parent / "shards" / "sample.tar")
    flags_resolved = by_flags["spec"]["resolved"]
    assert resolved == flags_resolved | {"output": {**flags_resolved["output"], "path": str(spec_out)}}
    assert resolved["explain"] == {"methods": ["grad"], "options": {}, "target": "predicted", "seed": 7,
                                   "batch_size": 4, "precision": "fp32", "compile": False}


def test_config_works_with_dry_run(spec_file, capsys):
    assert audit.main(["--config", str(spec_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"1 shard(s), {N_IMAGES + 1} record(s)" in out and "Nothing was run" in out
    assert not (spec_file.parent / "out").exists()


OVERRIDDEN = """\
[input]
path = "x.tar"
[model]
path = "m.pt"
[output]
path = "out"
[explain]
methods = ["grad", "intg"]
seed = 1
[explain.options.intg]
n_steps = 8
[sanity_check]
enabled = true
images = 4
[beam]
direct_num_workers = 2
"""


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "audit.toml", OVERRIDDEN)
    args, beam_args = spec.parse_invocation(["--config", path])
    assert (args.seed, args.methods, args.method_options, args.sanity_check, args.sanity_images) == (
        1, "grad,intg", {"intg": {"n_steps": 8}}, True, 4)
    assert args.input == str(tmp_path / "x.tar") and args.model == str(tmp_path / "m.pt")
    args, beam_args = spec.parse_invocation(["--config", path, "--seed", "5", "--no-sanity-check", "--input",
                                             "s3://bucket/*.tar", "--direct_num_workers=3"])
    assert (args.seed, args.sanity_check, args.sanity_images, args.input) == (5, False, 4, "s3://bucket/*.tar")
    resolved = spec.resolved(args, beam_args)
    assert resolved["explain"]["seed"] == 5 and resolved["sanity_check"]["enabled"] is False
    assert resolved["beam"] == {"direct_num_workers": "3"}
    # a --methods that leaves intg out drops the spec's options for intg instead of failing
    args, _ = spec.parse_invocation(["--config", path, "--methods", "grad"])
    assert (args.methods, args.method_options) == ("grad", {})


def test_toml_and_yaml_specs_mean_the_same(tmp_path):
    import tomllib
    document = tomllib.loads(OVERRIDDEN)
    from_toml = spec.parse_invocation(["--config", write(tmp_path, "a.toml", OVERRIDDEN)])
    from_yaml = spec.parse_invocation(["--config", write(tmp_path, "a.yml", yaml.safe_dump(document))])
    assert vars(from_toml[0]) | {"config": None} == vars(from_yaml[0]) | {"config": None}
    assert from_toml[1] == from_yaml[1]


def test_the_resolved_spec_runs_the_same_and_hides_secrets(tmp_path):
    path = write(tmp_path, "audit.yaml", yaml.safe_dump({
        **yaml.safe_load(yaml.safe_dump(__import__("tomllib").loads(OVERRIDDEN))),
        "preprocessing": {"resize": [28, 28], "mean": [0.5], "std": [0.25], "channels": 1},
        "explain": {"methods": ["grad", "intg"], "options": {"intg": {"n_steps": 8}}, "target": 3}}))
    argv = ["--config", path, "--s3_secret_access_key", "AKIA-S3CR3T"]
    args, beam_args = spec.parse_invocation(argv)
    resolved = spec.resolved(args, beam_args)
    assert resolved["beam"]["s3_secret_access_key"] == REDACTED
    again = spec.parse_invocation(["--config", write(tmp_path / "again", "resolved.yaml", yaml.safe_dump(resolved))])
    assert vars(again[0]) | {"config": None} == vars(args) | {"config": None}

    secret = write(tmp_path, "secret.toml", OVERRIDDEN + '[storage]\noptions = {key = "AKIA-S3CR3T"}\n')
    entry = spec.manifest_entry(*spec.parse_invocation(["--config", secret]))
    assert entry["resolved"]["storage"] == {"options": REDACTED} and "AKIA-S3CR3T" not in json.dumps(entry)
    bad = write(tmp_path, "bad-secret.toml", OVERRIDDEN + '[storage]\noptions = "AKIA-S3CR3T"\n')
    with pytest.raises(UsageError) as info:
        spec.parse_invocation(["--config", bad])
    assert "storage.options: expected a table" in str(info.value) and "AKIA" not in str(info.value)


HUGE = "# padding\n" * 110_000
BAD_SPECS = [  # (file name, content, the one line's expected words)
    ("typo.toml", "[explain]\nmethds = ['grad']\n", "unknown key explain.methds; did you mean explain.methods?"),
    ("table.toml", "[metric]\nsteps = 4\n", "unknown key metric; did you mean metrics?"),
    ("misplaced.toml", "batch_size = 4\n", "unknown key batch_size; did you mean explain.batch_size?"),
    ("gates.toml", "[gates]\naccuracy_drop = \"x\"\n", "gates.accuracy_drop: expected a number"),
    ("gate.toml", "[gates]\nndgc = 0.9\n", "unknown key gates.ndgc; did you mean gates.ndcg?"),
    ("baseline.yaml", "baseline:\n  path: [old]\n", "baseline.path: expected a string"),
    ("beam.toml", "[beam]\nrunerr = 'DirectRunner'\n", "unknown key beam.runerr; did you mean beam.runner?"),
    ("type.toml", "[explain]\nbatch_size = '32'\n", 'explain.batch_size: expected "auto" or a number of images, got a string'),
    ("list.toml", "[explain]\nmethods = 'grad,intg'\n", "explain.methods: expected a list of method names"),
    ("number.yaml", "preprocessing:\n  mean: '0.5'\n", "preprocessing.mean: expected a list of numbers"),
    ("bool.toml", "[metrics]\nenabled = 'no'\n", "metrics.enabled: expected true or false"),
    ("range.toml", "[explain]\nbatch_size = 0\n", "explain.batch_size: must be at least 1, got 0"),
    ("range2.toml", "[sanity_check]\nthreshold = 1.5\n", "sanity_check.threshold: must be between -1 and 1"),
    ("nan.toml", "[sanity_check]\nthreshold = nan\n", "sanity_check.threshold: must be between -1 and 1"),
    ("choice.toml", "[output]\nmap_dtype = 'float64'\n", "output.map_dtype: must be one of float32, float16"),
    ("target.toml", "[explain]\ntarget = -1\n", "explain.target: must be predicted, label or a class index"),
    ("beamvalue.toml", "[beam]\ndirect_num_workers = 'two'\n", "beam.direct_num_workers: "),
    ("options.toml", "[explain]\nmethods = ['grad']\n[explain.options.intgg]\nn_steps = 1\n",
     "explain.options.intgg: intgg is not in explain.methods"),
    ("syntax.toml", "[input]\npath = 'x'\nmethods = [\n", "invalid TOML"),
    ("syntax.yaml", "input:\n  path: x\n  - y\n", "invalid YAML"),
    ("python.yaml", "input:\n  path: !!python/object/apply:os.system ['touch {marker}']\n",
     "invalid YAML: could not determine a constructor for the tag"),
    ("huge.toml", HUGE, "larger than 1024 KiB"),
    ("deep.toml", "a = " + "[" * 2000 + "]" * 2000 + "\n", "nested deeper than 8 levels"),
    ("deep.yaml", "a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 8 levels"),
    ("bomb.yaml", "a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
     "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
     "more than 10000 values"),
    ("keys.yaml", "input:\n  on: 1\n", 'input."True": keys must be strings'),
    # YAML would keep the last of two equal keys, silently dropping the first table; TOML refuses them
    ("twice.yaml", "gates:\n  ndcg: 0.9\nexplain:\n  seed: 1\ngates:\n  accuracy_drop: 0.1\n",
     "invalid YAML: found duplicate key 'gates' (at line 5, column 1)"),
    ("twice-nested.yaml", "explain:\n  seed: 1\n  seed: 2\n", "found duplicate key 'seed' (at line 3, column 3)"),
    ("twice.toml", "[gates]\nndcg = 0.9\n[gates]\naccuracy_drop = 0.1\n", "invalid TOML: Cannot declare"),
    ("binary.toml", b"\xff\xfe[input]\n", "not UTF-8 text"),
    ("spec.json", "{}", "expected a .toml, .yaml or .yml file"),
    # values the parsers cannot build raise plain ValueErrors: still one line, exit 2
    ("date.yaml", "input:\n  path: x\n  when: 2001-13-45\n", "invalid YAML value"),
    ("float.yaml", "input:\n  limit_per_shard: !!float x\n", "invalid YAML value"),
    ("digits.toml", "a = " + "1" * 5000 + "\n", "invalid TOML value"),
]


@pytest.mark.parametrize("name,content,message", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_a_bad_spec_fails_in_one_line_naming_the_key(name, content, message, tmp_path, capsys):
    marker = tmp_path / "executed"
    if isinstance(content, str):
        content = content.replace("{marker}", str(marker))
    path = write(tmp_path, name, content)
    assert audit.main(["--config", path, *BASE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not marker.exists()  # nothing in a YAML file is executed


def test_bad_syntax_names_the_line_and_a_missing_file_fails(tmp_path, capsys):
    path = write(tmp_path, "syntax.toml", "[input]\npath = = 'x'\n[model]\n")
    with pytest.raises(UsageError, match=r"invalid TOML: .*line 2, column 8"):
        spec.parse_invocation(["--config", path])
    path = write(tmp_path, "end.toml", "[input]\npath = 'x'\nmethods = [\n")
    with pytest.raises(UsageError, match=r"invalid TOML: .*end of document, line 4"):
        spec.parse_invocation(["--config", path])
    with pytest.raises(UsageError, match=r"line 3"):
        spec.parse_invocation(["--config", write(tmp_path, "syntax.yaml", "input:\n  path: x\n  - y\n")])
    assert audit.main(["--config", str(tmp_path / "nope.toml"), *BASE]) == 2
    assert capsys.readouterr().err == f"saliency-audit: error: --config {tmp_path / 'nope.toml'}: no such file\n"
    assert audit.main(["--confg", str(tmp_path / "nope.toml"), *BASE]) == 2
    assert "unknown option --confg; did you mean --config?" in capsys.readouterr().err


# --- fuzz: any document gives a plan or one UsageError line, never a traceback -------------------

LEAVES = sorted({name for keys in spec.SCHEMA.values() for name in keys}
                | {"runner", "direct_num_workers", "experiments", "save_main_session", "grad", "intg"})
names = st.one_of(st.sampled_from(LEAVES), st.text(st.characters(blacklist_categories=("Cs",)), max_size=8))
scalars = st.one_of(st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1), st.integers(0, 64), st.floats(),
                    st.floats(-1, 1), st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
                    st.sampled_from(["grad", "predicted", "float16", "zero", "DirectRunner", "x.tar", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(names, inner, max_size=4)), max_leaves=12)
# mostly real tables with their own keys (to reach the value checks), sometimes anything
real_tables = st.lists(st.sampled_from(sorted(spec.SCHEMA.items())).flatmap(
    lambda table: st.dictionaries(st.one_of(st.sampled_from(sorted(table[1])), names), values, max_size=4)
    .map(lambda body: (table[0], body))), max_size=5).map(dict)
any_tables = st.dictionaries(st.one_of(st.sampled_from([*spec.SCHEMA, "beam", "gates"]), names),
                             st.one_of(st.dictionaries(names, values, max_size=5), values), max_size=5)
documents = st.one_of(real_tables, real_tables, any_tables)


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict) -> str:
    """A TOML text for the document (plain keys first, then one [table] per table)."""
    plain = [f"{toml_string(k)} = {toml_value(v)}" for k, v in document.items() if not isinstance(v, dict)]
    tables = [f"[{toml_string(k)}]\n" + "\n".join(f"{toml_string(n)} = {toml_value(x)}" for n, x in v.items())
              for k, v in document.items() if isinstance(v, dict)]
    return "\n".join(plain + tables) + "\n"


def outcome(name: str, text: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), name, text)
        try:
            spec.parse_invocation(["--config", path, *BASE])
        except UsageError as e:
            assert "\n" not in str(e) and str(e)
            return "usage error"
    return "plan"


@pytest.mark.slow
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_fuzzed_toml_documents_give_a_plan_or_one_line(document):
    outcome("audit.toml", toml_document(document))


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_fuzzed_yaml_documents_give_a_plan_or_one_line(document):
    outcome("audit.yaml", yaml.safe_dump(document))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([*"[]{}=:-.,'\"\n #!&*abc01_", "input", "beam", "path", "!!python/name:"]),
                max_size=40).map("".join), st.sampled_from(["audit.toml", "audit.yaml"]))
def test_fuzzed_text_gives_a_plan_or_one_line(text, name):
    outcome(name, text)


def test_the_fuzz_reaches_valid_plans(tmp_path):
    """The strategies can produce documents that pass (so the fuzz tests more than the errors)."""
    document = {"explain": {"methods": ["grad"], "seed": 3}, "beam": {"runner": "DirectRunner"}}
    assert outcome("audit.toml", toml_document(document)) == "plan"
    assert outcome("audit.yaml", yaml.safe_dump(document)) == "plan"


def test_yaml_merge_keys_still_override_what_they_merge(tmp_path):
    """The duplicate-key check keeps safe_load's semantics: a key after ``<<: *base`` overrides it."""
    path = write(tmp_path, "merge.yaml", "x-base: &base {seed: 1, batch_size: 4}\n")
    assert spec._parse_yaml("base: &base {seed: 1, batch_size: 4}\nexplain:\n  <<: *base\n  seed: 2\n") == {
        "base": {"seed": 1, "batch_size": 4}, "explain": {"seed": 2, "batch_size": 4}}
    assert spec.load(path) == {"x-base": {"seed": 1, "batch_size": 4}}


def test_two_config_flags_are_refused(tmp_path, capsys):
    first, second = write(tmp_path, "a.toml", OVERRIDDEN), write(tmp_path, "b.toml", OVERRIDDEN)
    assert audit.main(["--config", first, f"--config={second}", *BASE]) == 2
    assert capsys.readouterr().err == "saliency-audit: error: --config given twice; give one spec\n"
    assert cli.main(["check", str(tmp_path), "--config", first, "--config", second]) == 2
    assert capsys.readouterr().err == "saliency-audit check: error: --config given twice; give one spec\n"


HISTORY = '\n[history]\nincremental = true\nslot = "2026-11-30"\n'


def test_no_incremental_on_the_command_line_also_drops_the_specs_slot(spec_file, capsys):
    spec_file.write_text(spec_file.read_text() + HISTORY)
    assert spec.parse_invocation(["--config", str(spec_file)])[0].slot == "2026-11-30"
    plan = audit.plan(["--config", str(spec_file), "--no-incremental"])
    assert (plan.options.incremental, plan.options.slot, plan.work) == (False, None, None)
    args, _ = spec.parse_invocation(["--config", str(spec_file), "--no-incremental", "--incremental"])
    assert (args.incremental, args.slot) == (True, "2026-11-30")  # the last switch wins, with the spec's slot
    # a slot asked for on the command line with --no-incremental still contradicts it
    assert audit.main(["--config", str(spec_file), "--no-incremental", "--slot", "x"]) == 2
    assert "--slot names a slot of an audit history: it needs --incremental" in capsys.readouterr().err


@pytest.mark.parametrize("given", [["--metric-steps", "785"], ["--metric-steps", "1000", "--dry-run"], "spec"])
def test_more_metric_steps_than_pixels_fail_in_preflight(given, spec_file, capsys):
    """Deletion/insertion removes at least one pixel per step: a 28x28 input has 784 steps at most."""
    if given == "spec":
        spec_file.write_text(spec_file.read_text().replace("steps = 4", "steps = 785"))
        given = []
    assert audit.main(["--config", str(spec_file), *given]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in out + err, err
    assert "--metric-steps" in err and "784 pixels" in err and "28x28" in err, err
    assert not (spec_file.parent / "out").exists()
