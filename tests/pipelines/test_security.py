"""Hostile model files and credentials on the command line."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from saliency_audit.pipelines import cli
from saliency_audit.pipelines.config.options import REDACTED, UsageError, parse_run_args, redact_argv
from saliency_audit.transforms.model.load import ModelLoadError, ModelSpec, load_model, unsafe_pt2_entry


class Payload:
    """Unpickling this creates the sentinel file: proof that code ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 1, 28, 28),)), str(path))
    return path, model


def rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the archive with change(inner_name, bytes) -> bytes | None applied to each
    entry, then any extra entries change(None, {}) returns."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            inner = info.filename.split("/", 1)[1]
            zout.writestr(info, change(inner, zin.read(info)))
        for inner, data in change(None, b"").items() if change(None, b"") else ():
            zout.writestr(f"{root}/{inner}", data)
    return dst


def pickled_weight(payload: bytes):
    """The first weight marked use_pickle, its file replaced by the payload."""
    def change(inner, data):
        if inner is None:
            return {}
        if inner == "data/weights/model_weights_config.json":
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if inner == "data/weights/weight_0":
            return payload
        return data
    return change


def opaque_constant(payload: bytes):
    """A constant stored as an opaque pickled object (torch loads it with pickle.loads)."""
    def change(inner, data):
        if inner is None:
            return {"data/constants/opaque_obj_0": payload}
        if inner == "data/constants/model_constants_config.json":
            config = json.loads(data)
            config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                        "tensor_meta": None}
            return json.dumps(config).encode()
        return data
    return change


def pickled_sample_inputs(payload: bytes):
    """Sample inputs that only load with weights_only=False (torch falls back to it)."""
    def change(inner, data):
        if inner is None:
            return {}
        return payload if inner == "data/sample_inputs/model.pt" else data
    return change


MALICIOUS = {"weight marked use_pickle": (pickled_weight, "data/weights/weight_0", "use_pickle"),
             "opaque constant": (opaque_constant, "data/constants/opaque_obj_0", "use_pickle"),
             "pickled sample inputs": (pickled_sample_inputs, "data/sample_inputs/model.pt", "weights_only")}


@pytest.fixture(params=list(MALICIOUS))
def malicious(request, exported, tmp_path) -> tuple[Path, Path, str]:
    make, entry, words = MALICIOUS[request.param]
    sentinel = tmp_path / "payload-ran"
    path = rewrite(exported[0], tmp_path / "evil.pt2", make(pickle.dumps(Payload(sentinel))))
    return path, sentinel, entry, words


def test_malicious_pt2_is_refused_before_anything_is_unpickled(malicious):
    path, sentinel, entry, words = malicious
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSpec(str(path)))
    message = str(info.value)
    assert not sentinel.exists(), "the pickled payload ran"
    assert "\n" not in message and entry in message and words in message and "--trust-model" in message


def test_trust_model_lets_the_archive_be_unpickled(exported, tmp_path):
    """The gate is what stops the payload: with --trust-model torch unpickles it."""
    sentinel = tmp_path / "payload-ran"
    path = rewrite(exported[0], tmp_path / "evil.pt2", pickled_weight(pickle.dumps(Payload(sentinel))))
    with pytest.raises(ModelLoadError):  # the payload is no tensor, so the load fails after running it
        load_model(ModelSpec(str(path), trust_model=True))
    assert sentinel.exists()


def test_run_with_a_malicious_pt2_exits_2_with_one_line(exported, tmp_path, capsys, demo_shard):
    sentinel = tmp_path / "payload-ran"
    path = rewrite(exported[0], tmp_path / "evil.pt2", pickled_weight(pickle.dumps(Payload(sentinel))))
    code = cli.main(["run", "--input", str(demo_shard), "--model", str(path), "--methods", "sal",
                     "--output", str(tmp_path / "out"), "--channels", "1", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saliency-audit")]
    assert code == 2 and not sentinel.exists() and not (tmp_path / "out").exists()
    assert len(lines) == 1 and "would unpickle entry" in lines[0] and "weight_0" in lines[0], lines


def test_a_normal_pt2_still_loads(exported):
    path, model = exported
    assert unsafe_pt2_entry(str(path)) is None
    x = torch.rand(1, 1, 28, 28)  # exported for batch 1
    torch.testing.assert_close(load_model(ModelSpec(str(path)))(x), model(x))


def test_a_pt2_that_is_no_zip_fails_with_one_line(tmp_path):
    (tmp_path / "junk.pt2").write_bytes(b"not a zip" * 50)
    with pytest.raises(ModelLoadError, match="junk.pt2") as info:
        load_model(ModelSpec(str(tmp_path / "junk.pt2")))
    assert "\n" not in str(info.value)


SECRET = '{"key": "AKIA-SECRET", "secret": "s3cr3t", "token": "t0k3n"}'


@pytest.mark.parametrize("argv", [
    ["--storage-options", SECRET],
    [f"--storage-options={SECRET}"],
    ["--storage_options", SECRET],
    ["--s3_access_key_id", SECRET],
    [f"--s3_access_key_id={SECRET}"],
    ["--s3_secret_access_key", SECRET],
    [f"--s3_secret_access_key={SECRET}"],
    ["--s3_session_token", SECRET],
    [f"--s3_session_token={SECRET}"],
    ["--db-password", SECRET],
    [f"--gcp_credentials={SECRET}"],
    ["--api-key", "-starts-with-a-dash"],
    ["--storage-opt", SECRET],  # a prefix spelling is refused by the parser; hidden all the same
])
def test_every_spelling_of_a_secret_is_redacted(argv):
    full = ["--input", "x", *argv, "--runner", "DirectRunner", "--save_main_session"]
    redacted = redact_argv(full)
    assert len(redacted) == len(full)
    assert not any(SECRET in a or "starts-with-a-dash" in a for a in redacted), redacted
    assert REDACTED in " ".join(redacted)
    assert redacted[:2] == ["--input", "x"] and redacted[-3:] == ["--runner", "DirectRunner", "--save_main_session"]


def test_boolean_flags_named_like_secrets_keep_the_next_argument():
    assert redact_argv(["--enable_hot_key_logging", "--runner", "DirectRunner"]) == \
        ["--enable_hot_key_logging", "--runner", "DirectRunner"]
    assert redact_argv(["--methods", "sal", "--output", "out"]) == ["--methods", "sal", "--output", "out"]


BASE = ["--input", "x.tar", "--model", "m.pt", "--output", "out"]


@pytest.mark.parametrize("prefix", ["--storage-opt", "--storage", "--storage-option"])
def test_prefix_spellings_are_rejected_without_echoing_the_value(prefix):
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, prefix, SECRET])
    assert f"unknown option {prefix}; did you mean --storage-options?" == str(info.value)
    with pytest.raises(UsageError) as info:
        parse_run_args([*BASE, f"{prefix}={SECRET}"])
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("argv", [
    ["report", "dir", "--output", "r.html", "--storage-opt", SECRET],
    ["figure", "dir", "--ids", "a", "--output", "f.png", "--storage-opt", SECRET],
    ["diff", "a", "b", "--output", "d", "--storage-opt", SECRET],
    ["shards", "--from-idx", "x", "--output", "d", "--shard", "5"],
])
def test_subcommands_refuse_prefix_spellings_and_hide_their_values(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unrecognized arguments: --" in err
    assert SECRET not in err


@pytest.mark.parametrize("command", ["train-classifier", "train-aae"])
def test_training_commands_refuse_prefix_spellings(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--input", "x", "--output", "m.pt", "--storage-opt", SECRET])
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_demo_refuses_a_prefix_of_its_own_flag(tmp_path, capsys):
    # --limit used to be taken for --limit-per-shard; now run refuses it before any work
    assert cli.main(["demo", "--output", str(tmp_path / "out"), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --limit; did you mean --limit-per-shard?" in err
    assert not (tmp_path / "out").exists()
