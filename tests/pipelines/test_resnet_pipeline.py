"""The methods in the pipeline on a ResNet-18-shaped network and real RGB photos (abele with an
autoencoder that train-aae fits to the same preprocessed photos)."""
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import add_member, png_bytes, read_output
from skimage import data as photos

from saliency_audit.pipelines import audit, cli
from saliency_audit.pipelines.training.reference_model import resnet18

pytestmark = pytest.mark.slow  # every method on photographs through the pipeline

METHODS = ["sal", "grad", "intg", "deeplift", "elrp", "lrp", "occlusion", "mask", "smoothgrad", "gradcam", "lime",
           "abele", "gradcampp", "hirescam", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam", "rise",
           "xrai", "expected_gradients", "random", "sobel"]
PREPROCESSING = ["--resize", "32,32", "--channels", "3", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
PHOTOS = {"astronaut": photos.astronaut, "coffee": photos.coffee, "chelsea": photos.chelsea,
          "rocket": photos.rocket}
SIZE = 32
# A CAM's ReLU zeroes a map whose class evidence at the layer is all negative: an untrained network can give it.
CAMS = {"gradcam", "gradcampp", "hirescam", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet")
    with tarfile.open(root / "photos.tar", "w") as tar:
        for name, load in PHOTOS.items():
            add_member(tar, f"{name}.png", png_bytes(load()))
    torch.manual_seed(0)
    model = resnet18()  # torchvision's widths: 11M parameters
    with torch.no_grad():  # running statistics that BatchNorm folding has to get right
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / "resnet18.pt")
    # a 2-epoch AAE is no good at reconstruction, but it has the shape, channels and value range
    # of the normalised photos, which the run checks before it starts
    assert cli.main(["train-aae", "--input", str(root / "*.tar"), "--output", str(root / "aae.pt"),
                     "--epochs", "2", "--batch-size", "2", "--hidden", "8,16", "--holdout", "0",
                     "--no-progress", "--device", "cpu", *PREPROCESSING]) == 0
    options = {"intg": {"n_steps": 16}, "smoothgrad": {"n_samples": 8}, "mask": {"n_iter": 20},
               "lime": {"n_samples": 200}, "abele": {"neighbours": 100, "generations": 3, "exemplars": 10},
               "lrp": {"composite": "epsilon_gamma_box"}, "rise": {"n_masks": 200},
               "expected_gradients": {"n_samples": 8}, "xrai": {"n_steps": 8}}
    manifest = audit.run([
        "--input", str(root / "*.tar"), "--model", "saliency_audit.pipelines.training.reference_model:resnet18",
        "--weights", str(root / "resnet18.pt"), "--methods", ",".join(METHODS), *PREPROCESSING,
        "--aae", str(root / "aae.pt"), "--batch-size", "4", "--method-options", json.dumps(options),
        "--output", str(root / "out")])
    return manifest, read_output(root / "out" / "saliency"), model


def test_every_method_explains_every_photo(audited):
    manifest, rows, _ = audited
    assert manifest["reconciled"]
    assert manifest["counts"] == {m: {"read": 4, "explained": 4, "errors": 0} for m in METHODS}
    assert {(r["method"], r["image_id"]) for r in rows} == {(m, p) for m in METHODS for p in PHOTOS}
    for row in rows:
        assert (row["height"], row["width"]) == (SIZE, SIZE)
        saliency = np.asarray(row["saliency"])
        assert saliency.shape == (SIZE * SIZE,) and np.isfinite(saliency).all()
        # The CAMs' ReLU zeroes a map whose class evidence is all negative, and mask deletes
        # nothing where the blurred reference does not lower the target's margin (it then reports
        # deleted_score_relative NaN), both of which an untrained network can give; every other
        # method must see something
        if row["method"] == "mask" and not saliency.any():
            assert row["deleted_score_relative"] is None or np.isnan(row["deleted_score_relative"])
        elif row["method"] not in CAMS:
            assert saliency.any(), f"{row['method']} gave an all-zero map for {row['image_id']}"


def test_abele_explains_colour_images_with_colour_exemplars(audited):
    _, rows, _ = audited
    for row in (r for r in rows if r["method"] == "abele"):
        assert row["rule"].endswith(f"-> class {row['predicted']}") and len(row["latent"]) == 16  # RGB default
        assert len(row["exemplars"]) == row["exemplar_count"] * 3 * SIZE * SIZE
        assert len(row["counter_exemplars"]) == row["counter_exemplar_count"] * 3 * SIZE * SIZE
        assert all(c != row["predicted"] for c in row["counter_exemplar_classes"])


def test_reference_based_methods_keep_their_sums(audited):
    _, rows, _ = audited
    for row in rows:
        if row["method"] in ("intg", "deeplift"):
            # the map sums to f(x) - f(baseline): the gap is small next to the map's own size
            assert abs(row["convergence_delta"]) < 0.05 * np.abs(row["saliency"]).sum() + 1e-4, row["method"]


def test_lrp_gets_the_z_box_bounds_from_mean_and_std(audited):
    """The z-box rule bounds the first layer's input: pixels in [0, 1] after --mean and --std."""
    manifest, _, _ = audited
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    low, high = manifest["methods"]["lrp"]["options"]["input_bounds"]
    np.testing.assert_allclose(low, -mean / std, rtol=1e-6)
    np.testing.assert_allclose(high, (1 - mean) / std, rtol=1e-6)


def test_elrp_equals_gradient_times_input_on_the_relu_resnet(audited):
    """Ancona et al. 2018: for ReLU networks epsilon-LRP -> gradient x input as epsilon -> 0;
    with BatchNorm folded and residual adds this only holds if the graph was handled right."""
    _, rows, _ = audited
    maps = {(r["method"], r["image_id"]): np.asarray(r["saliency"]) for r in rows}
    for photo in PHOTOS:
        grad, elrp = maps[("grad", photo)], maps[("elrp", photo)]
        assert np.abs(elrp - grad).max() < 1e-2 * np.abs(grad).max(), photo
