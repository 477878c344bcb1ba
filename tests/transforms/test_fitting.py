"""Batches that fit (transforms.model.fitting): an out-of-memory error halves a method's batch and
retries it, never costing a record; --batch-size auto's probe; --compile's fallback to eager."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA

from saliency_audit.transforms.io.records import ERRORS, ImageBatch
from saliency_audit.transforms.model import compiled as compiled_module
from saliency_audit.transforms.model.fitting import (CPU_AUTO_BATCH, explain_fitting, is_out_of_memory,
                                                     largest_fitting)
from saliency_audit.transforms.model.handler import ADAPTED, COMPILE, BatchHandler, ExplainConfig, build_explainers
from saliency_audit.transforms.model.load import ModelSpec

SPEC = ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt"))
METHODS = {"sal": {}, "intg": {"n_steps": 4}}


def digits_batch(demo_images, n: int = 8, start: int = 0) -> ImageBatch:
    images, labels = demo_images
    ids = [f"d{i}" for i in range(start, start + n)]
    return ImageBatch(ids, ["s"] * n, labels[start:start + n].tolist(), [(28, 28)] * n,
                      images[start:start + n].numpy())


def outputs(handler: BatchHandler, batch: ImageBatch):
    out = list(handler.process(batch))
    rows = {(v["image_id"], v["method"]): v for tag, v in out if tag is None}
    return rows, [v for tag, v in out if tag == ERRORS], [v for tag, v in out if tag == ADAPTED]


def limited(explainer, most: int, calls: list):
    """``explainer.explain`` raising CUDA's out-of-memory error above ``most`` images, as a GPU does."""
    real = explainer.explain

    def explain(images, targets, seeds=None):
        calls.append(len(images))
        if len(images) > most:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(images)} images")
        return real(images, targets, seeds)
    return explain


def test_out_of_memory_halves_the_batch_and_loses_no_record(demo_images, one_torch_thread, monkeypatch):
    config = ExplainConfig(SPEC, METHODS, device="cpu")
    expected, errors, _ = outputs(BatchHandler(config, build_explainers(config)), digits_batch(demo_images))
    assert not errors and len(expected) == 16

    state = build_explainers(config)
    calls: list[int] = []
    monkeypatch.setattr(state.explainers["intg"], "explain", limited(state.explainers["intg"], 3, calls))
    handler = BatchHandler(config, state)
    rows, errors, adapted = outputs(handler, digits_batch(demo_images))
    assert not errors and rows.keys() == expected.keys()  # every record explained, by every method
    for key, row in rows.items():  # the same maps, whatever the chunks (up to batch rounding)
        np.testing.assert_allclose(row["saliency"], expected[key]["saliency"], rtol=1e-4, atol=1e-6)
        assert row["convergence_delta" if key[1] == "intg" else "method"] is not None
    # 8 -> out of memory -> halves of 4 -> out of memory -> quarters of 2, which fit; sal untouched
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) == 2
    assert adapted == [("intg", 2)] and state.batch_sizes == {"intg": 2}
    calls.clear()  # the next batch starts at the size that worked: no failed try on it
    rows, errors, adapted = outputs(handler, digits_batch(demo_images, 5, start=8))
    assert len(rows) == 10 and not errors and not adapted and calls == [2, 2, 1]


def test_an_image_that_does_not_fit_alone_costs_only_itself():
    def explain(lo, hi):  # position 2 never fits; the others do at any size
        if lo <= 2 < hi:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return f"{lo}:{hi}"

    fitted = explain_fitting(explain, 6, 6)
    assert [(j, result, k) for j, result, k, _ in fitted.outcomes] == [
        (0, "0:1", 0), (1, "1:2", 0), (3, "3:4", 0), (4, "4:5", 0), (5, "5:6", 0)]
    assert [j for j, _ in fitted.failures] == [2] and isinstance(fitted.failures[0][1], torch.OutOfMemoryError)
    assert fitted.size == 1


def test_a_handler_writes_an_error_row_for_an_image_that_never_fits(demo_images, one_torch_thread, monkeypatch):
    config = ExplainConfig(SPEC, {"sal": {}}, device="cpu")
    state = build_explainers(config)
    real = state.explainers["sal"].explain

    def explain(images, targets, seeds=None):
        if len(images) > 1 or bool((images == torch.from_numpy(demo_images[0][3].numpy())).all()):
            raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9GB")
        return real(images, targets, seeds)

    monkeypatch.setattr(state.explainers["sal"], "explain", explain)
    rows, errors, adapted = outputs(BatchHandler(config, state), digits_batch(demo_images, 6))
    assert sorted(image for image, _ in rows) == ["d0", "d1", "d2", "d4", "d5"]
    assert [(e.image_id, e.stage, e.method) for e in errors] == [("d3", "explain", "sal")]
    assert "not enough memory" in errors[0].reason and adapted == [("sal", 1)]


def test_out_of_memory_is_told_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error type


def test_auto_batch_doubles_while_the_peak_fits_the_budget():
    """The CUDA probe, with a memory gauge standing in for torch.cuda's: 100 bytes fixed and 30 per
    image, budget 600 -> 16 images (580) fit, 32 (1060) do not."""
    tried, last = [], [0]

    def run(n):
        tried.append(n)
        last[0] = 100 + 30 * n

    assert largest_fitting(run, "cpu", peak=lambda: last[0], budget=600) == 16
    assert tried == [1, 2, 4, 8, 16, 32]


def test_auto_batch_stops_at_out_of_memory_the_limit_and_slow_probes():
    def oom_above(most):
        def run(n):
            if n > most:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return run

    gauge = dict(peak=lambda: 0, budget=1)
    assert largest_fitting(oom_above(40), "cpu", **gauge) == 32
    assert largest_fitting(oom_above(0), "cpu", **gauge) == 1  # nothing fits: 1, each image its own error
    assert largest_fitting(oom_above(10**6), "cpu", limit=64, **gauge) == 64
    assert largest_fitting(oom_above(10**6), "cpu", seconds=-1, **gauge) == 1  # the first probe was already slow
    with pytest.raises(ValueError):  # an error that is not memory is the method's, not the probe's
        largest_fitting(lambda n: (_ for _ in ()).throw(ValueError("bad option")), "cpu", **gauge)


def test_auto_batch_on_a_cpu_is_the_fixed_choice_without_running_anything():
    assert largest_fitting(lambda n: pytest.fail("a CPU does not probe"), "cpu") == CPU_AUTO_BATCH
    assert largest_fitting(lambda n: None, "cpu", limit=8) == 8


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler here")


def test_compile_falls_back_to_eager_in_one_warning_line(demo_images, one_torch_thread, monkeypatch, caplog):
    monkeypatch.setattr(compiled_module, "BACKEND", failing_backend)
    config = ExplainConfig(SPEC, {"sal": {}, "gradcam": {}}, device="cpu")
    expected, _, _ = outputs(BatchHandler(config, build_explainers(config)), digits_batch(demo_images, 4))
    compiled = ExplainConfig(SPEC, {"sal": {}, "gradcam": {}}, device="cpu", compile=True)
    state = build_explainers(compiled)
    assert state.explainers["sal"].model is state.compiled and state.explainers["gradcam"].model is state.model
    with caplog.at_level(logging.WARNING, logger="saliency_audit"):
        rows, errors, adapted = outputs(BatchHandler(compiled, state), digits_batch(demo_images, 4))
    assert not errors and rows.keys() == expected.keys()
    for key, row in rows.items():
        np.testing.assert_array_equal(row["saliency"], expected[key]["saliency"])
    warnings = [r.getMessage() for r in caplog.records if "--compile" in r.getMessage()]
    assert len(warnings) == 1 and "running the model eagerly" in warnings[0] and "\n" not in warnings[0]
    assert [key for key, _ in adapted] == [COMPILE] and "no C++ compiler here" in adapted[0][1]
    assert not state.compiled.active


def test_an_input_the_model_refuses_is_not_a_compile_failure(monkeypatch):
    from saliency_audit.transforms.model.compiled import CompiledModel, compile_failure
    model = torch.nn.Linear(4, 2)
    twin = CompiledModel(model)
    monkeypatch.setattr(twin, "compiled", model)  # (no compilation: the error must come from the input)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        twin(torch.zeros(3, 5))
    assert twin.active and not compile_failure(RuntimeError("shapes cannot be multiplied"))
    assert isinstance(twin(torch.zeros(3, 4)), torch.Tensor)
