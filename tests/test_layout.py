"""The layers of the house, as the code's own imports show them: explainers/ knows nothing of Beam or
the job; transforms/io and transforms/model (the Beam-free foundation) import no Beam; and the job
treats every method alike (no method's name decides anything in pipelines/ or transforms/)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from saliency_audit.explainers import list_methods

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("explainers"), ids=lambda p: str(p.relative_to(REPO)))
def test_explainers_know_nothing_of_beam_or_the_job(path):
    bad = {m for m in imports(path) if m.split(".")[0] == "apache_beam"
           or m.startswith(("saliency_audit.pipelines", "saliency_audit.transforms"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("transforms/io", "transforms/model"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_foundation_under_the_beam_steps_imports_no_beam(path):
    bad = {m for m in imports(path) if m.split(".")[0] == "apache_beam" or m.startswith("saliency_audit.pipelines")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", files("pipelines/job", "pipelines/checks", "pipelines/config", "transforms"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_method_name_decides_anything_in_the_job(path):
    """A method's needs (files, gradients, storage) are declared on its class; the job reads the
    declarations, never ``if name == "abele"``."""
    names = set(list_methods())
    compared = [node.lineno for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Compare)
                for side in [node.left, *node.comparators]
                if isinstance(side, ast.Constant) and side.value in names]
    assert not compared, f"{path.name} compares with a method's name at line(s) {compared}"
