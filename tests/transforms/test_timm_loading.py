"""--model timm:NAME --weights FILE: a timm architecture built without downloading, its weights
loaded, its fused attention switched off, and its preprocessing from timm's pretrained config."""
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saliency_audit.pipelines.config.options import UsageError, parse_run_args
from saliency_audit.transforms.io.preprocess import Preprocessing, preprocess
from saliency_audit.transforms.model import timm_models
from saliency_audit.transforms.model.load import (
    ModelLoadError,
    ModelSpec,
    load_model,
    loading_entry,
    model_preprocessing,
)

NAME = "vit_tiny_patch16_224"
OPTIONS = {"img_size": 32, "depth": 2}  # a two-block ViT-Tiny on 32 px: the architecture, small


@pytest.fixture(scope="module")
def reference(timm):
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, num_classes=10, **OPTIONS).eval()


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("timm")
    save_file(reference.state_dict(), folder / "vit.safetensors")
    torch.save(reference.state_dict(), folder / "vit.pt")
    return folder


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    return message


@pytest.mark.parametrize("file", ["vit.safetensors", "vit.pt"])
def test_timm_weights_load_as_the_model_they_came_from(file, weights, reference, x):
    spec = ModelSpec(f"timm:{NAME}", str(weights / file), model_options=OPTIONS)
    model = load_model(spec)
    assert model.num_classes == 10  # read from the head's weights, not the architecture's 1000
    with torch.no_grad():  # eager against timm's fused attention: the same up to rounding
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def _attention_maps_seen(model, x) -> int:
    """Calls of the attention dropout, which only the eager path makes, on the softmaxed weights."""
    seen = []
    hooks = [m.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(out))
             for m in model.modules() if hasattr(m, "fused_attn")]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in seen)  # attention rows: softmaxed weights
    return len(seen)


def test_fused_attention_is_off_and_the_manifest_says_so(weights, reference, x):
    spec = ModelSpec(f"timm:{NAME}", str(weights / "vit.safetensors"), model_options=OPTIONS)
    model = load_model(spec)
    assert _attention_maps_seen(reference, x) == 0  # timm's default here: fused, no weights materialised
    assert _attention_maps_seen(model, x) == OPTIONS["depth"]
    assert loading_entry(spec, model) == {"kind": "timm", "attention": {
        "implementation": "eager", "default": "fused", "modules": OPTIONS["depth"], "why": timm_models.EAGER_WHY}}


def test_preprocessing_comes_from_timms_pretrained_config(timm):
    values, sources = model_preprocessing(ModelSpec(f"timm:{NAME}"), set())
    # vit_tiny_patch16_224: 224 px, crop_pct 0.9, bicubic, mean and std 0.5
    assert values == {"channels": 3, "resize_shortest": 248, "crop": (224, 224), "crop_offset": "round",
                      "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert set(sources.values()) == {f"timm pretrained_cfg of {NAME}"}
    small, _ = model_preprocessing(ModelSpec(f"timm:{NAME}", model_options=OPTIONS), {"mean", "std"})
    assert (small["resize_shortest"], small["crop"]) == (35, (32, 32)) and "mean" not in small  # floor(32 / 0.9)


def test_our_preprocessing_gives_timms_eval_transform_on_a_photograph(timm):
    """timm's eval transform is torchvision's Resize (the shorter side, on the Pillow image),
    CenterCrop (the margin halved and rounded), ToTensor and Normalize; torchvision is not
    installable here, so the reference is those steps as torchvision documents them, on Pillow."""
    from PIL import Image
    skimage_data = pytest.importorskip("skimage.data")
    photo = np.ascontiguousarray(skimage_data.chelsea()[:, :449])  # a long side whose crop margin is odd
    data = timm.data.resolve_data_config(model=timm.create_model(NAME, pretrained=False, depth=1))
    short = int(data["input_size"][1] / data["crop_pct"])
    height, width = photo.shape[:2]
    resized = Image.fromarray(photo).resize((int(short * width / height), short), Image.Resampling.BICUBIC)
    top, left = (round((side - 224) / 2.0) for side in (resized.height, resized.width))
    cropped = np.asarray(resized, np.float32)[top:top + 224, left:left + 224] / 255
    reference = ((cropped - np.asarray(data["mean"])) / np.asarray(data["std"])).transpose(2, 0, 1)
    values, _ = model_preprocessing(ModelSpec(f"timm:{NAME}"), set())
    ours = preprocess(photo.astype(np.float32) / 255, Preprocessing(**values))
    levels = np.abs(ours - reference) * 0.5 * 255
    assert ours.shape == reference.shape == (3, 224, 224)
    assert levels.max() < 1.6 and levels.mean() < 0.5, (levels.max(), levels.mean())


@pytest.mark.parametrize("model, options, message", [
    ("timm:no_such_model", {}, "timm has no such model"),
    (f"timm:{NAME}", {"pretrained": True}, "--model-options pretrained"),
    (f"timm:{NAME}", {"checkpoint_path": "/etc/passwd"}, "--model-options checkpoint_path"),
    (f"timm:{NAME}", {"img_size": 32, "no_such_argument": 1}, "timm.create_model"),
    ("timm:../x", {}, "a timm model name is"),
])
def test_bad_timm_models_fail_in_one_line(model, options, message, timm):
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(model, model_options=options))
    assert message in one_line(error)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                 st.lists(st.integers(-10, 10**6), max_size=3)))
def test_a_hostile_img_size_gives_a_bounded_preprocessing_or_one_line(timm, img_size):
    # img_size 100000 made every image a 100000 px square (a 100 GB tensor) before it was bounded
    try:
        values, _ = model_preprocessing(ModelSpec(f"timm:{NAME}", model_options={"img_size": img_size}), set())
    except ModelLoadError as e:
        assert "\n" not in str(e) and len(str(e)) < 500
        return
    assert max(values["crop"]) <= max(values["resize_shortest"], 1) <= 8192


@pytest.mark.parametrize("text", [
    '{"secret": "AKIAEXAMPLESECRET", "n": ' + "1" * 5000 + "}",  # int() refuses over 4300 digits
    '{"secret": "AKIAEXAMPLESECRET", "n": ' + "[" * 100000,  # nesting beyond the parser
])
def test_model_options_that_break_the_json_parser_fail_in_one_line_without_their_text(text):
    # a bare ValueError made argparse echo the whole value (secrets and all); a RecursionError, a traceback
    with pytest.raises(UsageError) as info:
        parse_run_args(["--input", "x.tar", "--model", "m.pt", "--output", "out", "--model-options", text])
    assert "invalid JSON" in str(info.value) and "AKIA" not in str(info.value) and len(str(info.value)) < 200


def test_credentials_in_model_options_reach_no_record_of_the_run():
    # --model-options were recorded as given in the manifest's options, command and resolved spec
    from saliency_audit.pipelines.config.options import recorded_options, redact_argv
    from saliency_audit.pipelines.config.spec import resolved
    given = '{"source": "https://user:TOKEN123@host/x", "signed": "s3://b/k?X-Amz-Signature=SIG456", "depth": 2}'
    argv = ["--input", "x.tar", "--model", f"timm:{NAME}", "--output", "out", "--model-options", given]
    config = parse_run_args(argv)[0]
    records = [recorded_options(config), redact_argv(argv), resolved(config, [])]
    assert not any(secret in str(r) for r in records for secret in ("TOKEN123", "SIG456")), records
    assert recorded_options(config)["model_options"]["depth"] == 2  # what holds no credentials is kept


def test_weights_of_another_architecture_do_not_fit(weights, timm):
    with pytest.raises(ModelLoadError) as error:  # a three-block model from two blocks' weights
        load_model(ModelSpec(f"timm:{NAME}", str(weights / "vit.safetensors"), model_options={**OPTIONS, "depth": 3}))
    assert "do not fit" in one_line(error) and "blocks.2" in one_line(error)


def test_without_timm_the_error_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec(f"timm:{NAME}"))
    assert "pip install timm" in one_line(error)


def test_the_model_options_are_part_of_a_timm_models_identity(weights):
    from saliency_audit.transforms.model.load import model_identity
    url = str(weights / "vit.safetensors")
    one, other = (ModelSpec(f"timm:{NAME}", url, model_options=o) for o in (OPTIONS, {**OPTIONS, "drop_rate": 0.1}))
    assert model_identity(one, "state") != model_identity(other, "state")  # the same weights, another model
