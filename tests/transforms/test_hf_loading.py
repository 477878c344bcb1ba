"""--model hf:FOLDER: a Hugging Face model folder loaded without running code or downloading, its
preprocessor_config.json read as the run's preprocessing, and its refusals, each one line."""
import dataclasses
import json
import logging as pylogging
import os
import shutil
import socket
import sys
import types

import fsspec
import numpy as np
import pytest
import torch
from hf_models import SIZE, hf_model, logits_model, save_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saliency_audit.pipelines.job.plan import resolve_preprocessing
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, preprocess
from saliency_audit.transforms.model import hf
from saliency_audit.transforms.model.load import (
    ModelLoadError,
    ModelSpec,
    load_model,
    loading_entry,
    model_hashes,
    model_preprocessing,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return save_folder("vit", tmp_path_factory.mktemp("vit"))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    return message


@pytest.mark.parametrize("family", ["vit", "deit", "convnext"])
def test_a_folder_loads_as_the_model_it_was_saved_from(family, tmp_path, x):
    folder = save_folder(family, tmp_path)
    model = load_model(ModelSpec(f"hf:{folder}"))
    torch.testing.assert_close(model(x), logits_model(family)(x), rtol=0, atol=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    entry = loading_entry(ModelSpec(f"hf:{folder}"), model)
    assert entry["kind"] == "hf" and entry["attention"]["implementation"] == "eager"


def test_attention_is_eager_and_the_manifest_says_what_it_replaced(vit_folder):
    model = load_model(ModelSpec(f"hf:{vit_folder}"))
    assert model.model.config._attn_implementation == "eager"
    out = model.model(pixel_values=torch.rand(1, 3, SIZE, SIZE), output_attentions=True)
    tokens = (SIZE // 8) ** 2 + 1  # eager attention hands its weights out; SDPA never materialises them
    assert out.attentions[0].shape == (1, 2, tokens, tokens)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 2, tokens))
    assert hf.attention_entry(model)["default"] == "sdpa"  # what transformers picks for ViT unasked


def test_sharded_safetensors_load_through_their_index(tmp_path, x):
    hf_model("vit").save_pretrained(tmp_path, max_shard_size="20KB")
    names = set(os.listdir(tmp_path))
    assert hf.SAFE_INDEX in names and len([n for n in names if n.endswith(".safetensors")]) > 1
    spec = ModelSpec(f"hf:{tmp_path}")
    torch.testing.assert_close(load_model(spec)(x), logits_model("vit")(x), rtol=0, atol=0)
    assert set(model_hashes(spec)) == {str(tmp_path / n) for n in names}  # every shard and the index in the hash


def test_a_folder_on_object_storage_is_copied_and_loaded(vit_folder, x):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(vit_folder):
        with open(os.path.join(vit_folder, name), "rb") as f:
            fs.pipe(f"/models/vit/{name}", f.read())
    try:
        spec = ModelSpec("hf:memory://models/vit")
        torch.testing.assert_close(load_model(spec)(x), logits_model("vit")(x), rtol=0, atol=0)
        values, _ = model_preprocessing(spec, set())
        assert values["resize"] == (SIZE, SIZE) and values["mean"] == (0.5, 0.4, 0.3)
    finally:
        fs.rm("/models", recursive=True)


def test_nothing_is_downloaded(vit_folder, monkeypatch, x):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test of offline loading")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    model = load_model(ModelSpec(f"hf:{vit_folder}"))
    torch.testing.assert_close(model(x), logits_model("vit")(x), rtol=0, atol=0)
    assert attempts == [] and os.environ["HF_HUB_OFFLINE"] == "1"


# --- refusals -------------------------------------------------------------------------------------------

def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_json(path, **changes):
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def test_a_missing_folder_or_file_fails_in_one_line(tmp_path, vit_folder):
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{tmp_path / 'nowhere'}"))
    assert "not found" in one_line(error)
    folder = _copy(vit_folder, tmp_path)
    os.remove(folder / "config.json")
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "no config.json" in one_line(error)
    os.remove(folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "no weights" in one_line(error)


def test_a_config_asking_for_remote_code_is_refused_unless_trusted(tmp_path, vit_folder):
    folder = _copy(vit_folder, tmp_path)
    _edit_json(folder / "config.json", auto_map={"AutoModelForImageClassification": "evil.Model"})
    (folder / "evil.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "auto_map" in one_line(error) and "--trust-model" in one_line(error)
    trusted = hf.folder_files(str(folder), trust=True)
    assert str(folder / "evil.py") in trusted  # with trust, the code it names travels with the folder


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay"])
def test_a_timm_wrapper_config_cannot_read_weights_from_outside_the_folder(key, tmp_path, vit_folder):
    # model_args go to timm.create_model: checkpoint_path unpickled a file anywhere, trust or not
    folder = _copy(vit_folder, tmp_path)
    torch.save({}, tmp_path / "elsewhere.pth")
    _edit_json(folder / "config.json", model_type="timm_wrapper", architecture="resnet18",
               model_args={key: str(tmp_path / "elsewhere.pth")})
    for trust in (False, True):
        with pytest.raises(ModelLoadError) as error:
            hf.folder_files(str(folder), trust=trust)
        assert f"model_args {key}" in one_line(error)


def test_pickle_only_weights_are_refused_unless_trusted(tmp_path, vit_folder, x):
    folder = _copy(vit_folder, tmp_path)
    torch.save(hf_model("vit").state_dict(), folder / "pytorch_model.bin")
    os.remove(folder / "model.safetensors")
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "pytorch_model.bin" in one_line(error) and "--trust-model" in one_line(error)
    model = load_model(ModelSpec(f"hf:{folder}", trust_model=True))
    torch.testing.assert_close(model(x), logits_model("vit")(x), rtol=0, atol=0)


@pytest.mark.parametrize("weight_map, message", [
    ({"a": "../model.safetensors"}, "not in the folder"),
    ({"a": "elsewhere.safetensors"}, "not in the folder"),
    ({}, "no weight_map"),
    ({"a": "x\nFAKE: all weights verified\n.safetensors"}, "not in the folder"),  # a name may not break the line
])
def test_a_bad_shard_index_is_refused(weight_map, message, tmp_path, vit_folder):
    folder = _copy(vit_folder, tmp_path)
    (folder / hf.SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert message in one_line(error)


@pytest.mark.parametrize("shard", ["shard.bin", "shard.pt", "shard.safetensors.bin", "weights"])
def test_a_safetensors_index_naming_a_pickle_shard_is_refused_even_with_tensors_in_it(shard, tmp_path, vit_folder):
    # transformers unpickles a shard not named .safetensors: this one loaded without --trust-model
    from safetensors.torch import load_file
    folder = _copy(vit_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    os.remove(folder / "model.safetensors")
    torch.save(state, folder / shard)
    (folder / hf.SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(state, shard)}))
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "not safetensors" in one_line(error) and shard in one_line(error)


@pytest.mark.parametrize("model", ["hf:s3://AKIAEXAMPLE:SECRETKEY@bucket/vit", "hf:https://token@host/vit",
                                   "hf:gs://user:pw@bucket/vit"])
def test_an_hf_folder_url_with_credentials_is_refused_before_it_is_recorded(model):
    # location() looked for user:password@ at the start only, so the hf: prefix hid it from the check
    # and the manifest, its command and the report recorded the --model value as given
    from saliency_audit.pipelines.config.options import UsageError, parse_run_args
    with pytest.raises(UsageError) as info:
        parse_run_args(["--input", "x.tar", "--output", "out", "--model", model])
    assert "credentials" in str(info.value) and "SECRETKEY" not in str(info.value) and "token@" not in str(info.value)


def test_a_file_that_cannot_be_copied_from_storage_fails_in_one_line(vit_folder, monkeypatch):
    # the copy from object storage raised the client's own error: a traceback at preflight, not one line
    def denied(self, path, target, **kwargs):
        raise PermissionError(f"Access Denied for {path}")
    from fsspec.implementations.local import LocalFileSystem
    monkeypatch.setattr(hf.storage, "is_local", lambda fs: False)
    monkeypatch.setattr(LocalFileSystem, "get", denied)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{vit_folder}"))
    assert "cannot copy" in one_line(error) and "PermissionError" in one_line(error)


def test_weights_that_leave_parameters_random_are_refused(tmp_path, vit_folder):
    from safetensors.torch import load_file, save_file
    from transformers.utils import logging
    folder = _copy(vit_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["classifier.weight"]  # the head would keep its random initialisation
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    verbosity, said = logging.get_verbosity(), []
    listener = pylogging.Handler()
    listener.emit = said.append
    logging.get_logger().addHandler(listener)  # transformers' own handler writes to the stderr of its import
    try:
        with pytest.raises(ModelLoadError) as error:
            load_model(ModelSpec(f"hf:{folder}"))
    finally:
        logging.get_logger().removeHandler(listener)
    assert "do not fit" in one_line(error) and "classifier.weight" in one_line(error)
    # our one line only: transformers' own table of the missing keys came ahead of it
    assert [r.getMessage() for r in said] == [] and logging.get_verbosity() == verbosity
    _edit_json(folder / "config.json", num_labels=7, id2label={str(i): str(i) for i in range(7)},
               label2id={str(i): i for i in range(7)})  # and a saved shape that no longer fits
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert "cannot load it" in one_line(error) or "do not fit" in one_line(error)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_config_saved_at_half_precision_still_loads_in_float32(dtype, tmp_path, vit_folder, x):
    # save_pretrained writes the weights' dtype into config.json; transformers 5 loads in it by
    # default, which would run the whole audit at that precision while the manifest says fp32
    folder = _copy(vit_folder, tmp_path)
    _edit_json(folder / "config.json", dtype=dtype, torch_dtype=dtype)
    model = load_model(ModelSpec(f"hf:{folder}"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model(x), logits_model("vit")(x), rtol=0, atol=0)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"a": ' * 100000 + "1" + "}" * 100000, "not valid JSON"),
    ("[]", "not a JSON object"),
])
def test_a_config_that_is_not_json_is_refused(text, message, tmp_path, vit_folder):
    folder = _copy(vit_folder, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{folder}"))
    assert message in one_line(error)


def test_weights_and_model_options_do_not_go_with_a_folder(vit_folder):
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{vit_folder}", weights=os.path.join(vit_folder, "model.safetensors")))
    assert "holds its own weights" in one_line(error)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{vit_folder}", model_options={"img_size": 32}))
    assert "timm:NAME" in one_line(error)


def test_without_transformers_the_error_says_what_to_install(vit_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"hf:{vit_folder}"))
    assert 'pip install "saliency-audit[hf]"' in one_line(error)


# --- preprocessor_config.json -----------------------------------------------------------------------------

VIT = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
       "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# DeiT's and many others': the shorter side to 256, a 224 centre crop, bicubic
CROPPED = {**VIT, "size": {"shortest_edge": 256}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": 224, "width": 224}, "image_mean": [0.485, 0.456, 0.406],
           "image_std": [0.229, 0.224, 0.225]}
CONVNEXT = {**CROPPED, "image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
            "crop_pct": 0.875, "do_center_crop": False}


def test_the_processor_configs_read_as_their_known_preprocessing():
    assert hf.read_processor(VIT, 3) == {"resize": (224, 224), "interpolation": "bilinear",
                                         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert hf.read_processor(CROPPED, 3) == {"resize_shortest": 256, "crop": (224, 224), "interpolation": "bicubic",
                                             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    convnext = hf.read_processor(CONVNEXT, 3)  # the shorter side to int(224 / 0.875), then a 224 square
    assert (convnext["resize_shortest"], convnext["crop"]) == (256, (224, 224))
    big = hf.read_processor({**CONVNEXT, "size": {"shortest_edge": 384}}, 3)  # from 384 px up: warped, no crop
    assert big["resize"] == (384, 384) and "crop" not in big
    assert "mean" not in hf.read_processor({**VIT, "do_normalize": False}, 3)


@pytest.fixture(scope="module")
def photograph():
    """A real photograph (skimage's chelsea), 449 px wide so that a centre crop's margin is odd
    (where Hugging Face's floor and torchvision's rounding part by a pixel)."""
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.chelsea()[:, :449])


@pytest.mark.parametrize("processor_class, config", [
    ("transformers.models.vit.image_processing_pil_vit.ViTImageProcessorPil", VIT),
    ("transformers.models.vit.image_processing_pil_vit.ViTImageProcessorPil", CROPPED),
    ("transformers.models.convnext.image_processing_pil_convnext.ConvNextImageProcessorPil", CONVNEXT),
])
def test_our_preprocessing_gives_hugging_faces_tensor_on_a_photograph(processor_class, config, photograph):
    from PIL import Image
    module, _, name = processor_class.rpartition(".")
    processor = getattr(pytest.importorskip(module), name)(
        **{k: v for k, v in config.items() if k != "image_processor_type"})
    reference = processor(images=Image.fromarray(photograph), return_tensors="np")["pixel_values"][0]
    prep = Preprocessing(channels=3, **hf.read_processor(config, 3))
    ours = preprocess(photograph.astype(np.float32) / 255, prep)
    assert ours.shape == reference.shape == (3, 224, 224)
    # Pillow resizes 8-bit pixels and rounds them; we resize the float pixels: at most a level or so apart
    levels = np.abs(ours - reference) * np.asarray(config["image_std"])[:, None, None] * 255
    assert levels.max() < 1.6 and levels.mean() < 0.5, (levels.max(), levels.mean())
    if prep.crop is not None:  # a crop one pixel off is far outside that tolerance
        shifted = preprocess(photograph.astype(np.float32) / 255, dataclasses.replace(prep, crop_offset="round"))
        assert (np.abs(shifted - reference) * np.asarray(config["image_std"])[:, None, None] * 255).mean() > 1.5


def _folder_with_processor(tmp_path, vit_folder, processor):
    folder = _copy(vit_folder, tmp_path)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"image_std": [0.5, -0.2, 0.3]}, "image_std values must be positive"),
    ({"image_std": [0.5, 0, 0.3]}, "image_std values must be positive"),
    # positive, but float32's 0 (or overflowing it): every image would have failed as "too extreme"
    ({"image_std": [0.5, 1e-300, 0.3]}, "beyond float32's range"),
    ({"image_std": [0.5, 1e-40, 0.3]}, "beyond float32's range"),
    ({"image_mean": [0.5, 1e300, 0.5]}, "beyond float32's range"),
    ({"size": {"height": 0, "width": 224}}, "size.height must be a whole number of pixels"),
    ({"size": {"height": 10 ** 9, "width": 224}}, "size.height must be a whole number of pixels from 1 to 8192"),
    ({"size": {"height": 224.5, "width": 224}}, "size.height"),
    ({"size": {"longest_edge": 224}}, "size must be"),
    ({"image_mean": [0.5, 0.5]}, "image_mean has 2 values, expected 1 or 3"),
    ({"image_mean": "0.5"}, "image_mean must be a finite number"),
    ({"image_std": [0.5, float("nan"), 0.5]}, "image_std must be a finite number"),
    ({"do_resize": "yes"}, "do_resize must be true or false"),
    ({"resample": 1}, "resample 1 (LANCZOS) is not supported"),
    ({"resample": "bicubic"}, "resample 'bicubic' is not supported"),
    ({"rescale_factor": 1.0}, "rescale_factor"),
    ({"do_rescale": False}, "do_rescale is false"),
    ({"do_pad": True}, "do_pad"),
    ({"crop_pct": 0.9}, "crop_pct is read as ConvNextImageProcessor"),
    ({"do_center_crop": True, "crop_size": {"height": 300, "width": 300}}, "larger than the resized image"),
    ({"image_mean": None}, "do_normalize without image_mean"),
])
def test_hostile_processor_values_are_refused_in_one_line(changes, message, tmp_path, vit_folder):
    folder = _folder_with_processor(tmp_path, vit_folder, {**VIT, **changes})
    with pytest.raises(ModelLoadError) as error:
        model_preprocessing(ModelSpec(f"hf:{folder}"), set())
    assert message in one_line(error) and "preprocessor_config.json" in one_line(error)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
SWITCHES = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad")
NEAR_VALID = {"size": st.sampled_from([{"height": 32, "width": 32}, {"shortest_edge": 40}, 32, {"height": 32},
                                       {"shortest_edge": 400}]),
              "crop_size": st.sampled_from([{"height": 32, "width": 32}, 28, {"height": 64, "width": 8}]),
              "image_mean": st.lists(st.floats(-2, 2), min_size=3, max_size=3) | st.floats(-2, 2)
              | st.lists(st.floats(-2, 2), max_size=4),
              "image_std": st.lists(st.floats(0.01, 2), min_size=3, max_size=3) | st.lists(st.floats(-1, 2), max_size=4),
              "image_processor_type": st.sampled_from(["ViTImageProcessor", "ConvNextImageProcessor", "Other"]),
              "crop_pct": st.none() | st.floats(-1, 2), "resample": st.sampled_from([2, 3, 0, 1, -1, 7]),
              "rescale_factor": st.sampled_from([1 / 255, 1 / 255, 1.0, None]),
              **{key: st.sampled_from([True, True, False] if key != "do_pad" else [False, False, True])
                 for key in SWITCHES}}
# mostly-valid configs, the same with one value replaced by any JSON, and any JSON at all
REQUIRED = ("size", "image_mean", "image_std")
NEAR = st.fixed_dictionaries({k: NEAR_VALID[k] for k in REQUIRED},
                             optional={k: v for k, v in NEAR_VALID.items() if k not in REQUIRED})
CONFIGS = st.one_of(NEAR, st.builds(lambda d, key, value: {**d, key: value}, NEAR, st.sampled_from(sorted(NEAR_VALID)),
                                    JSON), JSON)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIGS, st.sampled_from([None, 1, 3]))
def test_the_processor_reader_answers_a_preprocessing_or_one_line(processor, channels):
    try:
        values = hf.read_processor(processor, channels)
    except ValueError as e:  # (ModelLoadError is one too)
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    prep = Preprocessing(channels=channels, **values)
    try:
        assert np.isfinite(preprocess(np.full((24, 36, channels or 3), 0.5, np.float32), prep)).all()
    except BadImage as e:  # a crop larger than this small image: that image's error, not the config's
        assert "smaller than the centre crop" in str(e)


def test_explicit_flags_win_and_the_sources_say_where_each_value_came_from(vit_folder):
    spec = ModelSpec(f"hf:{vit_folder}")

    def resolved(**flags):
        options = types.SimpleNamespace(**{"resize": None, "mean": None, "std": None, "channels": None,
                                           "to_grayscale": False, "max_pixels": 1 << 24, **flags})
        return resolve_preprocessing(options, spec)
    prep, sources = resolved()
    assert (prep.resize, prep.mean, prep.std, prep.channels) == ((SIZE, SIZE), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 3)
    assert sources["resize"] == sources["mean"] == "preprocessor_config.json" and sources["channels"] == "config.json"
    assert sources["crop"] == "default"
    prep, sources = resolved(mean=(0.1,), resize=(16, 20))
    assert (prep.resize, prep.mean, prep.std) == ((16, 20), (0.1,), (0.2, 0.25, 0.3))
    assert (sources["resize"], sources["mean"], sources["std"]) == ("flag", "flag", "preprocessor_config.json")


def test_a_folder_without_a_processor_config_leaves_preprocessing_to_the_flags(tmp_path, vit_folder):
    folder = _copy(vit_folder, tmp_path)
    os.remove(folder / "preprocessor_config.json")
    spec = ModelSpec(f"hf:{folder}")
    assert model_preprocessing(spec, set()) == ({"channels": 3}, {"channels": "config.json"})
    assert all(not url.endswith("preprocessor_config.json") for url in model_hashes(spec))


def test_a_spec_resolves_an_hf_folder_against_its_own_folder_and_keeps_timm_names(tmp_path):
    from saliency_audit.pipelines.config import spec
    document = '[input]\npath = "x.tar"\n[output]\npath = "out"\n[model]\npath = "{}"\n{}'
    for folder in ("models/vit", "vit"):  # hf:vit would read as a module:Callable but for its prefix
        (tmp_path / "a.toml").write_text(document.format(f"hf:{folder}", ""))
        assert spec.parse_invocation(["--config", str(tmp_path / "a.toml")])[0].model == f"hf:{tmp_path}/{folder}"
    (tmp_path / "b.toml").write_text(document.format("timm:vit_tiny_patch16_224", "options = {img_size = 32}\n"))
    args = spec.parse_invocation(["--config", str(tmp_path / "b.toml")])[0]
    assert (args.model, args.model_options) == ("timm:vit_tiny_patch16_224", {"img_size": 32})


def test_the_run_refuses_a_missing_folder_before_any_work_in_one_line(tmp_path, capsys, demo_shard):
    from saliency_audit.pipelines import cli
    code = cli.main(["run", "--input", str(demo_shard), "--model", f"hf:{tmp_path / 'nowhere'}",
                     "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "not found" in error
    assert not (tmp_path / "out").exists()
