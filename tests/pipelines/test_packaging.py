"""The wheel installs one import name, saliency_audit: the repository's explainers/, transforms/ and
pipelines/ land under it, and nothing else at the top level of site-packages (where a user's own
``pipelines`` or ``transforms`` would clash with ours on a shared worker)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the wheel

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("explainers", "transforms", "pipelines")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
                   check=True, capture_output=True)
    (built,) = out.glob("saliency_audit-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_only_saliency_audit(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"saliency_audit"}


def test_every_package_of_the_repository_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for folder in FOLDERS:
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.relative_to(REPO).as_posix()
            assert f"saliency_audit/{relative}" in names, f"{relative} is not packaged"
    assert "saliency_audit/__main__.py" in names
    assert "saliency_audit/pipelines/demo_data/mnist_cnn.pt" in names  # the demo's model and sample travel too


def test_python_dash_m_saliency_audit_is_the_command():
    done = subprocess.run([sys.executable, "-m", "saliency_audit", "--help"], capture_output=True, text=True,
                          cwd=REPO.parent, check=True)
    assert "commands:" in done.stdout and "run" in done.stdout
