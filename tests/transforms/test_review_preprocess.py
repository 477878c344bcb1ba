"""Review of c1c3bb8 (a resize beyond --max-pixels refused up front)."""
from saliency_audit.transforms.io.preprocess import Preprocessing, geometry


def test_a_max_pixels_lowered_below_the_model_s_resize_still_runs():
    # --max-pixels rejects large *input* images (docs/options.md); a user auditing 64x64 thumbnails with a
    # 224 px model may lower it to 64*64 and still has every image resized up to 224x224
    Preprocessing(resize=(224, 224), max_pixels=64 * 64)
    prep = Preprocessing(resize_shortest=256, crop=(224, 224), max_pixels=64 * 64)
    assert geometry(prep, (64, 64)) == ((256, 256), (slice(16, 240), slice(16, 240)))
