"""Discrete outputs do not depend on which other images share the batch.

Kernels round differently with the batch size and a row's neighbours (~1e-6 on the demo CNN's
logits on this CPU), and a decision near a tie follows that noise. ``BatchNoise`` makes the noise
explicit and larger, a function of the batch size, the row's position and the batch's content, and
images are put on a decision boundary, so every test below fails when a decision is taken from
batched logits, and passes only when each image gets the decision it gets alone. Each runs with
torch threads 1 and 2 and with oneDNN (mkldnn) on and off, the CPU code paths reachable here.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEMO_DATA, REGION, scene

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.blackbox.aae import load_aae
from saliency_audit.explainers.core.base import (
    DECISION_RTOL,
    alone,
    decision_tolerance,
    near_ties,
    owner_chunks,
    stable_argmax,
)
from saliency_audit.transforms.model.handler import predict


class BatchNoise(torch.nn.Module):
    """``model``'s logits + amplitude * k * s, s = +-1 a hash of the row's position, the batch size,
    the row and the batch's content: a stand-in for a kernel whose rounding depends on the batch.
    It flips a tie between classes unless the row is computed the same way every time."""

    def __init__(self, model: torch.nn.Module, amplitude: float):
        super().__init__()
        self.model, self.amplitude = model, amplitude

    def forward(self, x):
        logits = self.model(x)
        b, k = logits.shape
        content = x.detach().float().reshape(b, -1).sum(1)
        phase = 1e3 * content * (torch.arange(b, device=x.device) + 1) + 7.0 * b + content.sum()
        sign = torch.sign(torch.sin(phase))
        return logits + self.amplitude * sign[:, None] * torch.arange(k, device=x.device)[None]


# torch threads, oneDNN on: the CPU code paths reachable here (SALIENCY_BATCH_PATHS=1 for one)
CPU_PATHS = [(1, True), (1, False), (2, True), (2, False)]


class TieRegion(torch.nn.Module):
    """Class 1 when the region is brighter than 0.9, an exact tie (0, 0) otherwise: a masked image
    that hides the region is labelled by the rounding noise alone."""

    def forward(self, x):
        m = x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 40 * torch.relu(m - 0.9)], 1)


def _on_path(threads: int, mkldnn: bool):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            yield threads, mkldnn
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=CPU_PATHS, ids=lambda p: f"threads{p[0]}-mkldnn{p[1]}")
def cpu_path(request):
    yield from _on_path(*request.param)


@pytest.fixture(params=[CPU_PATHS[0], CPU_PATHS[3]], ids=lambda p: f"threads{p[0]}-mkldnn{p[1]}")
def two_cpu_paths(request):
    """The slow searches run on two paths that differ in both threads and oneDNN."""
    yield from _on_path(*request.param)


@pytest.fixture(scope="module")
def boundary_images(demo_model, demo_images):
    """4 images on the demo CNN's decision boundary (bisected between digits of two classes until
    the alone top-2 gap is under 1e-6 of the logit scale), then 4 plain digits."""
    images, _ = demo_images
    with torch.inference_mode():
        classes = demo_model(images[:16]).argmax(1)
        found = []
        for a in range(16):
            b = next(j for j in range(16) if classes[j] != classes[a])
            lo, hi = 0.0, 1.0  # argmax at lo is classes[a]'s
            for _ in range(40):
                mid = (lo + hi) / 2
                x = (1 - mid) * images[a] + mid * images[b]
                lo, hi = (mid, hi) if demo_model(x[None]).argmax(1) == classes[a] else (lo, mid)
            x = ((1 - lo) * images[a] + lo * images[b])[None]
            if near_ties(demo_model(x), 1e-6):
                found.append(x)
            if len(found) == 4:
                break
    assert len(found) == 4
    return torch.cat(found + [images[20:24]])


def batches(images: torch.Tensor, i: int):
    """Image i alone, at the middle of a batch of 3, and at position 5 of a batch of 8 with others."""
    others = torch.cat([images[:i], images[i + 1:]])
    return {"alone": (images[i:i + 1], 0), "three": (torch.cat([others[:1], images[i:i + 1], others[1:2]]), 1),
            "eight": (torch.cat([others[:5], images[i:i + 1], others[5:7]]), 5)}


def test_stable_argmax_recomputes_only_near_ties():
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0 - 1e-6, 0.0], [0.0, 5.0, 5.0]])
    alone_logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # what recompute returns
    asked = []

    def recompute(rows):
        asked.append(rows.tolist())
        return alone_logits

    classes, recomputed = stable_argmax(logits, recompute)
    assert classes.tolist() == [0, 1, 1] and recomputed == 2 and asked == [[1, 2]]
    assert near_ties(torch.tensor([[1e3, 1e3 - 0.05]])).item()  # the tolerance scales with the logits
    assert not near_ties(torch.tensor([[1e3, 1e3 - 0.2]])).item()
    assert not near_ties(torch.tensor([[1.0], [2.0]])).any()  # one class: nothing to decide


def test_owner_chunks_keep_each_owner_to_itself():
    seen = []

    def fn(x):
        seen.append(x[:, 0].tolist())
        return x * 2

    inputs = torch.arange(7.0)[:, None]
    out = owner_chunks(fn, inputs, [1, 0, 1, 1, 0, 1, 1], 2)
    assert torch.equal(out, inputs * 2)
    assert seen == [[1.0, 4.0], [0.0, 2.0], [3.0, 5.0], [6.0]]
    assert torch.equal(alone(fn, inputs[:2]), inputs[:2] * 2) and seen[-2:] == [[0.0], [1.0]]


def test_predicted_class_is_the_one_alone_in_any_batch(cpu_path, demo_model, boundary_images):
    noisy = BatchNoise(demo_model, 1e-5)  # ~5x this CPU's batch noise, 100x under the tolerance
    scale = demo_model(boundary_images).abs().max().item()
    assert 1e-5 * 9 * 2 < DECISION_RTOL * scale / 2
    flips = 0
    for i in range(len(boundary_images)):
        decisions, raw = {}, {}
        for name, (images, row) in batches(boundary_images, i).items():
            logits, probabilities, predicted = predict(noisy, images)
            decisions[name], raw[name] = int(predicted[row]), int(logits[row].argmax())
            assert torch.allclose(probabilities.sum(1), torch.ones(len(images)))
        assert decisions["three"] == decisions["eight"] == decisions["alone"] == raw["alone"], i
        flips += raw["three"] != raw["alone"] or raw["eight"] != raw["alone"]
    assert flips >= 2  # without the mechanism the boundary images' classes follow the batch


ABELE = dict(neighbours=16, generations=1, exemplars=4, counter_exemplars=2, stored_exemplars=2,
             tree_search="none", max_attempts=200, workers=1)


@pytest.fixture(scope="module")
def aae():
    return load_aae(str(DEMO_DATA / "mnist_aae.pt"))


def same_outputs(results: dict, rows: dict, names) -> None:
    alone_result = results.pop("alone")
    for key, result in results.items():
        for name in names:
            a, b = alone_result.extras[name][0], result.extras[name][rows[key]]
            assert str(a) == str(b), (key, name)
        assert torch.equal(alone_result.maps[0], result.maps[rows[key]]), key


@pytest.mark.slow
def test_abele_outputs_are_the_same_alone_or_in_any_batch(two_cpu_paths, demo_model, demo_images, aae):
    images, _ = demo_images
    noisy = BatchNoise(demo_model, 0.05)  # large: abele's codes never share a pass with another image's
    explainer = get_explainer("abele", noisy, aae=aae, **ABELE)
    results, rows = {}, {}
    for name, (batch, row) in batches(images[:8], 3).items():
        targets = demo_model(batch).argmax(1)
        seeds = torch.arange(len(batch)) + 100
        seeds[row] = 7
        results[name], rows[name] = explainer.explain(batch, targets, seeds), row
    same_outputs(results, rows, list(explainer.extras))


def superpixel_case():
    """The region scene (class 1) and 7 others whose region is dimmer (class 1 or a tie)."""
    images = torch.cat([scene(s) for s in range(8)])
    images[1:, :, REGION[0], REGION[1]] *= torch.linspace(0.3, 1.0, 7)[:, None, None, None]
    return images


# A 3x3 grid (the region is cell 0): at most 2^9 distinct masked images per image, most of them exact
# ties that are decided alone; the default 16 cells made anchor ~50 s a path for the same check.
@pytest.mark.slow
@pytest.mark.parametrize("method, options", [
    ("anchor", dict(segmentation="grid", segmentation_options={"n_segments": 9}, batch_size=20,
                    min_samples_start=20, coverage_samples=200, delta=0.3, max_anchor_size=2)),
    ("lore", dict(segmentation="grid", population_size=40, generations=2)),
])
def test_anchor_and_lore_are_the_same_alone_or_in_any_batch(two_cpu_paths, method, options):
    explainer = get_explainer(method, BatchNoise(TieRegion(), 1e-6), max_forward_batch=8, **options)
    images = superpixel_case()
    results, rows = {}, {}
    for name, (batch, row) in batches(images, 0).items():
        seeds = torch.arange(len(batch)) + 100
        seeds[row] = 7
        targets = torch.ones(len(batch), dtype=torch.long)
        results[name], rows[name] = explainer.explain(batch, targets, seeds), row
    same_outputs(results, rows, list(explainer.extras))


def test_half_precision_logits_are_not_recomputed_one_by_one():
    """16-bit logits round at ~1e-3: a tolerance above that would flag most rows and send every
    masked image through the model alone; their decisions are taken as batched."""
    assert decision_tolerance(torch.float32) == DECISION_RTOL
    assert decision_tolerance(torch.bfloat16) is None and decision_tolerance(torch.float16) is None
    logits = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.bfloat16)
    calls = []
    classes, recomputed = stable_argmax(logits, lambda rows: calls.append(rows) or logits[rows], None)
    assert recomputed == 0 and not calls and classes.tolist() == [0, 0]
