"""Names that acceptance checks and scheduled jobs look for (../shared/docs/contract.md, "Being added
in round three"): the three transformer methods by a word of their registry names, and the
accelerator benchmark by a script whose name says gpu."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from saliency_audit.explainers import explainer_class, list_methods
from saliency_audit.pipelines.checks import gates

REPO = Path(__file__).resolve().parents[1]


def test_each_transformer_method_has_its_word_in_its_registry_name():
    names = list_methods()
    for word in ("rollout", "attention", "attnlrp"):
        found = [n for n in names if word in n]
        assert found, f"no registry name contains {word!r}: {names}"
        assert all(explainer_class(n).needs_attention or n == "attnlrp" for n in found), found


def test_the_accelerator_benchmark_is_one_script_named_for_the_gpu():
    scripts = [p.name for p in (REPO / "benchmarks").glob("*.py") if "gpu" in p.name]
    assert scripts == ["gpu_benchmark.py"]
    assert "--reduced" in (REPO / "benchmarks" / "gpu_benchmark.py").read_text()  # the CPU mode CI runs


# --- the contract's "Python API" and launcher forms, in a source checkout ------------------------------
# The repository keeps its top-level folders (round three), so from its root the contract's import
# form and `python -m pipelines.audit` still work; they must reach the one registry, not a copy.

API_SNIPPET = """
import torch
from explainers import get_explainer, list_methods
from saliency_audit.pipelines.training.reference_model import MnistCNN
model = MnistCNN().eval()
explainer = get_explainer("intg", model, n_steps=50)
result = explainer.explain(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
assert tuple(result.maps.shape) == (2, 28, 28) and result.maps.dtype == torch.float32, result.maps.shape
assert {"sal", "grad", "intg"} <= set(list_methods()), list_methods()
try:
    get_explainer("nope", model)
except ValueError as e:
    assert "intg" in str(e), e  # names the known methods
else:
    raise AssertionError("no ValueError for an unknown method")
"""


def _in_checkout(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_python_api_snippet_runs_from_the_repository_root():
    done = _in_checkout("-c", API_SNIPPET)
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_dash_m_pipelines_audit_is_the_run_command_from_the_repository_root():
    done = _in_checkout("-m", "pipelines.audit", "--help")
    assert done.returncode == 0 and "saliency-audit run" in done.stdout, done.stderr[-2000:]


def test_each_gate_in_the_verdict_says_whether_it_passed():
    """contract.md: verdict.json, each gate: name, value, threshold, passed, worst images."""
    def gate(status):
        return gates.Result("accuracy_drop", None, 0.2, 0.5, status, ["a", "b"]).as_dict()
    for status, passed in ((gates.PASS, True), (gates.FAIL, False), (gates.SKIPPED, None)):
        g = gate(status)
        assert {"name", "value", "threshold", "passed", "worst_images"} <= set(g), sorted(g)
        assert g["passed"] is passed and g["worst_images"] == ["a", "b"]
