"""Ground truth (masks and boxes) travels from tar and Parquet shards to ImageBatch.masks,
aligned with the model input; a bad ground truth costs its record with a reason, never silently."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import add_member, png_bytes
from PIL import Image

from saliency_audit.transforms.io.preprocess import Preprocessing, boxes_to_mask
from saliency_audit.transforms.io.readers import JSON_MAX_BYTES, MAX_BOXES, _split_key, read_shard
from saliency_audit.transforms.io.records import ErrorRecord, ImageBatch, RawImage
from saliency_audit.transforms.read import ReadShardBatches

SIDE = 40
# An image whose left half is bright, and the mask of that half.
LEFT = np.zeros((SIDE, SIDE), dtype=np.uint8)
LEFT[:, : SIDE // 2] = 255
PLAIN = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def write_tar(path, members) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return str(path)


def boxes_json(*boxes, **extra) -> bytes:
    return json.dumps({"boxes": [list(b) for b in boxes], **extra}).encode()


def run(url: str, resize=(28, 28), batch_size: int = 8) -> tuple[list[ImageBatch], list[ErrorRecord], int]:
    """The pipeline's own read -> decode -> preprocess step on one shard: (batches, errors, records read)."""
    prep = Preprocessing(channels=1, resize=resize)
    outputs = list(ReadShardBatches(prep, batch_size).process(url))
    tagged = [(getattr(o, "tag", None), getattr(o, "value", o)) for o in outputs]
    batches = [v for t, v in tagged if t is None]
    errors = [v for t, v in tagged if t == "errors"]
    read = sum(v for t, v in tagged if t == "read")
    assert read == sum(len(b.image_ids) for b in batches) + len(errors)  # every record accounted for
    return batches, errors, read


def by_id(batches: list[ImageBatch]) -> dict[str, tuple[np.ndarray, np.ndarray | None, bool]]:
    """image id -> (pixels [C,H,W], mask row or None, has_mask)."""
    out = {}
    for b in batches:
        for i, image_id in enumerate(b.image_ids):
            out[image_id] = (b.pixels[i], None if b.masks is None else b.masks[i],
                             bool(b.has_mask[i]) if b.has_mask is not None else False)
    return out


# 1. Tar shards: KEY.mask.png and KEY.json belong to KEY.

def test_mask_member_belongs_to_its_key():
    assert _split_key("d/x1.mask.png") == ("d/x1", "mask.png")
    assert _split_key("d/x1.json") == ("d/x1", "json")


def test_tar_mask_and_boxes_reach_the_batch_aligned_with_the_resized_pixels(tmp_path):
    url = write_tar(tmp_path / "s.tar", [
        ("a.png", png_bytes(LEFT)), ("a.mask.png", png_bytes(LEFT)),
        ("b.png", png_bytes(PLAIN)), ("b.json", boxes_json([0, 0, 20, 40], caption="ignored")),
        ("c.png", png_bytes(PLAIN)), ("c.cls", b"3"),
    ])
    raw = list(read_shard(url))
    assert [type(r) for r in raw] == [RawImage] * 3
    assert raw[0].mask == png_bytes(LEFT) and raw[0].boxes is None
    assert raw[1].mask is None and raw[1].boxes == [[0.0, 0.0, 20.0, 40.0]]
    assert raw[2].mask is None and raw[2].boxes is None and raw[2].label == 3

    (batch,), errors, _ = run(url)
    assert not errors
    assert batch.masks.dtype == bool and batch.masks.shape == (3, 28, 28) == (3, *batch.pixels.shape[2:])
    assert batch.has_mask == [True, True, False]
    left_half = np.zeros((28, 28), dtype=bool)
    left_half[:, :14] = True
    np.testing.assert_array_equal(batch.masks[0], left_half)
    np.testing.assert_array_equal(batch.masks[0], batch.pixels[0, 0] > 0.5)  # the mask follows the pixels
    np.testing.assert_array_equal(batch.masks[1], left_half)                 # a box of the left half: the same
    assert not batch.masks[2].any()


@pytest.mark.parametrize("width, side", [(3, 28), (7, 28), (3, 17), (3, 64)])
def test_resized_mask_keeps_the_pixels_geometry_on_both_edges(tmp_path, width, side):
    # Bright stripes at both edges, and their mask: resized, the mask is still where the pixels
    # are bright, and still mirror-symmetric (a mask resized on the corners' grid would shift).
    stripes = np.zeros((SIDE, SIDE), dtype=np.uint8)
    stripes[:, :width] = stripes[:, -width:] = 255
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(stripes)), ("a.mask.png", png_bytes(stripes))])
    (batch,), _, _ = run(url, resize=(side, side))
    np.testing.assert_array_equal(batch.masks[0], batch.pixels[0, 0] > 0.5)
    np.testing.assert_array_equal(batch.masks[0], batch.masks[0][:, ::-1])


def test_without_resize_the_mask_is_the_original(tmp_path):
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[3:7, 30:39] = 1
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("a.mask.png", png_bytes(mask))])
    (batch,), _, _ = run(url, resize=None)
    np.testing.assert_array_equal(batch.masks[0], mask != 0)


def test_a_shard_without_ground_truth_gives_no_masks(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("b.png", png_bytes(LEFT))])
    (batch,), _, _ = run(url)
    assert batch.masks is None and batch.has_mask is None


def test_mask_and_boxes_of_one_record_are_united(tmp_path):
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:10, :10] = 255
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("a.mask.png", png_bytes(mask)),
                                         ("a.json", boxes_json([30, 30, 40, 40]))])
    (batch,), _, _ = run(url, resize=None)
    expected = mask != 0
    expected[30:, 30:] = True
    np.testing.assert_array_equal(batch.masks[0], expected)


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16"])
def test_single_channel_mask_modes_nonzero_is_inside(tmp_path, mode):
    values = np.zeros((SIDE, SIDE), dtype=np.uint8)
    values[5:9, 2:30] = 1
    image = Image.fromarray(values * 255).convert("1") if mode == "1" else \
        Image.fromarray(values.astype(np.uint16) * 300) if mode == "I;16" else Image.fromarray(values, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("a.mask.png", buffer.getvalue())])
    (batch,), errors, _ = run(url, resize=None)
    assert not errors
    np.testing.assert_array_equal(batch.masks[0], values != 0)


def test_coco_bbox_negative_and_fractional_boxes(tmp_path):
    url = write_tar(tmp_path / "s.tar", [
        ("a.png", png_bytes(PLAIN)), ("a.json", json.dumps({"bbox": [2, 3, 4, 5]}).encode()),
        ("b.png", png_bytes(PLAIN)), ("b.json", boxes_json([-5, -5, 10, 10], [35.5, 1.2, 99, 1.8])),
        ("c.png", png_bytes(PLAIN)), ("c.json", b'{"caption": "no boxes: no ground truth"}'),
        ("d.png", png_bytes(PLAIN)), ("d.json", b'{"boxes": []}'),
    ])
    (batch,), errors, _ = run(url, resize=None)
    assert not errors
    masks = dict(zip(batch.image_ids, batch.masks))
    expected = np.zeros((SIDE, SIDE), dtype=bool)
    expected[3:8, 2:6] = True                       # COCO [x, y, w, h]
    np.testing.assert_array_equal(masks["a"], expected)
    expected = np.zeros((SIDE, SIDE), dtype=bool)
    expected[:10, :10] = True                       # clipped at 0
    expected[1:2, 35:] = True                       # every pixel a fractional box touches, clipped at 40
    np.testing.assert_array_equal(masks["b"], expected)
    assert batch.has_mask == [True, True, False, True]  # an empty box list is ground truth: an empty mask
    assert not masks["c"].any() and not masks["d"].any()


def test_boxes_to_mask_equals_filling_each_box():
    rng = np.random.default_rng(1)
    for _ in range(50):
        height, width = rng.integers(1, 30, 2)
        boxes = []
        for _ in range(rng.integers(0, 6)):
            x0, x1 = np.sort(rng.uniform(-10, width + 10, 2))
            y0, y1 = np.sort(rng.uniform(-10, height + 10, 2))
            if rng.random() < 0.5:
                x0, y0, x1, y1 = np.round([x0, y0, x1, y1])
            boxes.append([x0, y0, x1, y1])
        expected = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in boxes:
            rows = slice(max(int(np.floor(y0)), 0), max(int(np.ceil(y1)), 0))
            cols = slice(max(int(np.floor(x0)), 0), max(int(np.ceil(x1)), 0))
            expected[rows, cols] = True
        np.testing.assert_array_equal(boxes_to_mask(boxes, (height, width)), expected, err_msg=str(boxes))


# 2. Parquet shards: `mask` (PNG bytes) and `boxes` (list of [x0, y0, x1, y1]) columns.

def test_parquet_mask_and_boxes_columns_round_trip(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({
        "image_id": ["a", "b", "c"],
        "image": [png_bytes(LEFT), png_bytes(PLAIN), png_bytes(PLAIN)],
        "mask": pa.array([png_bytes(LEFT), None, None], pa.binary()),
        "boxes": pa.array([None, [[0, 0, 20, 40]], None], pa.list_(pa.list_(pa.float64()))),
    }), path)
    (batch,), errors, _ = run(str(path))
    assert not errors and batch.has_mask == [True, True, False]
    np.testing.assert_array_equal(batch.masks[0], batch.pixels[0, 0] > 0.5)
    np.testing.assert_array_equal(batch.masks[1], batch.masks[0])
    assert not batch.masks[2].any()


def test_parquet_hostile_ground_truth_costs_its_record(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({
        "image_id": ["good", "short", "nan", "corrupt"],
        "image": [png_bytes(PLAIN)] * 4,
        "mask": pa.array([None, None, None, b"\x89PNG\r\n\x1a\nnot really"], pa.binary()),
        "boxes": pa.array([[[1, 1, 2, 2]], [[1, 2, 3]], [[0, 0, float("nan"), 1]], None],
                          pa.list_(pa.list_(pa.float64()))),
    }), path)
    (batch,), errors, read = run(str(path))
    assert batch.image_ids == ["good"] and read == 4
    reasons = {e.image_id: (e.stage, e.reason) for e in errors}
    assert reasons["short"][0] == "read" and "box 0 is not 4 numbers" in reasons["short"][1]
    assert reasons["nan"][0] == "read" and "NaN or infinite" in reasons["nan"][1]
    assert reasons["corrupt"][0] == "decode" and "cannot decode ground truth mask PNG" in reasons["corrupt"][1]


def test_parquet_mask_column_of_another_type_is_an_error(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": [png_bytes(PLAIN)], "mask": ["left half"]}), path)
    (error,) = list(read_shard(str(path)))
    assert error.stage == "read" and "mask column holds str" in error.reason


# 3. Hostile tar ground truth: the record is an error naming the mask or boxes; its neighbours survive.

def rgb_png() -> bytes:
    return png_bytes(np.zeros((SIDE, SIDE, 3), dtype=np.uint8))


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(LEFT).save(buffer, format="JPEG")
    return buffer.getvalue()


HOSTILE = {
    "mask of another size": ("mask.png", png_bytes(LEFT[:20, :20]), "decode",
                             "ground truth mask is 20x20 but its image is 40x40"),
    # refused from its header, before its 9 million pixels are decoded
    "mask bomb": ("mask.png", png_bytes(np.zeros((3000, 3000), np.uint8)), "decode",
                  "is 3000x3000 but its image is 40x40"),
    "corrupt mask": ("mask.png", png_bytes(LEFT)[:60], "decode", "cannot decode ground truth mask PNG"),
    "jpeg named mask.png": ("mask.png", jpeg_bytes(), "decode", "cannot decode ground truth mask PNG"),
    "rgb mask": ("mask.png", rgb_png(), "decode", "single-channel PNG"),
    "lossy mask member": ("mask.jpg", jpeg_bytes(), "read", "must be a PNG"),
    "malformed json": ("json", b'{"boxes": [[0, 0, 1, 1]', "read", "ground truth JSON is malformed"),
    "json not utf-8": ("json", b'{"boxes": "\xff"}', "read", "ground truth JSON is malformed"),
    "deeply nested json": ("json", b"[" * 200_000 + b"]" * 200_000, "read", "ground truth JSON is malformed"),
    "json not an object": ("json", b"[[0, 0, 1, 1]]", "read", "must be an object, got list"),
    "boxes not a list": ("json", b'{"boxes": 5}', "read", "must be a list"),
    "box of 3 numbers": ("json", b'{"boxes": [[0, 0, 1]]}', "read", "box 0 is not 4 numbers"),
    "box of strings": ("json", b'{"boxes": [[0, 0, 1, 1], ["0", 0, 1, 1]]}', "read", "box 1 is not 4 numbers"),
    "box of booleans": ("json", b'{"boxes": [[true, 0, 1, 1]]}', "read", "box 0 is not 4 numbers"),
    "NaN": ("json", b'{"boxes": [[NaN, 0, 1, 1]]}', "read", "NaN or infinite"),
    "Infinity": ("json", b'{"boxes": [[0, 0, Infinity, 1]]}', "read", "NaN or infinite"),
    "1e999": ("json", b'{"boxes": [[0, 0, 1e999, 1]]}', "read", "NaN or infinite"),
    "huge int": ("json", b'{"boxes": [[0, 0, 1' + b"0" * 400 + b', 1]]}', "read", "NaN or infinite"),
    "inverted box": ("json", b'{"boxes": [[10, 0, 5, 1]]}', "read", "box 0 is inverted"),
    "negative bbox width": ("json", b'{"bbox": [10, 0, -5, 1]}', "read", "negative width or height"),
    "too many boxes": ("json", json.dumps({"boxes": [[0, 0, 1, 1]] * (MAX_BOXES + 1)}).encode(), "read",
                       f"over the limit of {MAX_BOXES}"),
    "huge json": ("json", b'{"pad": "' + b" " * JSON_MAX_BYTES + b'"}', "read", f"over the limit of {JSON_MAX_BYTES}"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_tar_ground_truth_costs_only_its_record(tmp_path, case):
    ext, data, stage, reason = HOSTILE[case]
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(LEFT)), ("a.mask.png", png_bytes(LEFT)),
                                         ("bad.png", png_bytes(PLAIN)), (f"bad.{ext}", data),
                                         ("c.png", png_bytes(PLAIN))])
    batches, (error,), read = run(url)
    assert read == 3 and sorted(i for b in batches for i in b.image_ids) == ["a", "c"]
    assert error.image_id == "bad" and error.stage == stage and reason in error.reason, error
    assert by_id(batches)["a"][2] and not by_id(batches)["c"][2]


def test_a_mask_without_its_image_is_an_error_not_a_sample(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("b.mask.png", png_bytes(LEFT)),
                                         ("b.json", boxes_json([0, 0, 1, 1]))])
    records = list(read_shard(url))
    assert isinstance(records[0], RawImage) and records[0].mask is None
    assert isinstance(records[1], ErrorRecord) and records[1].image_id == "b"
    assert "no image member" in records[1].reason and "mask.png" in records[1].reason


def test_a_hostile_image_with_a_good_mask_is_the_image_error(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("a.png", b"not a png"), ("a.mask.png", png_bytes(LEFT))])
    _, (error,), _ = run(url)
    assert error.stage == "decode" and "cannot decode png image" in error.reason


# 4. The batch's ground truth survives take() (repeated ids, skipped images) and pickling (Beam).

def test_take_keeps_masks_aligned_and_drops_them_when_none_is_left(tmp_path):
    url = write_tar(tmp_path / "s.tar", [("a.png", png_bytes(PLAIN)), ("b.png", png_bytes(LEFT)),
                                         ("b.mask.png", png_bytes(LEFT)), ("c.png", png_bytes(PLAIN))])
    (batch,), _, _ = run(url)
    batch = pickle.loads(pickle.dumps(batch))
    taken = batch.take([1, 0])
    assert taken.image_ids == ["b", "a"] and taken.has_mask == [True, False]
    np.testing.assert_array_equal(taken.masks, batch.masks[[1, 0]])
    none_left = batch.take([2, 0])
    assert none_left.masks is None and none_left.has_mask is None
