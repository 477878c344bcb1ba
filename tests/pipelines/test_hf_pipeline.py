"""`saliency-audit run --model hf:FOLDER` end to end: the folder's preprocessor_config.json (a
shortest-edge resize and a ConvNeXt crop) is the run's preprocessing, ground-truth masks go through
the same crop, the predictions are the model's on Hugging Face's own preprocessing, and the
manifest says where each preprocessing value came from and which attention ran."""
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import add_member, png_bytes, read_output
from hf_models import logits_model, save_folder

from saliency_audit.pipelines import audit

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # a whole run (about 10 s on 2 cores)

HEIGHT, WIDTH = 40, 48
# ConvNeXt's: the shorter side to int(32 / 0.8) = 40 (these images have it already), then a 32 x 32 crop,
# at rows 4..35 and columns 8..39 of the 40 x 48 image
PROCESSOR = {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
             "crop_pct": 0.8, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
             "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
N_IMAGES = 4


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    folder = save_folder("convnext", root / "model")
    (root / "model" / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_IMAGES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[:, 8:24] = 255  # the left half of the crop, and the 8 columns left of it that the crop drops
    with tarfile.open(root / "rgb.tar", "w") as tar:
        for i, image in enumerate(images):
            add_member(tar, f"img{i}.png", png_bytes(image))
            add_member(tar, f"img{i}.mask.png", png_bytes(mask))
    audit.run(["--input", str(root / "rgb.tar"), "--model", f"hf:{folder}", "--methods", "grad,gradcam",
               "--output", str(root / "out"), "--device", "cpu", "--batch-size", "4"])
    manifest = json.loads((root / "out" / "manifest.json").read_text())  # as published
    return manifest, read_output(root / "out" / "saliency"), images, root / "out"


def test_every_image_is_explained_at_the_cropped_size(audited):
    manifest, rows, _, _ = audited
    assert manifest["counts"]["grad"]["explained"] == manifest["counts"]["gradcam"]["explained"] == N_IMAGES
    assert {(r["method"], r["height"], r["width"], len(r["saliency"])) for r in rows} == {
        ("grad", 32, 32, 1024), ("gradcam", 32, 32, 1024)}


def test_the_masks_went_through_the_images_crop(audited):
    _, rows, _, _ = audited
    inside = np.zeros((32, 32), bool)
    inside[:, :16] = True  # columns 8..23 of the image are 0..15 of the crop
    for row in rows:
        positive = np.clip(np.asarray(row["saliency"], np.float64).reshape(32, 32), 0, None)
        assert row["relevance_mass"] == pytest.approx(positive[inside].sum() / positive.sum(), abs=1e-5)


def test_the_predictions_are_the_models_on_hugging_faces_preprocessing(audited):
    from PIL import Image
    processing = pytest.importorskip("transformers.models.convnext.image_processing_pil_convnext")
    _, rows, images, _ = audited
    processor = processing.ConvNextImageProcessorPil(**{k: v for k, v in PROCESSOR.items()
                                                        if k != "image_processor_type"})
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probabilities = torch.softmax(logits_model("convnext")(pixels), dim=1)
    for row in rows:
        i = int(row["image_id"].removeprefix("img"))
        assert row["predicted_score"] == pytest.approx(float(probabilities[i, row["predicted"]]), abs=2e-3)
        assert row["predicted_score"] == pytest.approx(float(probabilities[i].max()), abs=2e-3)


def test_the_manifest_records_the_form_the_attention_and_each_preprocessing_source(audited):
    manifest, _, _, _ = audited
    model = manifest["model"]
    assert model["kind"] == "hf" and model["attention"]["implementation"] == "eager"
    assert {url.rsplit("/", 1)[1] for url in model["sha256"]} == {"config.json", "model.safetensors",
                                                                  "preprocessor_config.json"}
    prep = manifest["preprocessing"]
    assert (prep["resize_shortest"], prep["crop"], prep["interpolation"], prep["mean"]) == (
        40, [32, 32], "bicubic", [0.5, 0.4, 0.3])
    assert prep["sources"] == {"resize": "default", "resize_shortest": "preprocessor_config.json",
                               "crop": "preprocessor_config.json", "crop_offset": "default",
                               "interpolation": "preprocessor_config.json", "channels": "config.json",
                               "mean": "preprocessor_config.json", "std": "preprocessor_config.json"}


def test_the_report_shows_the_images_as_the_model_saw_them(audited):
    from saliency_audit.pipelines.reporting.audit_dir import AuditDir
    _, rows, images, output = audited
    shown = AuditDir(str(output)).images({"img0": rows[0]["source"]})["img0"]
    np.testing.assert_allclose(shown, images[0][4:36, 8:40] / 255, atol=1e-6)  # the crop, not the whole image
