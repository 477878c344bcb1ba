"""Segmentation, fills and the batched black box shared by lime, anchor and lore."""
import numpy as np
import pytest
import torch
from skimage import data, transform

from saliency_audit.explainers.blackbox.search import BlackBox, run_searches
from saliency_audit.explainers.blackbox.superpixels import SEGMENTATIONS, fill_images, grid_segments, segment

torch.set_num_threads(2)


def camera(size):
    return torch.tensor(transform.resize(data.camera() / 255.0, (size, size)), dtype=torch.float32)[None]


def astronaut(size):
    rgb = transform.resize(data.astronaut() / 255.0, (size, size))
    return torch.tensor(np.moveaxis(rgb, -1, 0), dtype=torch.float32)


def digit():
    """A 28x28 stroke drawing, black background, like an MNIST digit."""
    image = torch.zeros(1, 28, 28)
    image[0, 5:23, 12:16] = 1.0
    image[0, 5:9, 8:20] = 0.8
    image[0, 19:23, 8:20] = 0.6
    return image


@pytest.mark.parametrize("segmentation", SEGMENTATIONS)
@pytest.mark.parametrize("image", [digit(), camera(32), astronaut(48)], ids=["digit", "gray", "rgb"])
def test_segments_are_contiguous_labels_with_enough_superpixels(segmentation, image):
    labels = segment(image, segmentation, min_segments=4)
    assert labels.shape == image.shape[1:] and labels.dtype == np.int32
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    assert labels.max() + 1 >= 4


def test_default_gives_a_useful_number_on_digits_and_photos():
    assert 5 <= segment(digit()).max() + 1 <= 60
    assert 15 <= segment(astronaut(64)).max() + 1 <= 200


def test_normalised_input_segments_like_unit_range():
    image = astronaut(40)
    normalised = (image - 0.45) / 0.22
    assert np.array_equal(segment(image, "slic"), segment(normalised, "slic"))
    assert np.array_equal(segment(image, seed=3), segment(normalised, seed=3))


def test_image_smaller_than_the_segmentation_scale():
    image = astronaut(8)
    for name in SEGMENTATIONS:
        assert segment(image, name, min_segments=4).max() + 1 >= 4


def test_too_few_segments_refines_then_falls_back_to_a_grid():
    flat = torch.full((1, 16, 16), 0.3)
    labels = segment(flat, "quickshift", min_segments=6)
    assert labels.max() + 1 >= 6
    coarse = segment(camera(32), "slic", {"n_segments": 2}, min_segments=8)
    assert coarse.max() + 1 >= 8
    with pytest.raises(ValueError, match="min_segments"):
        segment(torch.zeros(1, 1, 3), min_segments=4)
    with pytest.raises(ValueError, match="unknown segmentation"):
        segment(camera(16), "watershed")
    with pytest.raises(ValueError, match="channels"):
        segment(torch.zeros(2, 8, 8))


def test_grid_segments():
    grid = grid_segments(10, 20, 8)
    assert grid.max() + 1 == 8 and grid.shape == (10, 20)


def test_fills():
    images = torch.stack([astronaut(16), astronaut(16).flip(1)])
    segments = torch.as_tensor(np.stack([segment(im, "grid") for im in images]), dtype=torch.long)
    mean = fill_images(images, segments, "mean")
    cell = segments[0] == 5
    assert torch.allclose(mean[0][:, cell], images[0][:, cell].mean(1, keepdim=True).expand(-1, int(cell.sum())))
    assert torch.equal(fill_images(images, segments, -1.5), torch.full_like(images, -1.5))
    blurred = fill_images(images, segments, "blur:1")
    assert blurred.shape == images.shape and not torch.equal(blurred, images)
    with pytest.raises(ValueError, match="unknown fill"):
        fill_images(images, segments, "noise")
    with pytest.raises(ValueError, match="unknown fill"):
        fill_images(images, segments, "blur:x")


def test_image_mean_hides_a_patch_that_is_its_own_superpixel():
    """Under "mean" a bright patch that slic keeps (nearly) as one superpixel stays a bright
    patch when hidden; under "image-mean" it takes the image's average, like every hidden region."""
    image = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.5
    image[0, 0, 10:14, 17:21] = 1.0
    labels = segment(image[0], "slic")
    patch = np.unique(labels[10:14, 17:21])
    assert len(patch) == 1 and (labels == patch[0]).sum() <= 32  # not merged into the noise
    segments = torch.as_tensor(labels, dtype=torch.long)[None]
    # brighter than any noise pixel: the "hidden" patch is still a bright patch
    assert fill_images(image, segments, "mean")[0, 0, 10:14, 17:21].min() > 0.75
    hidden = fill_images(image, segments, "image-mean")
    assert torch.allclose(hidden, image.mean().expand_as(image))


class MeanOfChannel0(torch.nn.Module):
    def forward(self, x):
        m = x[:, 0].mean(dim=(1, 2))
        return torch.stack([-m, m], 1) * 10


def test_blackbox_chunks_compose_and_count():
    images = torch.stack([camera(12), camera(12) * 0.5])
    segments = [grid_segments(12, 12, 4), grid_segments(12, 12, 9)]
    ids = np.array([0, 0, 1, 1, 1])
    masks = np.zeros((5, 9), dtype=bool)
    masks[0, :4] = True
    masks[2, :9] = True
    masks[3, 0] = True
    outputs = [BlackBox(MeanOfChannel0(), images, torch.tensor([1, 1]), segments, 0.0, n).query(ids, masks)
               for n in (2, 100)]
    assert np.allclose(outputs[0][0], outputs[1][0])
    p = outputs[1][0]
    assert p[0] > 0.5 and np.isclose(p[1], 0.5) and p[2] > p[3] > p[4]
    bb = BlackBox(MeanOfChannel0(), images, torch.tensor([1, 1]), segments, 0.0, 3)
    first = bb.query(ids, masks)
    assert bb.calls.tolist() == [2, 3]
    # repeats, within a request or across requests, are answered without the model
    again = bb.query(np.concatenate([ids, ids]), np.concatenate([masks, masks]))
    assert bb.calls.tolist() == [2, 3]
    assert np.array_equal(again[0], np.concatenate([first[0], first[0]]))


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


def test_masks_that_differ_only_in_inert_superpixels_are_one_image():
    """A superpixel that already equals its fill (black background under a black fill) makes
    no difference on or off, so such masks cost one model call and get the same answer."""
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, :4, :4] = 1.0  # only cell 0 of a 2x2 grid has ink
    model = Counting(MeanOfChannel0())
    bb = BlackBox(model, image, torch.tensor([1]), [grid_segments(8, 8, 4)], 0.0, 100)
    masks = np.array([[1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    probs, labels = bb.query(np.zeros(5, dtype=np.int64), masks)
    # two distinct images; the blank one's exact tie is then decided alone (stable_argmax): 3 rows
    assert model.images == 3 and bb.calls.tolist() == [2]
    assert len(set(probs[:3])) == 1 and len(set(probs[3:])) == 1 and probs[0] > probs[3]
    assert labels.tolist() == [1, 1, 1, 0, 0]  # a blank image ties, and argmax takes class 0


def test_run_searches_sends_each_search_its_own_replies():
    images = torch.stack([camera(8), camera(8)])
    bb = BlackBox(MeanOfChannel0(), images, torch.tensor([1, 0]), [grid_segments(8, 8, 4)] * 2, 0.0, 4)

    def search(n_rounds, width):
        seen = []
        for r in range(n_rounds):
            probs, labels = yield np.ones((r + 1, width), dtype=bool)
            assert len(probs) == r + 1 == len(labels)
            seen.append(round(float(probs[0]), 6))
        return seen

    first, second = run_searches(bb, [search(3, 4), search(1, 2)])
    assert len(first) == 3 and len(second) == 1
    assert first[0] > 0.5 > second[0]
