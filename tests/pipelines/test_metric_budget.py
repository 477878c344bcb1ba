"""The metrics within a budget in the job: the explain step scores every method of a batch in shared
forward chunks (the values of one method at a time, fewer model calls), and the manifest and the
report's run section state what the metrics cost."""
from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA

from saliency_audit.explainers.metrics.causal import DeletionInsertion
from saliency_audit.pipelines import audit
from saliency_audit.pipelines.reporting.report import write_report
from saliency_audit.transforms.io.records import ImageBatch
from saliency_audit.transforms.model.handler import ALL, MODEL_CALLS, BatchHandler, ExplainConfig, build_explainers
from saliency_audit.transforms.model.load import ModelSpec

SPEC = ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(DEMO_DATA / "mnist_cnn.pt"))
COLUMNS = ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "gini")


def explain(config: ExplainConfig, batch: ImageBatch):
    out = list(BatchHandler(config, build_explainers(config)).process(batch))
    rows = {(v["image_id"], v["method"]): v for tag, v in out if tag is None}
    [(_, calls, images)] = [v for tag, v in out if tag == MODEL_CALLS and v[0] == ALL]
    return rows, calls, images


def test_the_explain_step_scores_every_method_in_shared_forward_chunks(demo_images, one_torch_thread, monkeypatch):
    images, labels = demo_images
    batch = ImageBatch([f"d{i}" for i in range(8)], ["s"] * 8, labels[:8].tolist(), [(28, 28)] * 8, images[:8].numpy())
    config = ExplainConfig(SPEC, {"sal": {}, "grad": {}, "random": {}}, device="cpu")
    shared, shared_calls, shared_images = explain(config, batch)
    together = DeletionInsertion.score_all
    monkeypatch.setattr(DeletionInsertion, "score_all",  # one method at a time, as before the sharing
                        lambda self, items: [together(self, [item])[0] for item in items])
    alone, alone_calls, alone_images = explain(config, batch)
    assert shared.keys() == alone.keys() and len(shared) == 24
    for key, row in shared.items():
        for column in COLUMNS:
            assert row[column] == pytest.approx(alone[key][column], rel=1e-5, abs=1e-6), (key, column)
    # the same inputs; 3 methods x 2 curves x 8 images x 17 points = 816: 4 chunks of 256, not 6 of 136
    assert shared_images == alone_images
    assert alone_calls - shared_calls == 2


@pytest.mark.slow  # a whole audit
def test_the_manifest_and_the_report_state_the_metrics_cost(demo_shard, demo_model_args, tmp_path, one_torch_thread):
    output = tmp_path / "out"
    audit.main(["--input", str(demo_shard), *demo_model_args, "--methods", "sal,random", "--channels", "1",
                "--limit-per-shard", "4", "--metric-steps", "9", "--output", str(output)])
    manifest = json.loads((output / "manifest.json").read_text())
    entry = manifest["metric_passes"]
    assert entry["image_size"] == [28, 28]
    assert entry["passes"]["deletion"] == {"per_map": 20, "per_image": 20, "explanations": 0}  # 2 x (9 + 1)
    assert (entry["forward_passes"], entry["methods_forward_passes"]) == (20 + 2 * 20, 1)
    # what the model was asked in all, per image: its prediction, sal's pass and the metrics' curves
    assert manifest["model_calls"]["all"]["images_per_image"] == 1 + 1 + entry["forward_passes"]
    page = (tmp_path / "report.html")
    write_report(str(output), str(page))
    assert ("deletion 20 per map + 20 per image (forward passes on 28x28 inputs); in all 60 per image and target "
            "(the methods themselves: 1)") in page.read_text()
