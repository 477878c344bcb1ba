"""What the metrics cost: every registered metric's declared passes (Metric.passes) against the
forward passes it makes, and deletion and insertion of several methods' maps in shared forward
chunks (the same values as one method at a time, in fewer model calls)."""
from __future__ import annotations

import pytest
import torch

from saliency_audit.explainers.metrics import (MetricBatch, causal_curves, deletion_curve, insertion_curve,
                                               metric_class, metric_classes, metric_costs, metric_forward_passes,
                                               metric_options)
from saliency_audit.explainers.metrics.registry import Metric, register_metric

C, H, W, N = 1, 12, 12, 3
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only waits


class Counted(torch.nn.Module):
    """A small CNN that counts its calls and the images they carried."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(C, 4, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 5))
        self.calls = self.images = 0

    def forward(self, x):
        self.calls, self.images = self.calls + 1, self.images + len(x)
        return 4 * self.body(x)

    def counted(self, fn):
        self.calls = self.images = 0
        out = fn()
        return out, self.calls, self.images


def settings(**changes):
    """Every metric on, at its defaults."""
    return {**{o.name: o.default for o in metric_options()}, "road": True, "abele_metrics": True, **changes}


def a_batch(model, explained: list) -> MetricBatch:
    torch.manual_seed(1)
    images = torch.rand(N, C, H, W)
    with torch.no_grad():
        predicted = model.body(images).argmax(dim=1)

    def explain(x, t, s):  # the method run again (ABELE's stability): counted apart from the model's passes
        explained.append(len(x))
        return x.sum(dim=1)
    return MetricBatch(model=model, images=images, targets=predicted, seeds=torch.arange(N), predicted=predicted,
                       masks=torch.rand(N, H, W) > 0.5, has_mask=torch.ones(N, dtype=torch.bool), explain=explain,
                       chunk=N)


@pytest.mark.parametrize("cls", metric_classes(), ids=lambda cls: cls.name)
def test_every_metric_makes_the_forward_passes_it_declares(cls):
    model, explained = Counted(), []
    metric, batch = cls(settings()), a_batch(model, explained)
    reference, _, per_image = model.counted(lambda: metric.reference(batch))
    maps = torch.rand(N, H, W)
    _, _, per_map = model.counted(lambda: metric.score(batch, maps, reference))
    declared = metric.passes(H, W)
    assert set(declared) == {"per_map", "per_image", "explanations"}
    assert (per_image, per_map) == (N * declared["per_image"], N * declared["per_map"])
    assert sum(explained) <= N * declared["explanations"]  # an upper bound: copies that flip are not explained
    assert metric_costs(settings(), H, W)[cls.name] == declared


def test_the_costs_follow_the_options_and_add_up_beside_the_methods():
    assert metric_class("deletion")(settings(metric_steps=7)).passes(H, W) == {"per_map": 16, "per_image": 16,
                                                                                "explanations": 0}
    assert metric_class("abele")(settings(abele_neighbours=5)).passes(H, W)["explanations"] == 5
    costs = metric_costs(settings(road=False, abele_metrics=False), 28, 28)
    assert set(costs) == {"deletion", "localisation"}
    # two methods of 1 and 50 forward passes: the reference once, each map's curves once per method
    assert metric_forward_passes(costs, [1, 50]) == 34 + 2 * 34
    abele = {"abele": {"per_map": 87, "per_image": 0, "explanations": 20}}
    assert metric_forward_passes(abele, [1, 50]) == 2 * 87 + 20 * (1 + 50)  # its copies explained again


def test_a_metric_that_declares_no_cost_is_refused():
    class Silent(Metric):
        name = "silent"
        columns = {"silent": "float32"}

        def score(self, batch, maps, reference):
            return {"silent": maps.mean(dim=(1, 2))}

    with pytest.raises(TypeError, match="declares no cost"):
        register_metric(Silent)


def test_shared_curves_equal_one_method_at_a_time_in_fewer_calls():
    model, explained = Counted(), []
    batch = a_batch(model, explained)
    torch.manual_seed(2)
    methods = [torch.rand(N, H, W), torch.randn(N, H, W), (torch.rand(N, H, W) > 0.5).float()]  # ties too
    kwargs = {"steps": 8, "substrate": "blur", "max_forward_batch": 16}
    alone, alone_calls, alone_images = model.counted(lambda: [
        {"deletion": deletion_curve(model, batch.images, maps, batch.targets, seeds=batch.seeds, **kwargs),
         "insertion": insertion_curve(model, batch.images, maps, batch.targets, seeds=batch.seeds, **kwargs)}
        for maps in methods])
    shared, shared_calls, shared_images = model.counted(lambda: causal_curves(
        model, [(batch.images, maps, batch.targets, batch.seeds) for maps in methods], **kwargs))
    for one, other in zip(alone, shared):
        for mode in ("deletion", "insertion"):
            torch.testing.assert_close(other[mode], one[mode], rtol=0, atol=1e-6)
    # 3 methods x 2 modes x 3 images x 9 points = 162 inputs: 11 chunks of 16, not 6 x 2 (27 = 16 + 11)
    assert shared_images == alone_images == 162
    assert (shared_calls, alone_calls) == (11, 12)


def test_the_deletion_metric_scores_every_method_at_once_as_one_at_a_time():
    model, explained = Counted(), []
    metric, batch = metric_class("deletion")(settings(metric_steps=4)), a_batch(model, explained)
    reference = metric.reference(batch)
    items = [(batch, torch.rand(N, H, W), reference) for _ in range(4)]
    alone, alone_calls, _ = model.counted(lambda: [metric.score(*item) for item in items])
    together, together_calls, _ = model.counted(lambda: metric.score_all(items))
    for one, other in zip(alone, together):
        assert one.keys() == other.keys()
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=0, atol=1e-6)
    assert together_calls == 1 < alone_calls == 4  # 4 x 2 x 3 x 5 = 120 inputs: one chunk of 256


@pytest.mark.parametrize("size", [28, 224])
def test_the_job_takes_16_steps_at_every_size_for_34_forward_passes_per_map(size):
    """The rule docs/performance.md measured at 224 px, and the 28 px digits' default (golden outputs)."""
    metric = metric_class("deletion")(settings())
    assert metric.settings["metric_steps"] == 16 and metric.check(size, size) is None
    assert metric.passes(size, size) == {"per_map": 34, "per_image": 34, "explanations": 0}


def test_a_coarse_curve_is_the_fine_curves_subset():
    """What benchmarks/metric_steps.py reads its coarse AUCs from: step k of s changes the pixels
    of step k*R/s of R (s divides R), so one fine curve per map gives every coarse one."""
    model, explained = Counted(), []
    batch = a_batch(model, explained)
    maps = torch.randn(N, H, W)
    fine, coarse = (deletion_curve(model, batch.images, maps, batch.targets, seeds=batch.seeds, steps=steps)
                    for steps in (72, 8))  # 144 pixels: 2 a step, and 18
    torch.testing.assert_close(coarse, fine[:, ::72 // 8], rtol=0, atol=1e-6)
