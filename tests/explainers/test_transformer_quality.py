"""Every method at its defaults on a briefly trained ViT and ConvNeXt (issue 25), held to what the
CNNs meet: deletion AUC under half a random map's on MNIST digits (the bar of
tests/pipelines/test_resnet_trained.py, which the reference CNN meets with every method), no
constant maps, the planted patch found on at least 90% of images (tests/explainers/
test_planted_feature.py's bar), and the sanity check passed (rank correlation with the fully
randomised model's maps at most 0.5, the run's threshold).

The models, training and measures are benchmarks/transformer_quality.py's (the full table, on more
images and with the CNN beside them: docs/methods.md); each model is trained once per session, on
one thread. A method that misses a bar on an architecture is listed below with the reason found,
as an xfail (reported as XPASS the day it passes, so the list can be updated)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import torch_threads

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import transformer_quality as tq

from saliency_audit.explainers import explainer_class, list_methods
from saliency_audit.explainers.core.base import UnsupportedModel

pytestmark = [
    pytest.mark.slow,  # two models trained and every method run: out of the developer's loop, in CI
    pytest.mark.skipif(not (tq.MNIST / "train5k-images-idx3-ubyte.gz").exists(),
                       reason=f"MNIST data not found at {tq.MNIST}"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason='needs transformers: pip install "saliency-audit[hf]"'),
]

ARCHITECTURES = ("vit", "convnext")
REFUSED = {"vit": {"deeplift", "elrp", "lrp"},  # graph rules without attention, LayerNorm or GELU
           "convnext": {"deeplift", "elrp", "lrp", "rollout", "attention_grad", "legrad"}}  # ... and no attention to read
DIGITS, PLANTED, SANITY = 16, 16, 8
# Seconds per digit at their defaults (RISE's 4,000 masks, abele's and lore's neighbourhoods, anchor's
# search, XRAI's segmentations): faithfulness on fewer digits, in the slow set, and their planted-feature
# and sanity figures only in the benchmark.
HEAVY = {"rise": 4, "abele": 4, "anchor": 4, "lore": 4, "xrai": 4}
BAR, PLANTED_BAR, SANITY_THRESHOLD = 0.5, 0.9, tq.SANITY_THRESHOLD
METHODS = [m for m in list_methods() if not explainer_class(m).control]

# (architecture, method) -> why it misses the bar, measured on this suite's models (the figures:
# benchmarks/transformer_quality.py, docs/methods.md). Not strict: a float rounding that differs on
# another CPU trains slightly different models, and a pair near the bar may then pass.
VIT_CAM = ("one layer's 4x4 grid of 7-px patches at the last block; the methods that follow attention through "
           "every layer (rollout, attention_grad, attnlrp) meet the bar on the same model")
CONVNEXT_CAM = ("the last stage is a 7x7 grid whose 7x7 depthwise kernel spans all of it, so no position stands "
                "for its own region; the gradient CAMs also meet the head's LayerNorm after pooling, which makes "
                "the class gradient orthogonal to the pooled features: the map sums to 0 over positions and the "
                "strongest region scores below average")
UNSIGNED = ("unsigned gradient: as large on the black background, which deleting to black does not change, "
            "as on the strokes")
SATURATED = ("the LayerNorm after the 2-px stem makes each position's embedding blind to the common scale of its "
             "pixels, so the uniform bright patch gets little gradient (saturation); intg and grad, which weigh "
             "the gradient by the input, find it on every image")
PATCH_PIXELS = ("a pixel's gradient through the linear 7-px patch embedding is the embedding's weights times its "
                "token's gradient: the right token, but the largest pixel anywhere in its 7x7 patch")
CAMS = ("gradcam", "hirescam", "gradcampp", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam")
UNFAITHFUL: dict[tuple[str, str], str] = {
    **{("vit", m): VIT_CAM for m in CAMS if m != "eigencam"},
    **{("convnext", m): CONVNEXT_CAM for m in CAMS},
    ("vit", "sal"): UNSIGNED, ("convnext", "sal"): UNSIGNED,
    ("convnext", "expected_gradients"): SATURATED,
    ("convnext", "mask"): ("measured (0.56 of random, 38% planted): this ConvNeXt scores a blurred image as the "
                           "planted class (every blurred patch-free noise image; the CNN none), so blurring, mask's "
                           "reference (the paper's), does not remove the evidence; after three steps the masked image "
                           "scores below the reference, the score term is spent, and the penalties alone shrink the "
                           "starting mask. With reference=0.0: 0.25 of random, 88% planted"),
    **{(arch, "abele"): "measured (ViT 0.55, ConvNeXt 0.43 on 32 digits, above 0.5 on the test's 4); its map "
                        "comes from the autoencoder's exemplars, not the model's gradients" for arch in ARCHITECTURES},
    ("convnext", "anchor"): "measured (0.56); an anchor names the few superpixels that keep the class and ranks the rest evenly",
    ("convnext", "lore"): "measured (0.58); a rule names a few superpixels and ranks the rest evenly",
    ("vit", "legrad"): "measured (0.72): the gradient at an attention weight is the key token's value against the "
                       "class's direction, whether the token is attended or not, so blank patches (41% of the digits' "
                       "patches; deleting them to black changes nothing) get 0.62 of the strokes' mean map; weighted "
                       "by the attention, as attention_grad is, the same gradients score 0.39",
}
MISSES_PLANTED: dict[tuple[str, str], str] = {
    **{("vit", m): PATCH_PIXELS for m in ("sal", "grad", "smoothgrad", "expected_gradients")},
    ("vit", "gradcampp"): VIT_CAM, ("vit", "xgradcam"): VIT_CAM,
    **{("vit", m): "all-zero maps on 9 of the 16 images (a constant map is a miss): the gradient x activation "
                   "at the last block's first norm is negative on every token there, and the CAM's ReLU leaves "
                   "nothing" for m in ("gradcam", "hirescam", "layercam")},
    **{("convnext", m): CONVNEXT_CAM for m in CAMS},
    **{("convnext", m): SATURATED for m in ("sal", "smoothgrad", "expected_gradients")},
    ("convnext", "mask"): UNFAITHFUL["convnext", "mask"],
    ("convnext", "lime"): ("measured (88%, the bar 90%): this ConvNeXt sees the patch only inside its noise (the "
                           "patch alone on black scores as an all-black image, log-odds -3.7), so in LIME's "
                           "black-filled samples the patch's effect depends on its context and the additive fit "
                           "(median R^2 0.48, the CNN's 1.00) lets a context superpixel outrank it; SLIC keeps the "
                           "patch whole (purity 0.97), and 4,000 samples give the same 88%"),
}
FLAGGED: dict[tuple[str, str], str] = {
    ("vit", "eigencam"): "measured (0.92): the first principal component of the last block's tokens, which a random ViT shares",
}




class Lazy(dict):
    """A session cache that computes a key's value on first use, so `-k vit` trains no ConvNeXt."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, key):
        with torch_threads(1):
            self[key] = value = self.compute(key)
        return value


@pytest.fixture(scope="session")
def digits():
    return tq.mnist(1000)


@pytest.fixture(scope="session")
def models(digits):
    (train_x, train_y), _ = digits
    return Lazy(lambda arch: tq.train_digits(arch, train_x, train_y))


@pytest.fixture(scope="session")
def planted_models():
    return Lazy(lambda arch: tq.train_planted(arch, PLANTED))


@pytest.fixture(scope="session")
def explained(models, digits):
    """(architecture, method) -> (images, targets, maps), or the UnsupportedModel it raised."""
    x = torch.from_numpy(digits[1][0])

    def compute(key):
        arch, method = key
        model, images = models[arch], x[:HEAVY.get(method, DIGITS)]
        with torch.no_grad():
            targets = model(images).argmax(1)
        try:
            return images, targets, tq.explain(method, model, images, targets)
        except UnsupportedModel as e:
            return e
    return Lazy(compute)


@pytest.fixture(scope="session")
def references(models, digits):
    """(architecture, digits) -> random maps' mean deletion AUC on the first digits: the level to beat."""
    x = torch.from_numpy(digits[1][0])

    def compute(key):
        arch, n = key
        with torch.no_grad():
            targets = models[arch](x[:n]).argmax(1)
        return tq.random_reference(models[arch], x[:n], targets)
    return Lazy(compute)


def cases(known: dict, methods=METHODS, heavy_slow=True):
    """(architecture, method) parameters: a known miss as an xfail, a heavy method as slow."""
    out = []
    for arch in ARCHITECTURES:
        for method in methods:
            if method in REFUSED[arch]:
                continue
            marks = [pytest.mark.xfail(reason=known[arch, method], strict=False)] if (arch, method) in known else []
            if heavy_slow and method in HEAVY:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(arch, method, marks=marks, id=f"{arch}-{method}"))
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_models_learn_the_digits(models, digits, arch):
    """Three epochs over the 5,000-digit subset (measured: ViT 91%, ConvNeXt 91% of the first 1,000
    test digits)."""
    test_x, test_y = digits[1]
    assert tq.evaluate(models[arch], test_x, test_y) > 0.87


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_refused_methods_say_why_in_one_line(models, digits, arch):
    x = torch.from_numpy(digits[1][0][:1])
    for method in sorted(REFUSED[arch]):
        with pytest.raises(UnsupportedModel, match=f"^{method} cannot explain this model: ") as refusal:
            tq.explain(method, models[arch], x, torch.zeros(1, dtype=torch.long))
        assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("arch, method", cases(UNFAITHFUL))
def test_every_method_beats_a_random_map_by_half(explained, models, references, arch, method):
    result = explained[arch, method]
    assert not isinstance(result, Exception), f"{method} refused the {arch}: {result}"
    images, targets, maps = result
    assert maps.shape == (len(images), 28, 28) and torch.isfinite(maps).all()
    assert tq.constant_share(maps) == 0, f"{method}: constant maps on the {arch}"
    ratio = tq.deletion_ratio(models[arch], images, maps, targets, references[arch, len(images)])
    assert ratio < BAR, f"{method}: deletion AUC {ratio:.2f} of a random map's on the {arch}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_random_control_stays_random(explained, models, references, arch):
    """The level the bar is measured against: the random control's maps (another seed stream) score
    near it, so a ratio under the bar is the method's, not the metric's."""
    images, targets, maps = explained[arch, "random"]
    assert 0.85 < tq.deletion_ratio(models[arch], images, maps, targets, references[arch, len(images)]) < 1.15


@pytest.mark.parametrize("arch, method", cases(MISSES_PLANTED, [m for m in METHODS if m not in HEAVY]))
def test_every_method_finds_the_planted_patch(planted_models, arch, method):
    model, accuracy, x, corners = planted_models[arch]
    assert accuracy > 0.97, f"the planted-feature {arch} did not learn the task ({accuracy:.3f})"
    maps = tq.explain(method, model, x, torch.ones(len(x), dtype=torch.long))
    assert tq.on_patch(maps, corners) >= PLANTED_BAR


@pytest.fixture(scope="session")
def randomised(models, digits):
    x = torch.from_numpy(digits[1][0][:SANITY])
    return Lazy(lambda arch: tq.fully_randomised(models[arch], x))


@pytest.mark.parametrize("arch, method", cases(FLAGGED, [m for m in METHODS if m not in HEAVY]))
def test_maps_change_when_the_model_is_randomised(explained, randomised, arch, method):
    images, targets, maps = explained[arch, method]
    with torch_threads(1):
        rho = tq.sanity_correlation(method, maps[:SANITY], randomised[arch], images[:SANITY], targets[:SANITY])
    assert rho <= SANITY_THRESHOLD, f"{method}: rank correlation {rho:.2f} with the randomised {arch}'s maps"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_sanity_check_flags_a_map_that_ignores_the_model(explained, randomised, arch):
    images, targets, maps = explained[arch, "sobel"]
    assert tq.sanity_correlation("sobel", maps[:SANITY], randomised[arch], images[:SANITY], targets[:SANITY]) > 0.99


def test_a_map_the_randomised_model_leaves_constant_counts_as_unlike_the_trained_one():
    """A randomised model's constant map (mask's empty map where the random model's score does not
    drop: nothing to delete) has lost the trained map's ranking: it counts as 0, not as no image.
    Dropped as NaN, one image of eight decided mask's flag on the CNN (0.52; 0.07 counted)."""
    class Dead(torch.nn.Module):
        """Logits (h, -h), h = relu(<x, w>): where <x, w> < 0 every gradient is 0, so sal's map is."""

        def __init__(self, w):
            super().__init__()
            self.w = torch.nn.Parameter(w)

        def forward(self, x):
            h = torch.relu((x * self.w).flatten(1).sum(1, keepdim=True))
            return torch.cat([h, -h], 1)

    w = torch.linspace(-1, 1, 28 * 28).reshape(1, 1, 28, 28)
    images = torch.cat([torch.relu(w), torch.relu(-w).expand(7, 1, 28, 28)])  # live on the first image only
    trained = w.abs()[:, 0].expand(8, 28, 28)  # the live image's map exactly: correlation 1 there
    rho = tq.sanity_correlation("sal", trained, Dead(w), images, torch.zeros(8, dtype=torch.long))
    assert rho == pytest.approx(1 / 8)
