"""--weights FILE.safetensors for module:Callable models: tensors only (nothing in the file can
run), from any fsspec URL, in the model's hash; a corrupt or truncated file fails in one line."""
import json
import struct

import fsspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saliency_audit.pipelines.training.reference_model import mnist_cnn
from saliency_audit.transforms.model.load import (
    ModelLoadError,
    ModelSpec,
    file_sha256,
    load_model,
    model_hashes,
    model_identity,
    state_sha256,
)

CNN = "saliency_audit.pipelines.training.reference_model:mnist_cnn"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return mnist_cnn().eval()


@pytest.fixture
def weights(tmp_path, reference):
    save_file(reference.state_dict(), tmp_path / "cnn.safetensors")
    return tmp_path / "cnn.safetensors"


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    return message


def test_safetensors_weights_load_and_are_hashed(weights, reference):
    x = torch.rand(3, 1, 28, 28)
    spec = ModelSpec(CNN, str(weights))
    model = load_model(spec)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model_hashes(spec) == {str(weights): file_sha256(str(weights))}
    assert state_sha256(model) == state_sha256(reference)
    changed = {k: v + 1 if k.endswith("bias") else v for k, v in reference.state_dict().items()}
    save_file(changed, weights)  # other values in the same file: another model
    other = load_model(spec)
    assert state_sha256(other) != state_sha256(model)
    assert model_identity(spec, state_sha256(other)) != model_identity(spec, state_sha256(model))


def test_safetensors_weights_from_object_storage(weights, reference):
    fs = fsspec.filesystem("memory")
    fs.pipe("/weights/cnn.safetensors", weights.read_bytes())
    try:
        x = torch.rand(2, 1, 28, 28)
        torch.testing.assert_close(load_model(ModelSpec(CNN, "memory://weights/cnn.safetensors"))(x), reference(x))
    finally:
        fs.rm("/weights", recursive=True)


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: data[:8] + b"{not json" + data[17:],  # a corrupt header
    lambda data: b"",
    lambda data: b"\x80\x04\x95" + data[3:],  # not safetensors at all (a pickle's opening)
])
def test_a_damaged_safetensors_file_fails_in_one_line(damage, weights):
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(CNN, str(weights)))
    assert "cannot read safetensors file" in one_line(error)


def test_safetensors_that_do_not_fit_fail_in_one_line(tmp_path, reference):
    state = reference.state_dict()
    save_file({k: v for k, v in state.items() if not k.endswith("bias")}, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(CNN, str(tmp_path / "partial.safetensors")))
    assert "do not fit" in one_line(error) and "Missing key" in one_line(error)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(CNN, str(tmp_path / "missing.safetensors")))
    assert "model file not found" in one_line(error)


def _header_file(path, header: dict, body: bytes = b"") -> str:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return str(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "C64", "XX", 3]),
       st.lists(st.integers(-2, 2 ** 62), max_size=4) | st.just("x"),
       st.tuples(st.integers(-8, 2 ** 63), st.integers(-8, 2 ** 63)), st.binary(max_size=64))
def test_a_hostile_safetensors_header_fails_in_one_line(tmp_path, dtype, shape, offsets, body):
    # any dtype, shape (a claimed 2**62 elements) and offsets against a body of a few bytes: one line
    # from the reader or the fit, never a traceback or an allocation of what the header claims
    path = _header_file(tmp_path / "h.safetensors",
                        {"conv1.weight": {"dtype": dtype, "shape": shape, "data_offsets": list(offsets)}}, body)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(CNN, path))
    assert "cannot read safetensors file" in one_line(error) or "do not fit" in one_line(error)
