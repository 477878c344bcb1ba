"""The model forms of the contract: TorchScript, torch.export, module:Callable + weights."""
import pickle

import pytest
import torch

from saliency_audit.pipelines.training.reference_model import mnist_cnn
from saliency_audit.transforms.model.load import ModelLoadError, ModelSpec, file_sha256, load_model, model_hashes


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return mnist_cnn().eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 1, 28, 28)


def test_callable_with_weights(tmp_path, reference, x):
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model = load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(tmp_path / "w.pt")))
    torch.testing.assert_close(model(x), reference(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_torchscript_and_export(tmp_path, reference, x):
    torch.jit.trace(reference, x).save(str(tmp_path / "m.pt"))
    torch.testing.assert_close(load_model(ModelSpec(str(tmp_path / "m.pt")))(x), reference(x))
    torch.export.save(torch.export.export(reference, (x,)), str(tmp_path / "m.pt2"))
    torch.testing.assert_close(load_model(ModelSpec(str(tmp_path / "m.pt2")))(x), reference(x))


def test_pickled_module_needs_trust(tmp_path, reference, x):
    torch.save(reference, tmp_path / "whole.pt")
    with pytest.raises(ModelLoadError, match="arbitrary unpickling.*refused.*--trust-model"):
        load_model(ModelSpec(str(tmp_path / "whole.pt")))
    trusted = load_model(ModelSpec(str(tmp_path / "whole.pt"), trust_model=True))
    torch.testing.assert_close(trusted(x), reference(x))


def test_weights_needing_pickle_are_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"fc.weight": object()}, f)
    torch.save({"x": torch.nn.Linear(1, 1)}, tmp_path / "modules.pt")
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(tmp_path / "modules.pt")))


@pytest.mark.parametrize("spec,message", [
    (ModelSpec("/no/such/model.pt"), "model file not found: /no/such/model.pt"),
    (ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", "/no/such/w.pt"), "model file not found"),
    (ModelSpec("no_such_module:factory"), "cannot import no_such_module:factory"),
    (ModelSpec("saliency_audit.pipelines.training.reference_model:MNIST_CNN_TYPO"), "cannot import"),
    (ModelSpec("json:dumps"), None),
])
def test_bad_models_fail_with_one_line(spec, message, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert "\n" not in str(info.value)
    if message:
        assert message in str(info.value)


def test_weights_that_do_not_fit(tmp_path):
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ModelLoadError, match="do not fit saliency_audit.pipelines.training.reference_model:mnist_cnn"):
        load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(tmp_path / "w.pt")))


def test_garbage_model_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    with pytest.raises(ModelLoadError, match="junk.pt"):
        load_model(ModelSpec(str(tmp_path / "junk.pt")))


def test_hash_of_model_files(tmp_path, reference):
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    spec = ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(tmp_path / "w.pt"))
    import hashlib
    assert model_hashes(spec) == {str(tmp_path / "w.pt"): hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()}
    assert file_sha256(str(tmp_path / "w.pt")) == model_hashes(spec)[str(tmp_path / "w.pt")]


def test_a_model_that_takes_no_hook_is_reported_uncounted(tmp_path, reference):
    """A scripted module refuses forward hooks: the manifest says its calls were not counted,
    rather than that the methods asked it nothing."""
    from conftest import DEMO_DATA

    from saliency_audit.pipelines import audit
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    torch.jit.script(small).save(str(tmp_path / "scripted.pt"))
    manifest = audit.run(["--input", str(DEMO_DATA / "mnist-test-sample.tar"), "--model", str(tmp_path / "scripted.pt"),
                          "--methods", "occlusion", "--channels", "1", "--limit-per-shard", "2", "--torch-threads", "1",
                          "--output", str(tmp_path / "out")])
    assert manifest["counts"]["occlusion"]["explained"] == 2
    assert manifest["model_calls"] == {"counted": False}
