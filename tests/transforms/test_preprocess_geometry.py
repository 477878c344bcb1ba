"""The model preprocessing Hugging Face and timm name: the shorter side resized, a centre crop, an
interpolation; and ground-truth masks through the same geometry as their images."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, geometry, preprocess, resize_mask


def test_the_shorter_side_and_the_crop_land_where_hugging_face_and_torchvision_put_them():
    # 300 x 449: the longer side int(256 * 449 / 300) = 383, a margin of 383 - 224 = 159
    prep = Preprocessing(resize_shortest=256, crop=(224, 224))
    size, (rows, cols) = geometry(prep, (300, 449))
    assert size == (256, 383) and (rows, cols) == (slice(16, 240), slice(79, 303))  # floor(159 / 2) = 79
    _, (_, cols) = geometry(dataclasses.replace(prep, crop_offset="round"), (300, 449))
    assert cols == slice(80, 304)  # torchvision: round(79.5) = 80 (half to even)
    assert geometry(prep, (449, 300))[0] == (383, 256)  # portrait: the width is the shorter side
    assert geometry(Preprocessing(resize_shortest=32), (32, 40)) == (None, None)  # already there: untouched


def test_a_mask_follows_its_image_through_resize_and_crop():
    mask = np.zeros((40, 60), bool)
    mask[:, 10:20] = True  # columns 10..19 of 60
    prep = Preprocessing(resize_shortest=20, crop=(20, 20))  # 40x60 -> 20x30, then columns 5..24
    expected = np.zeros((20, 20), bool)
    expected[:, 0:5] = True  # columns 5..9 of the resized image, 0..4 of the crop
    np.testing.assert_array_equal(resize_mask(mask, prep), expected)


@pytest.mark.parametrize("prep", [
    Preprocessing(resize=(24, 30)),
    Preprocessing(resize_shortest=21, crop=(17, 19)),
    Preprocessing(resize_shortest=21, crop=(17, 19), crop_offset="round"),
    Preprocessing(resize=(33, 41), crop=(20, 21)),
    Preprocessing(crop=(11, 13)),
])
def test_mask_and_image_share_every_geometry(prep):
    rng = np.random.default_rng(0)
    mask = rng.random((37, 52)) > 0.7
    image = np.repeat(mask[:, :, None].astype(np.float32), 3, axis=2)
    seen = preprocess(image, dataclasses.replace(prep, interpolation="nearest"))[0] > 0.5
    np.testing.assert_array_equal(resize_mask(mask, prep), seen)


def test_a_crop_that_cannot_fit_is_refused_up_front_or_per_image():
    with pytest.raises(ValueError, match="larger than the resized image"):
        Preprocessing(resize=(32, 32), crop=(33, 32))
    with pytest.raises(ValueError, match="larger than the resized image"):
        Preprocessing(resize_shortest=32, crop=(16, 40))
    with pytest.raises(BadImage, match="smaller than the centre crop"):
        preprocess(np.zeros((10, 10, 3), np.float32), Preprocessing(crop=(12, 12)))


@pytest.mark.parametrize("interpolation, pil", [("bicubic", "BICUBIC"), ("bilinear", "BILINEAR"),
                                                ("nearest", "NEAREST")])
def test_each_interpolation_is_pillows_and_bicubic_overshoot_is_clipped_as_pillow_clips_it(interpolation, pil):
    from PIL import Image
    image = np.zeros((16, 21), np.uint8)
    image[:, 9:] = 255  # a hard edge rings under a bicubic kernel
    image[5:9, 2:5] = 128
    for size in ((11, 13), (27, 40)):  # down (antialiased) and up
        reference = np.asarray(Image.fromarray(image).resize(size[::-1], getattr(Image.Resampling, pil)), np.float32)
        out = preprocess(image[:, :, None].astype(np.float32) / 255,
                         Preprocessing(resize=size, interpolation=interpolation))[0] * 255
        assert np.abs(out - reference).max() <= 1.0, (size, np.abs(out - reference).max())
        assert out.min() >= 0 and out.max() <= 255


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 4096 * 4096), st.sampled_from([32, 224, 256, 4096]), st.booleans())
def test_an_extreme_aspect_ratio_cannot_blow_the_resize_up(short, long, shortest, portrait):
    # only the geometry is computed (no pixels): before the bound, 2 x 8,000,000 became 256 x 1,000,000,000
    prep = Preprocessing(resize_shortest=shortest)
    size = (long, short) if portrait else (short, long)
    try:
        target, _ = geometry(prep, size)
    except BadImage as e:
        assert e.stage == "preprocess" and "--max-pixels" in str(e) and "\n" not in str(e)
        return
    height, width = target or size
    assert height * width <= prep.max_pixels


@pytest.mark.parametrize("kwargs", [{"resize": (100_000, 100_000)}, {"resize_shortest": 100_000},
                                    {"resize": (5000, 5000), "crop": (4500, 4500)}])
def test_a_resize_beyond_max_pixels_is_refused_up_front(kwargs):
    """A size from --resize or a model's preprocessor_config.json answers to --max-pixels, as a decoded
    image does: 100000x100000 asked every image for 40 GB and ended the run in an allocator traceback."""
    with pytest.raises(ValueError, match=r"over the limit of 16777216 \(--max-pixels\)"):
        Preprocessing(**kwargs)
    Preprocessing(**kwargs, max_pixels=10**10)  # the user may raise the limit


@pytest.mark.parametrize("channels, expected", [(1, "expected 1$"), (3, "expected 1 or 3$")])
def test_a_mean_of_the_wrong_length_says_what_length_fits(channels, expected):
    with pytest.raises(ValueError, match=f"--mean has 2 values, {expected}"):
        Preprocessing(channels=channels, mean=(0.5, 0.5))
