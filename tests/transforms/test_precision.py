"""--precision (transforms.model.precision): the model's forwards under autocast, maps and metrics in
float32, recorded per method and in the methods' fingerprints. The 224 px agreement figures are
benchmarks/precision_agreement.py's (docs/performance.md); here a tiny ResNet-50-shaped network."""
from __future__ import annotations

import pytest
import torch
from conftest import DEMO_DATA
from hf_models import SIZE, logits_model

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.metrics.sanity import spearman_rank_correlation
from saliency_audit.transforms.model.handler import ExplainConfig, build_explainers
from saliency_audit.transforms.model.load import ModelSpec
from saliency_audit.transforms.model.precision import at_precision, effective_precision, precision_problem

# Each method's least rank correlation with float32 over the images, bf16 on a CPU. Measured
# 0.95 (sal: |gradient| ranks the many near-zero pixels by rounding), 0.99, 0.9998, 0.998.
AGREEMENT = {"sal": 0.9, "intg": 0.97, "gradcam": 0.99, "occlusion": 0.97}
OPTIONS = {"intg": {"n_steps": 8}, "occlusion": {"window": 8, "stride": 4}}


@pytest.fixture(scope="module")
def tiny():
    model = logits_model("resnet50")
    for p in model.parameters():
        p.requires_grad_(False)
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    return model, images, targets


def test_bf16_maps_are_float32_and_close_to_float32s(tiny, one_torch_thread):
    model, images, targets = tiny
    low = at_precision(model, "bf16", "cpu")
    for name, least in AGREEMENT.items():
        full = get_explainer(name, model, **OPTIONS.get(name, {})).explain(images, targets)
        half = get_explainer(name, low, **OPTIONS.get(name, {})).explain(images, targets)
        assert half.maps.dtype == torch.float32, name
        rank = spearman_rank_correlation(full.maps, half.maps)
        assert rank.min() > least, f"{name}: {rank.tolist()}"
        assert not torch.equal(full.maps, half.maps), f"{name}: bf16 changed nothing, so autocast never ran"
    delta = get_explainer("intg", low, n_steps=8).explain(images, targets).extras["convergence_delta"]
    assert delta.dtype == torch.float32


def test_the_twin_shares_the_models_layers_and_leaves_the_model_as_it_was(tiny):
    model, images, targets = tiny
    low = at_precision(model, "bf16", "cpu")
    assert [n for n, _ in low.named_modules()] == [n for n, _ in model.named_modules()]
    assert low.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert low(images).dtype == torch.float32 and model(images).dtype == torch.float32
        activations = []
        handle = dict(model.named_modules())["model.resnet.encoder.stages.1"].register_forward_hook(
            lambda m, i, o: activations.append(o.dtype))
        low(images), model(images)
        handle.remove()
    assert activations == [torch.bfloat16, torch.float32]  # hooks on the model's layers see the twin's forward
    cam_full, cam_low = get_explainer("gradcam", model), get_explainer("gradcam", low)
    cam_full.explain(images, targets), cam_low.explain(images, targets)
    assert cam_low.layer_used == cam_full.layer_used  # the default layer's search finds the same name
    named = get_explainer("gradcam", low, layer=cam_full.layer_used).explain(images, targets).maps
    assert named.dtype == torch.float32
    assert at_precision(model, "fp32", "cpu") is model and at_precision(model, "tf32", "cpu") is model


def test_a_methods_measured_precisions_are_reduced_ones():
    from saliency_audit.explainers import explainer_class, list_methods
    for name in list_methods():
        assert set(explainer_class(name).agrees_at) <= {"tf32", "bf16", "fp16"}, name


def test_tf32_is_fp32_off_cuda_and_relevance_runs_fp32():
    assert effective_precision("tf32", "cpu") == "fp32" and effective_precision("tf32", "cuda") == "tf32"
    assert effective_precision("tf32", "auto") == "tf32"  # remote workers decide
    assert effective_precision("bf16", "cpu") == "bf16"
    assert effective_precision("bf16", "cpu", autocast=False) == "fp32"
    with pytest.raises(ValueError, match="fp32, tf32, bf16, fp16"):
        effective_precision("fp8", "cpu")
    assert "ONNX" in precision_problem("bf16", "cpu", black_box=True)
    assert precision_problem("tf32", "cpu", black_box=True) is None and precision_problem("fp16", "cpu", False) is None


def test_each_method_gets_the_model_its_precision_allows(one_torch_thread):
    spec = ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt"))
    state = build_explainers(ExplainConfig(spec, {"sal": {}, "gradcam": {}, "deeplift": {}}, device="cpu",
                                           precision="bf16"))
    sal, gradcam, deeplift = (state.explainers[m].model for m in ("sal", "gradcam", "deeplift"))
    assert deeplift is state.model and sal is gradcam is state.metric_model is not state.model
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        low, full = sal(x), state.model(x)
    assert low.dtype == full.dtype == torch.float32 and not torch.equal(low, full)


def test_a_methods_fingerprint_follows_the_precision_its_maps_were_made_at():
    from saliency_audit.pipelines.config.options import parse_run_args
    from saliency_audit.pipelines.job import incremental

    def fingerprint(*flags, resolved_precision=None):
        options = parse_run_args(["--input=a.tar", "--model=m.pt", "--output=o", *flags])[0]
        resolved = {"methods": {"intg": {"options": {}}}}
        if resolved_precision:
            resolved["precision"] = resolved_precision
        return incremental.method_fingerprints(options, resolved)["intg"]

    fp32 = fingerprint()
    assert fingerprint("--precision=bf16", resolved_precision="bf16") != fp32  # an audit history explains again
    assert fingerprint("--precision=fp16") not in (fp32, fingerprint("--precision=bf16"))
    assert fingerprint("--precision=tf32", resolved_precision="fp32") == fp32  # on a CPU: the same maps
    assert fingerprint("--precision=tf32", resolved_precision="tf32") != fp32
    # fp32's fingerprint is the one made before --precision existed: older histories still count
    before = parse_run_args(["--input=a.tar", "--model=m.pt", "--output=o"])[0]
    original = incremental.fingerprint_values
    try:
        incremental.fingerprint_values = lambda o: {k: v for k, v in original(o).items() if k != "precision"}
        assert incremental.method_fingerprints(before, {"methods": {"intg": {"options": {}}}})["intg"] == fp32
    finally:
        incremental.fingerprint_values = original
