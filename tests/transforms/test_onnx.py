"""ONNX models (--model FILE.onnx, run by onnxruntime): the forward-only methods audit the
exported file and give the torch model's maps; gradient methods, the sanity check and inputs
the graph does not take fail before any work with one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, read_output

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.training.reference_model import mnist_cnn

pytest.importorskip("onnxruntime")
TORCH_MODEL = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO_DATA / "mnist_cnn.pt")]
# small options: the comparison needs the same computation, not a full-size one
OPTIONS = json.dumps({"lime": {"n_samples": 200}, "occlusion": {"window": 7, "stride": 7},
                      "lore": {"population_size": 200, "generations": 4},
                      "abele": {"neighbours": 200, "generations": 4}})
BLACK_BOX = "occlusion,lime,anchor,lore,abele"


def reference_cnn() -> torch.nn.Module:
    model = mnist_cnn()
    model.load_state_dict(torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True))
    return model.eval()


def export(path, batch: int | None = None) -> str:
    """The reference CNN as ONNX: any batch size, or a fixed one."""
    pytest.importorskip("onnx")
    dynamic = None if batch else {"images": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(reference_cnn(), (torch.zeros(batch or 2, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["images"], output_names=["logits"], dynamic_axes=dynamic)
    return str(path)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> str:
    return export(tmp_path_factory.mktemp("onnx") / "cnn.onnx")


def run(tmp_path, model_args, name, methods=BLACK_BOX, *extra) -> dict:
    out = tmp_path / name
    audit.run(["--input", str(DEMO_DATA / "mnist-test-sample.tar"), *model_args, "--methods", methods,
               "--aae", str(DEMO_DATA / "mnist_aae.pt"), "--channels", "1", "--limit-per-shard", "3",
               "--batch-size", "4", "--torch-threads", "1", "--output", str(out), "--method-options",
               json.dumps({m: o for m, o in json.loads(OPTIONS).items() if m in methods.split(",")}),
               *extra])
    return {(r["image_id"], r["method"]): r for r in read_output(out / "saliency")}


@pytest.mark.slow
def test_forward_only_methods_give_the_torch_models_maps(onnx_file, tmp_path):
    torch_rows = run(tmp_path, TORCH_MODEL, "torch")
    onnx_rows = run(tmp_path, ["--model", onnx_file], "onnx")
    assert onnx_rows.keys() == torch_rows.keys() and len(onnx_rows) == 3 * len(BLACK_BOX.split(","))
    for key, row in onnx_rows.items():
        mine, theirs = np.asarray(row["saliency"]), np.asarray(torch_rows[key]["saliency"])
        np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max(), err_msg=str(key))
        assert row["predicted"] == torch_rows[key]["predicted"]
        for metric in ("score", "deletion_auc", "insertion_auc"):
            assert row[metric] == pytest.approx(torch_rows[key][metric], abs=1e-4), (key, metric)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_graph_with_a_fixed_batch_size_is_fed_one_batch_at_a_time(tmp_path, batch):
    """5 images through a graph that takes exactly ``batch``: the last batch is padded, and the
    padding's answers dropped."""
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    model = load_model(ModelSpec(export(tmp_path / "fixed.onnx", batch=batch)))
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(model(x), reference_cnn()(x), rtol=1e-4, atol=1e-4)


def one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("extra,expected", [
    (["--methods", "sal,occlusion,intg"], r"sal, intg need gradients.*forward passes only.*occlusion"),
    (["--methods", "occlusion", "--sanity-check"], r"--sanity-check.*layers"),
    (["--methods", "occlusion", "--channels", "3"], r"channels 1.*have 3"),
])
def test_what_an_onnx_model_cannot_do_fails_before_any_work(onnx_file, tmp_path, capsys, extra, expected):
    argv = ["--input", str(DEMO_DATA / "mnist-test-sample.tar"), "--model", onnx_file, "--output",
            str(tmp_path / "out"), "--channels", "1", *extra]
    assert audit.main(argv) == 2
    import re
    assert re.search(expected, one_line(capsys)), expected
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not an onnx graph", b"\x08\x07\x12\x00" * 100])
def test_a_broken_onnx_file_fails_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    argv = ["--input", str(DEMO_DATA / "mnist-test-sample.tar"), "--model", str(path), "--methods", "occlusion",
            "--output", str(tmp_path / "out"), "--channels", "1"]
    assert audit.main(argv) == 2
    assert "broken.onnx" in one_line(capsys)


def test_the_graphs_input_is_checked_against_the_images():
    from saliency_audit.transforms.model.onnx import InputSpec
    assert InputSpec("x", "tensor(float)", (None, 1, 28, 28)).problem((4, 1, 28, 28)) is None
    assert InputSpec("x", "tensor(float16)", (1, 1, None, None)).problem((4, 1, 32, 32)) is None
    assert "only float inputs" in InputSpec("x", "tensor(int64)", (None, 1, 28, 28)).problem((4, 1, 28, 28))
    assert "height 28" in InputSpec("x", "tensor(float)", (None, 1, 28, 28)).problem((4, 1, 32, 28))
    assert "2 dimensions" in InputSpec("x", "tensor(float)", (None, 784)).problem((4, 1, 28, 28))


FUZZ = r"""
import json, random, sys
from saliency_audit.transforms.model.load import ModelLoadError, ModelSpec, load_model
data = open(sys.argv[1], "rb").read()
rng, outcomes = random.Random(0), {"refused": 0, "loaded": 0}
cases = [data[:n] for n in (1, 16, len(data) // 3, len(data) // 2, len(data) - 1)]
for _ in range(20):
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        mutated[rng.randrange(min(len(data), 4096))] = rng.randrange(256)
    cases.append(bytes(mutated))
for k, case in enumerate(cases):
    path = f"{sys.argv[2]}/case-{k}.onnx"
    open(path, "wb").write(case)
    try:
        load_model(ModelSpec(path))
        outcomes["loaded"] += 1
    except ModelLoadError as e:
        assert "\n" not in str(e) and path in str(e), str(e)
        outcomes["refused"] += 1
print(json.dumps(outcomes))
"""


@pytest.mark.slow
def test_truncated_and_mutated_onnx_files_are_refused_in_one_line_or_load(onnx_file, tmp_path):
    """onnxruntime parses the file in C++: a separate process, so that a crash is a failure here,
    not the end of the test session."""
    import subprocess
    import sys

    from conftest import REPO
    done = subprocess.run([sys.executable, "-c", FUZZ, onnx_file, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["refused"] >= 5 and sum(outcomes.values()) == 25


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The reference CNN through torch.onnx.export with its default arguments, which in torch 2.13
    (the dynamo exporter) write the weights beside the graph: model.onnx + model.onnx.data."""
    pytest.importorskip("onnxscript")  # the default exporter's dependency
    folder = tmp_path_factory.mktemp("exported")
    torch.onnx.export(reference_cnn(), (torch.zeros(2, 1, 28, 28),), str(folder / "model.onnx"))
    assert (folder / "model.onnx.data").stat().st_size > 1 << 20  # the weights are there, not in the graph
    assert (folder / "model.onnx").stat().st_size < 1 << 16
    return folder / "model.onnx"


@pytest.mark.slow
def test_the_exporters_default_output_runs_from_another_directory(default_export, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the model's folder: its external data is found beside the graph all the same
    onnx_rows = run(tmp_path, ["--model", str(default_export)], "onnx", "occlusion")
    torch_rows = run(tmp_path, TORCH_MODEL, "torch", "occlusion")
    assert onnx_rows.keys() == torch_rows.keys() and len(onnx_rows) == 3
    for key, row in onnx_rows.items():
        np.testing.assert_allclose(row["saliency"], torch_rows[key]["saliency"], rtol=1e-3, atol=1e-4, err_msg=str(key))
    hashes = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["model"]["sha256"]
    assert set(hashes) == {str(default_export), f"{default_export}.data"}


def test_the_model_hash_covers_the_external_data(default_export, tmp_path):
    """Two weight files behind one graph are two models, for the manifest and the audit history."""
    from saliency_audit.transforms.model.load import ModelSpec, model_hashes, model_identity
    other = tmp_path / "model.onnx"
    other.write_bytes(default_export.read_bytes())
    weights = bytearray((default_export.parent / "model.onnx.data").read_bytes())
    weights[:4] = bytes(4)  # another value of the first weight
    (tmp_path / "model.onnx.data").write_bytes(bytes(weights))
    mine, theirs = ModelSpec(str(default_export)), ModelSpec(str(other))
    assert len(model_hashes(mine)) == 2
    assert sorted(model_hashes(mine).values()) != sorted(model_hashes(theirs).values())
    assert model_identity(mine, "state") != model_identity(theirs, "state")


@pytest.mark.slow
def test_an_onnx_model_with_external_data_loads_from_s3(default_export, tmp_path, monkeypatch):
    from conftest import moto_s3

    from saliency_audit.transforms.model.load import ModelSpec, load_model, model_hashes
    monkeypatch.chdir(tmp_path)
    with moto_s3(monkeypatch, "models") as (fs, endpoint):
        fs.put(str(default_export), "models/cnn/model.onnx")
        fs.put(f"{default_export}.data", "models/cnn/model.onnx.data")
        spec = ModelSpec("s3://models/cnn/model.onnx", storage_options={"endpoint_url": endpoint})
        model = load_model(spec)
        x = torch.rand(3, 1, 28, 28)
        torch.testing.assert_close(model(x), reference_cnn()(x), rtol=1e-4, atol=1e-4)
        local = model_hashes(ModelSpec(str(default_export)))
        assert model_hashes(spec) == {"s3://models/cnn/model.onnx": local[str(default_export)],
                                      "s3://models/cnn/model.onnx.data": local[f"{default_export}.data"]}
    assert list(tmp_path.iterdir()) == []  # the private copy is gone, and never was in the current directory


def pointing_at(graph, location: str) -> bytes:
    """``graph`` with every tensor's external data at ``location``."""
    import onnx
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model.SerializeToString()


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_refused_in_one_line(default_export, tmp_path, capsys, where):
    """The weights exist out there (a copy of the real ones): loading them would work, and is refused."""
    outside, folder = tmp_path / "outside", tmp_path / "model"
    outside.mkdir()
    folder.mkdir()
    (outside / "model.onnx.data").write_bytes((default_export.parent / "model.onnx.data").read_bytes())
    (folder / "link").symlink_to(outside)
    location = {"dotdot": "../outside/model.onnx.data", "absolute": str(outside / "model.onnx.data"),
                "symlink": "link/model.onnx.data"}[where]
    (folder / "hostile.onnx").write_bytes(pointing_at(default_export, location))
    argv = ["--input", str(DEMO_DATA / "mnist-test-sample.tar"), "--model", str(folder / "hostile.onnx"),
            "--methods", "occlusion", "--output", str(tmp_path / "out"), "--channels", "1"]
    assert audit.main(argv) == 2
    line = one_line(capsys)
    assert "hostile.onnx" in line and "leaves the model's folder" in line, line
    assert not (tmp_path / "out").exists()
