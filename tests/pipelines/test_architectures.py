"""Every method on every common architecture, or a clear refusal (issue 25): the whole method
family through the pipeline on tiny random-weight `transformers` models of each production family
(tests/hf_models.py: ViT, DeiT, Swin, ConvNeXt, a ResNet-50-shaped network; 32 px, 10 classes).

Each registered method either explains every image (finite maps that are not constant, unless the
method itself says there is nothing to show; counts that reconcile; no errors/ rows) or is refused
at preflight, in one line that says why and what to use instead. The refused set is fixed per
family (REFUSED, the table in docs/methods.md), so a method that starts or stops working on an
architecture fails here either way; a method registered later must run on all five families or
be added to the table.
"""
from __future__ import annotations

import json
import math
import re
import tarfile

import numpy as np
import pytest
import torch
from conftest import add_member, png_bytes, read_output
from hf_models import FAMILIES, logits_model
from PIL import Image
from skimage import data as photos

from saliency_audit.explainers import get_explainer, list_methods
from saliency_audit.explainers.blackbox.aae import AAEConfig, AdversarialAutoencoder, save_aae
from saliency_audit.explainers.core.base import UnsupportedModel
from saliency_audit.pipelines import audit

SIZE = 32
PHOTOS = {"astronaut": photos.astronaut, "coffee": photos.coffee, "chelsea": photos.chelsea}
MEAN, STD = 0.5, 0.25  # model inputs in [-2, 2]
PREPROCESSING = ["--resize", f"{SIZE},{SIZE}", "--channels", "3", "--mean", ",".join([str(MEAN)] * 3),
                 "--std", ",".join([str(STD)] * 3)]

RELEVANCE = ("deeplift", "elrp", "lrp")  # rules over the model's torch.fx graph
SEQUENCE = ("rollout", "attention_grad", "legrad")  # attention over one token sequence
# family -> {refused method: what its one-line reason must say}
REFUSED = {
    "vit": {m: r"attention \(ViTAttention\)" for m in RELEVANCE},
    "deit": {m: r"attention \(DeiTAttention\)" for m in RELEVANCE},
    "swin": {**{m: r"attention \(SwinAttention\)" for m in RELEVANCE}, **{m: "windows" for m in SEQUENCE}},
    "convnext": {**{m: "operation 'layer_norm'" for m in RELEVANCE}, **{m: "no attention layers" for m in SEQUENCE}},
    "resnet50": {m: "no attention layers" for m in SEQUENCE},
}


def expected_refusals(family: str) -> dict[str, str]:
    """REFUSED[family] for the methods registered (the transformer methods land separately)."""
    return {m: reason for m, reason in REFUSED[family].items() if m in list_methods()}


# Cheap settings of the costly methods, so five end-to-end runs fit in CI (the defaults run in
# test_defaults_work_on_every_architecture).
OPTIONS = {"intg": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}, "expected_gradients": {"n_samples": 4},
           "xrai": {"n_steps": 4, "segment_size": None, "min_size": 20}, "rise": {"n_masks": 100},
           "lime": {"n_samples": 100}, "mask": {"n_iter": 10},
           "anchor": {"batch_size": 20, "coverage_samples": 100, "min_samples_start": 20},
           "lore": {"population_size": 40, "generations": 2},
           "abele": {"neighbours": 40, "generations": 2, "exemplars": 10, "max_attempts": 100}}
CAMS = ("gradcam", "hirescam", "gradcampp", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam")


def nothing_to_show(method: str, saliency: np.ndarray, extras: dict) -> bool:
    """Whether a constant map is the method's own answer that the model shows it nothing, as the
    method documents it: an anchor that holds on any image, a LORE rule without conditions (the
    whole neighbourhood keeps the class), a mask with nothing to delete (the reference does not
    lower the score), a CAM whose ReLU zeroes class evidence that is negative everywhere, ABELE
    without a same-class exemplar among its draws (its autoencoder here is untrained). Random-weight
    models give these often: the tiny ViT predicts nearly every image as one class whatever is hidden."""
    zero = not saliency.any()
    if method == "anchor":
        return zero and len(extras["anchor"]) == 0
    if method == "lore":
        return zero and len(extras["rule_superpixels"]) == 0
    if method == "mask":
        relative = extras["deleted_score_relative"]
        return zero and (relative is None or math.isnan(relative))
    if method == "abele":
        return zero and extras["map_exemplars"] == 0
    return zero and method in CAMS


def check_map(method: str, saliency, extras: dict, where: str) -> None:
    saliency = np.asarray(saliency, dtype=np.float64)
    assert saliency.size == SIZE * SIZE and np.isfinite(saliency).all(), f"{method}: non-finite map ({where})"
    assert saliency.max() > saliency.min() or nothing_to_show(method, saliency, extras), \
        f"{method}: constant map {saliency.flat[0]} ({where})"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three photos at 32 px in one shard, and an (untrained) autoencoder for abele with their
    shape and value range: abele runs end to end; how well it explains is tested elsewhere."""
    root = tmp_path_factory.mktemp("architectures")
    with tarfile.open(root / "photos.tar", "w") as tar:
        for name, load in PHOTOS.items():
            small = np.asarray(Image.fromarray(load()).resize((SIZE, SIZE), Image.BILINEAR))
            add_member(tar, f"{name}.png", png_bytes(small))
    torch.manual_seed(0)
    low, high = -MEAN / STD, (1 - MEAN) / STD
    save_aae(AdversarialAutoencoder(AAEConfig((3, SIZE, SIZE), 8, hidden=(8, 16), disc_hidden=(16,),
                                              value_range=(low, high))), str(root / "aae.pt"))
    return root


def audit_argv(root, family: str, methods: list[str], output: str) -> list[str]:
    options = {m: o for m, o in OPTIONS.items() if m in methods}
    return ["--input", str(root / "*.tar"), "--model", f"hf_models:tiny_{family}", *PREPROCESSING,
            "--methods", ",".join(methods), "--method-options", json.dumps(options), "--aae", str(root / "aae.pt"),
            "--metric-steps", "4", "--batch-size", "4", "--device", "cpu", "--torch-threads", "1",
            "--output", str(root / output)]


def test_preflight_names_every_method_it_refuses_one_line_each(inputs):
    """The methods that cannot explain the model, each in one line, in run order; the others pass."""
    from saliency_audit.pipelines.config.options import UsageError
    from saliency_audit.pipelines.job.preflight import preflight
    from saliency_audit.transforms.io.preprocess import Preprocessing
    from saliency_audit.transforms.model.handler import ExplainConfig
    from saliency_audit.transforms.model.load import ModelSpec

    methods = {"lrp": {}, "sal": {}, "deeplift": {}, "grad": {}}
    config = ExplainConfig(ModelSpec("hf_models:tiny_convnext"), methods, device="cpu")
    with pytest.raises(UsageError) as refused:
        preflight(config, [str(inputs / "photos.tar")], Preprocessing(channels=3), {})
    lines = str(refused.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["method lrp cannot explain this model",
                                                      "method deeplift cannot explain this model"]
    assert all("this model uses operation 'layer_norm'" in line for line in lines)
    assert lines[0].endswith("use attnlrp (LRP with rules for LayerNorm and attention) or intg")
    assert lines[1].endswith("use intg, whose map also sums to f(x) - f(baseline)")


@pytest.mark.slow  # five architectures, every method, through the pipeline
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_or_is_refused_at_preflight(family, inputs, capsys, one_torch_thread):
    methods = list_methods()
    expected = expected_refusals(family)
    refused = {}
    if expected:
        # the whole family: preflight refuses the methods that cannot explain this model, each in one line
        assert audit.main(audit_argv(inputs, family, methods, f"{family}-refused")) == 2
        error = capsys.readouterr().err.split("saliency-audit: error: ", 1)[1].strip()  # after any log lines
        for line in error.splitlines():
            found = re.fullmatch(r"method (\S+) cannot explain this model: (.+)[:;] use (\w+).*", line)
            assert found, f"not a refusal: {line!r}"
            refused[found[1]] = found[2]
            assert found[3] in methods, line  # what to use instead: a method that exists
        assert not (inputs / f"{family}-refused" / "manifest.json").exists()
    assert set(refused) == set(expected), f"{family}: refused {sorted(refused)}, expected {sorted(expected)}"
    for method, reason in expected.items():
        assert re.search(reason, refused[method]), f"{family} {method}: {refused[method]}"

    running = [m for m in methods if m not in refused]
    manifest = audit.run(audit_argv(inputs, family, running, family))
    output = inputs / family
    assert manifest["reconciled"] and manifest["status"] == "succeeded"
    assert manifest["counts"] == {m: {"read": 3, "explained": 3, "errors": 0} for m in running}
    assert read_output(output / manifest["outputs"]["errors"]) == []
    rows = read_output(output / manifest["outputs"]["saliency"])
    assert sorted((r["method"], r["image_id"]) for r in rows) == sorted((m, p) for m in running for p in PHOTOS)
    constant = dict.fromkeys(running, 0)
    for row in rows:
        assert (row["height"], row["width"]) == (SIZE, SIZE)
        check_map(row["method"], row["saliency"], row, f"{family}, {row['image_id']}")
        constant[row["method"]] += int(min(row["saliency"]) == max(row["saliency"]))
    summary = read_output(output / manifest["outputs"]["summary"])
    for method in running:  # the summary counts the same rows, and the same constant maps
        (total,) = [r for r in summary if r["method"] == method and r["target"] is None]
        assert (total["count"], total["constant_maps"]) == (3, constant[method]), method
        assert sum(r["count"] for r in summary if r["method"] == method and r["target"] is not None) == 3, method


@pytest.mark.slow  # every method at its defaults, five architectures
@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_work_on_every_architecture(family, inputs, one_torch_thread):
    """Every method that is not refused, at its defaults, on one photo (the API: the same explainers)."""
    model = logits_model(family)
    image = torch.from_numpy(np.array(Image.fromarray(photos.astronaut()).resize((SIZE, SIZE), Image.BILINEAR)))
    image = (image.permute(2, 0, 1)[None].float() / 255 - MEAN) / STD
    with torch.no_grad():
        target = model(image).argmax(1)
    refused = set()
    for method in list_methods():
        options = {"aae": str(inputs / "aae.pt")} if method == "abele" else {}
        try:
            result = get_explainer(method, model, **options).explain(image, target, torch.tensor([7]))
        except UnsupportedModel:
            refused.add(method)
            continue
        extras = {k: v[0] for k, v in result.extras.items()}
        extras = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in extras.items()}
        check_map(method, result.maps[0].flatten().numpy(), extras, f"{family}, defaults")
    assert refused == set(expected_refusals(family))
