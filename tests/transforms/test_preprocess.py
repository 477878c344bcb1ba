import io

import numpy as np
import pytest
from conftest import png_bytes
from PIL import Image

from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess
from saliency_audit.transforms.io.records import RawImage

rng = np.random.default_rng(0)


def raw(data, fmt="png"):
    return RawImage("id", "src", data, fmt)


def test_grey_png_decodes_exactly():
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    array = decode(raw(png_bytes(grey)), 10**6)
    assert array.shape == (5, 7, 1) and array.dtype == np.float32
    np.testing.assert_array_equal(array[:, :, 0], grey / np.float32(255))


def test_rgba_drops_alpha_and_palette_becomes_rgb():
    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    array = decode(raw(buffer.getvalue()), 10**6)
    np.testing.assert_array_equal(array, rgba[:, :, :3] / np.float32(255))


def test_truncated_and_garbage_images_are_decode_errors():
    data = png_bytes(rng.integers(0, 256, (40, 40), dtype=np.uint8))
    for bad in (data[: len(data) // 2], b"\x89PNG\r\n\x1a\nnonsense", b""):
        with pytest.raises(BadImage, match="cannot decode png") as info:
            decode(raw(bad), 10**6)
        assert info.value.stage == "decode"


def test_images_over_the_pixel_limit_are_rejected_before_decoding():
    with pytest.raises(BadImage, match="over the limit of 100"):
        decode(raw(png_bytes(np.zeros((20, 20), np.uint8))), 100)


def test_npy_shapes_and_dtypes():
    ok = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(decode(raw(_npy(ok), "npy"), 100)[:, :, 0], ok)
    with pytest.raises(BadImage, match=r"must be \[H,W\] or \[H,W,C\]"):
        decode(raw(_npy(np.zeros((2, 2, 2, 2))), "npy"), 100)
    with pytest.raises(BadImage, match="NaN"):
        decode(raw(_npy(np.full((2, 2), np.nan, np.float32)), "npy"), 100)
    with pytest.raises(BadImage, match="cannot decode npy"):
        decode(raw(b"\x93NUMPYxx", "npy"), 100)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_channel_rules():
    grey = np.full((4, 4, 1), 0.5, np.float32)
    rgb = rng.random((4, 4, 3), dtype=np.float32)
    assert preprocess(grey, Preprocessing(channels=3)).shape == (3, 4, 4)
    with pytest.raises(BadImage, match="3 channels but the model takes 1") as info:
        preprocess(rgb, Preprocessing(channels=1))
    assert info.value.stage == "preprocess"
    luma = preprocess(rgb, Preprocessing(channels=1, to_grayscale=True))
    np.testing.assert_allclose(luma[0], rgb @ np.array([0.299, 0.587, 0.114]), rtol=1e-5)
    with pytest.raises(BadImage, match="has 2 channels"):
        preprocess(np.zeros((4, 4, 2), np.float32), Preprocessing())


def test_resize_and_normalise():
    image = rng.random((10, 6, 3), dtype=np.float32)
    out = preprocess(image, Preprocessing(resize=(5, 3), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert out.shape == (3, 5, 3)
    constant = preprocess(np.full((10, 6, 1), 0.75, np.float32), Preprocessing(resize=(4, 4), mean=(0.5,), std=(0.25,)))
    np.testing.assert_allclose(constant, 1.0, rtol=1e-5)


def test_bad_preprocessing_options():
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Preprocessing(channels=2)
    with pytest.raises(ValueError, match="--mean has 2 values"):
        Preprocessing(channels=3, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="--std values must be positive"):
        Preprocessing(std=(0.0,))
