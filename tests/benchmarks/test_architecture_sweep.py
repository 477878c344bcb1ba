"""Smoke test of benchmarks/architecture_sweep.py on one tiny architecture per loader (a Hugging
Face DINOv2 through hf:, a timm ResNet-18 through timm: --weights) and two methods: the rows it
writes say how each method ended and where it looked."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")


def test_sweep_writes_each_methods_outcome_and_layer(tmp_path, one_torch_thread):
    import architecture_sweep
    out, md = tmp_path / "sweep.json", tmp_path / "sweep.md"
    architecture_sweep.main(["--source", "hf,timm", "--archs", "dinov2,resnet18", "--methods", "gradcam,rollout",
                             "--json", str(out), "--md", str(md)])
    results = {r["arch"]: r for r in json.loads(out.read_text())}
    assert results.keys() == {"dinov2", "resnet18"}
    assert all(r["load"] == "ok" and r["logit_spread"] > 0 for r in results.values())
    rows = {(arch, row["method"]): row for arch, r in results.items() for row in r["rows"]}
    # the ViT's CAM reads the final norm's patch tokens as a grid; rollout, the rows its head reads
    assert rows["dinov2", "gradcam"]["status"] == "ok"
    assert rows["dinov2", "gradcam"]["layer_reshape"].startswith("tokens[1:] ->")
    assert rows["dinov2", "rollout"]["status"] == "ok"
    assert rows["dinov2", "rollout"]["row"] == "class token (first) and mean of the patch tokens, averaged"
    assert rows["resnet18", "gradcam"]["status"] == "ok" and rows["resnet18", "gradcam"]["layer_used"]
    refusal = rows["resnet18", "rollout"]
    assert refusal["status"] == "refused" and "no attention layers" in refusal["detail"]
    # the Markdown: a summary row per architecture, and the refusal under its method
    text = md.read_text()
    assert "| hf | dinov2 | 32 | 2 | 0 | 0 |" in text and "| timm | resnet18 | 64 | 1 | 1 | 0 |" in text
    assert "| rollout | timm:resnet18 |" in text
