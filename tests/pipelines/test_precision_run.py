"""A run at --precision bf16 with --batch-size auto, end to end: what the manifest records per method
(precision, batch, compile) and that the stored maps are float32, near fp32's for the autocast
methods and equal to them for the relevance methods, which run fp32."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from audit_fixtures import MODEL_ARGS, sample_shard
from conftest import read_output

from saliency_audit.explainers import get_explainer
from saliency_audit.explainers.metrics.sanity import spearman_rank_correlation
from saliency_audit.pipelines import audit
from saliency_audit.pipelines.config.options import UsageError
from saliency_audit.transforms.model.fitting import CPU_AUTO_BATCH

METHODS = ("sal", "gradcampp", "deeplift")


@pytest.mark.slow  # an audit end to end
def test_a_bf16_run_with_auto_batches_records_them_and_stores_float32_maps(tmp_path, demo_model, demo_images,
                                                                          one_torch_thread, caplog):
    shard = sample_shard(tmp_path / "in", n_images=6)
    with caplog.at_level(logging.WARNING, logger="saliency_audit"):
        manifest = audit.run(["--input", str(shard), *MODEL_ARGS, "--methods", ",".join(METHODS), "--channels", "1",
                              "--device", "cpu", "--output", str(tmp_path / "out"), "--precision", "bf16",
                              "--batch-size", "auto", "--torch-threads", "1"])
    # one line names the methods not measured to keep float32's ranking at bf16: not gradcampp, nor deeplift (fp32)
    (warning,) = [r.getMessage() for r in caplog.records if "--precision" in r.getMessage()]
    assert "the maps of sal are not known" in warning
    execution = manifest["execution"]
    assert execution["precision_requested"] == execution["precision"] == "bf16" and not execution["compile"]
    assert execution["batch_size_requested"] == "auto" and execution["batch_size"] == CPU_AUTO_BATCH
    assert execution["batch_sizes_after_out_of_memory"] == {} and execution["compile_failed"] is None
    methods = manifest["methods"]
    assert {m: methods[m]["precision"] for m in METHODS} == {"sal": "bf16", "gradcampp": "bf16", "deeplift": "fp32"}
    assert {methods[m]["batch_size"] for m in METHODS} == {CPU_AUTO_BATCH}
    assert not any(methods[m]["compiled"] for m in METHODS)
    assert all(c == {"read": 7, "explained": 6, "errors": 1} for c in manifest["counts"].values())

    rows = {(r["image_id"], r["method"]): r for r in read_output(tmp_path / "out" / "saliency")}
    images, _ = demo_images
    ids = sorted({image for image, _ in rows})
    order = [int(image.split("-")[-1]) for image in ids]  # the sample's ids end in their index
    x = images[order]
    targets = torch.tensor([rows[(image, "sal")]["target"] for image in ids])
    for method in METHODS:
        stored = torch.from_numpy(np.stack([np.asarray(rows[(image, method)]["saliency"], np.float32)
                                            for image in ids])).reshape(len(ids), 28, 28)
        full = get_explainer(method, demo_model).explain(x, targets).maps
        if method == "deeplift":
            torch.testing.assert_close(stored, full, rtol=1e-4, atol=1e-6)
        else:  # under autocast: near float32's, not equal
            assert not torch.allclose(stored, full, rtol=1e-4, atol=1e-6)
            assert spearman_rank_correlation(full, stored).min() > 0.9, method


def test_bf16_with_an_onnx_model_is_refused_in_one_line(tmp_path):
    shard = sample_shard(tmp_path / "in", n_images=1)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not a graph")
    with pytest.raises(UsageError, match="autocast"):
        audit.run(["--input", str(shard), "--model", str(model), "--methods", "occlusion", "--channels", "1",
                   "--output", str(tmp_path / "out"), "--precision", "bf16", "--device", "cpu"])
