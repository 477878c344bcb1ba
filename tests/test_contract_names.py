"""Names that acceptance checks and scheduled jobs look for (../shared/docs/contract.md, "Being added
in round three"): the three transformer methods by a word of their registry names, and the
accelerator benchmark by a script whose name says gpu."""
from __future__ import annotations

from pathlib import Path

from saliency_audit.explainers import explainer_class, list_methods

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
