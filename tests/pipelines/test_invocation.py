"""Bad invocations fail before any work, with one line and exit code 2; Beam's own options pass."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.config.options import UsageError, beam_option_parser, parse_run_args
from saliency_audit.pipelines.job import phases
from saliency_audit.pipelines.job.preflight import check_shards

BASE = ["--input", "x.tar", "--model", "m.pt", "--output", "out"]
BEAM_ARGS = ["--runner", "DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers", "2",
             "--job_endpoint=embed", "--environment_type=EXTERNAL", "--environment_config=localhost:50000",
             "--save_main_session"]


def test_beam_options_in_every_form_pass_through():
    args, beam_args = parse_run_args([*BASE, *BEAM_ARGS, "--methods", "sal"])
    assert beam_args == BEAM_ARGS and args.methods == "sal"


@pytest.mark.parametrize("argv,message", [
    (["--methds", "sal"], "unknown option --methds; did you mean --methods?"),
    (["--methds=sal"], "unknown option --methds; did you mean --methods?"),
    (["--direct_num_worker", "2"], "unknown option --direct_num_worker; did you mean --direct_num_workers?"),
    (["--runer", "DirectRunner"], "unknown option --runer; did you mean --runner?"),
    (["--zzqqxx"], "unknown option --zzqqxx"),
    (["stray"], "unexpected argument 'stray'"),
    (["--direct_num_workers", "two"], "invalid int value: 'two'"),
])
def test_unknown_flags_fail_with_a_suggestion(argv, message):
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, *argv])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--target", "-1"], "--target: must be predicted, label or a class index >= 0"),
    (["--target", "first"], "--target: must be predicted, label or a class index >= 0"),
    (["--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
    (["--max-pixels", "-1"], "--max-pixels must be at least 1, got -1"),
    (["--metric-steps", "0"], "--metric-steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--output-files", "0"], "--output-files must be at least 1"),
    (["--sanity-images", "0"], "--sanity-images must be at least 1"),
    (["--abele-neighbours", "0"], "--abele-neighbours must be at least 1"),
    (["--limit-per-shard", "0"], "--limit-per-shard must be at least 1"),
    (["--sanity-threshold", "1.5"], "--sanity-threshold must be between -1 and 1"),
    (["--sanity-threshold", "nan"], "--sanity-threshold must be between -1 and 1"),
    (["--mean", "0.5,nan"], "--mean: expected comma-separated numbers"),
    (["--batch-size", "lots"], "expected auto or a number of images"),
])
def test_bad_values_fail_at_parse_time(argv, message):
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, *argv])
    assert message in str(info.value)


def test_good_values_pass():
    args, _ = parse_run_args([*BASE, "--target", "7", "--max-pixels", "1", "--sanity-threshold", "-1",
                              "--metric-steps", "1", "--output-files", "1"])
    assert (args.target, args.max_pixels, args.sanity_threshold) == ("7", 1, -1.0)


def run_main(argv, capsys) -> tuple[int, list[str]]:
    code = audit.main(argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("saliency-audit")]


def test_a_target_outside_the_model_fails_in_preflight(demo_shard, demo_model_args, tmp_path, capsys):
    code, lines = run_main(["--input", str(demo_shard), *demo_model_args, "--methods", "sal", "--channels", "1",
                            "--device", "cpu", "--target", "99", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--target 99 is not a class of the model, which has 10 (0 to 9)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_without_images_fails_in_preflight(demo_model_args, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for name in ("a.txt", "b.txt", "notes.md"):
        (tmp_path / "in" / name).write_text("not an image")
    code, lines = run_main(["--input", str(tmp_path / "in"), *demo_model_args, "--methods", "sal",
                            "--channels", "1", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "no image shards among the 3 file(s)" in lines[0] and "(found: .md, .txt)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_check_shards():
    mixed = ["s3://b/a.tar", "s3://b/readme.txt"]
    assert check_shards(mixed, "s3://b/*") == mixed  # the .txt still becomes one counted error row
    with pytest.raises(UsageError, match=r"no image shards among the 2 file\(s\) matching s3://b/\* "
                                         r"\(found: \(no extension\), \.txt\); supported: \.tar"):
        check_shards(["s3://b/readme.txt", "s3://b/LICENSE"], "s3://b/*")


@pytest.mark.parametrize("extra,message", [
    (["--methds", "sal"], "unknown option --methds; did you mean --methods?"),
    (["--metric-steps", "0"], "--metric-steps must be at least 1"),
])
def test_demo_rejects_bad_extra_flags_before_any_work(extra, message, tmp_path, capsys):
    assert cli.main(["demo", "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- what parsing imports ----------------------------------------------------------------------------

def heavy_imports_while_parsing(*argvs: list[str]) -> list[tuple[int, list[str]]]:
    """For each command line, in one fresh process: cli.main's exit code and which of torch and
    apache_beam were imported by then (a fresh process: this one has imported both)."""
    script = ("import json, sys\nfrom saliency_audit.pipelines import cli\nseen = []\n"
              f"for argv in {list(argvs)!r}:\n"
              "    try:\n        code = cli.main(argv)\n    except SystemExit as e:\n        code = e.code\n"
              "    seen.append((code, sorted(m for m in ('apache_beam', 'torch') if m in sys.modules)))\n"
              "print(json.dumps(seen))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return [tuple(item) for item in json.loads(done.stdout.splitlines()[-1])]


def test_help_and_usage_errors_import_neither_torch_nor_beam():
    """Parsing needs no model: --help and a bad command line answer at once, importing neither
    torch (over a second) nor Beam. Not run (below), check (it reads run's spec and options) nor
    benchmark (torch throughout)."""
    helps = [["--help"], *([name, "--help"] for name in cli.COMMANDS if name not in ("run", "check", "benchmark"))]
    errors = [["report", "audit", "--output", "page.html", "--per-class", "x"], ["figure", "audit", "--output", "f.png"]]
    assert heavy_imports_while_parsing(*helps, *errors) == [(0, [])] * len(helps) + [(2, [])] * len(errors)


def test_run_parses_without_beam():
    """run's options include those the metrics and methods declare, in their torch modules, but
    Beam's are read only once ours parse."""
    seen = heavy_imports_while_parsing(["run", "--help"], ["run", *BASE, "--batch-size", "0"])
    assert [code for code, _ in seen] == [0, 2] and not any("apache_beam" in modules for _, modules in seen)


# --- fuzzing the command line -------------------------------------------------------------------

OUR_FLAGS = {"--methods": ["sal", "sal,grad", "", "nope"], "--target": ["predicted", "label", "3", "-1", "x"],
             "--batch-size": ["1", "32", "0", "-3", "big"], "--max-pixels": ["1", "0", "-1", "1e9"],
             "--metric-steps": ["16", "0"], "--sanity-threshold": ["0.5", "-1", "2", "nan", "inf"],
             "--method-options": ['{"sal": {}}', "[]", "{", "null"], "--storage-options": ["{}", "{bad"],
             "--resize": ["28,28", "28x28", "a,b", "1"], "--mean": ["0.5", "nan", ""], "--seed": ["0", "-5", "s"],
             "--metric-substrate": ["zero", "blur", "paint"], "--channels": ["1", "3", "2"],
             "--output-files": ["1", "0"], "--limit-per-shard": ["5", "0"]}
OUR_SWITCHES = ["--no-metrics", "--metrics", "--sanity-check", "--abele-metrics", "--trust-model", "--to-grayscale"]
BEAM_FLAGS = {"--runner": ["DirectRunner", "PortableRunner"], "--direct_num_workers": ["2", "x"],
              "--direct_running_mode": ["multi_processing", "in_memory"], "--job_endpoint": ["embed"],
              "--environment_type": ["EXTERNAL", "LOOPBACK"], "--environment_config": ["localhost:50000"]}
BEAM_SWITCHES = ["--save_main_session", "--streaming"]
JUNK_FLAGS = ["--methds", "--zz-nope", "--runer", "--direct-num-workers", "-x", "--", "---methods", "--METHODS"]
PREFIXES = ["--meth", "--storage-opt", "--targ", "--batch", "--metric-st", "--sanity-th", "--no-met"]
VALUES = ["sal", "0", "-1", "", "=", "{}", "x=y", "--", "é", " "]


def flag_with_value(flags: dict[str, list[str]]):
    return st.sampled_from(sorted(flags)).flatmap(lambda f: st.sampled_from(flags[f]).flatmap(
        lambda v: st.sampled_from([[f, v], [f"{f}={v}"]])))


UNKNOWN = st.sampled_from(JUNK_FLAGS + PREFIXES)
ITEM = st.one_of(flag_with_value(OUR_FLAGS), flag_with_value(BEAM_FLAGS),
                 st.sampled_from(OUR_SWITCHES + BEAM_SWITCHES).map(lambda f: [f]),
                 UNKNOWN.map(lambda f: [f]), UNKNOWN.flatmap(lambda f: st.sampled_from(VALUES).map(lambda v: [f, v])),
                 st.sampled_from(VALUES).map(lambda v: [v]))


@pytest.mark.slow
@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(ITEM, max_size=5), st.sampled_from([1, 2, 3, 4, 5, 6, None]))
def test_fuzzed_command_lines_parse_or_fail_cleanly(items, base_at):
    if base_at is not None:  # the required flags between two items, or (None) left out
        items = [*items[:base_at], BASE, *items[base_at:]]
    argv = [token for item in items for token in item]
    try:
        args, beam_args = parse_run_args(argv)
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
        return
    # accepted: every leftover is a Beam option or its value, and no unknown flag got through
    assert not any(token in JUNK_FLAGS + PREFIXES for token in argv), argv
    beam = beam_option_parser()
    names = [t.split("=", 1)[0] for t in beam_args if t.startswith("-")]
    assert all(name in beam._option_string_actions for name in names), beam_args
    assert args.batch_size >= 1 and args.max_pixels >= 1 and -1 <= args.sanity_threshold <= 1


@pytest.mark.slow
def test_a_run_that_fails_exits_3_not_a_gates_1(tmp_path, demo_shard, demo_model_args, monkeypatch, capfd):
    """Exit codes a scheduler can act on: 1 means published with a failed gate, 3 that the run
    itself failed and nothing was published."""
    from saliency_audit.pipelines import audit

    def broken(*args, **kwargs):
        raise RuntimeError("planted storage outage")

    monkeypatch.setattr(phases, "verify", broken)
    code = audit.main(["--input", str(demo_shard), *demo_model_args, "--methods", "sal", "--channels", "1",
                       "--limit-per-shard", "4", "--no-metrics", "--output", str(tmp_path / "out")])
    assert code == 3
    assert "planted storage outage" in capfd.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
