"""The comparison figure: one row per image, one column per method, the image first."""
import subprocess
import sys

import numpy as np
import pytest
from audit_fixtures import shared_audit
from PIL import Image

from saliency_audit.pipelines import cli
from saliency_audit.pipelines.reporting.audit_dir import AuditDir
from saliency_audit.pipelines.reporting.figure import HEADER_HEIGHT, LABEL_WIDTH, comparison_figure, figure_size


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    return AuditDir(shared_audit(tmp_path_factory).output)


def test_size_is_rows_by_columns(audit, tmp_path):
    ids = ["mnist-test-000007", "mnist-test-000003", "mnist-test-000012"]
    assert cli.main(["figure", audit.path, "--ids", ",".join(ids), "--methods", "lime,sal",
                     "--output", str(tmp_path / "fig.png"), "--cell", "90"]) == 0
    image = Image.open(tmp_path / "fig.png")
    assert image.size == figure_size(3, 2, 90) == (LABEL_WIDTH + 3 * 90, HEADER_HEIGHT + 3 * 90)
    pixels = np.asarray(image.convert("RGB"))
    first_image = pixels[HEADER_HEIGHT:HEADER_HEIGHT + 90, LABEL_WIDTH:LABEL_WIDTH + 90]
    assert first_image.max() == 255 and (first_image < 30).mean() > 0.3  # a white digit on black


def test_default_columns_are_the_runs_methods_in_order(audit):
    assert audit.methods == ["sal", "grad", "lime", "edge"]
    image = comparison_figure(audit, ["mnist-test-000001"], cell=64, overlay=True)
    assert image.size == figure_size(1, 4, 64)


@pytest.mark.slow
def test_unknown_ids_and_methods_fail_with_one_line(audit, tmp_path):
    with pytest.raises(ValueError, match="image id\\(s\\) nope not in"):
        comparison_figure(audit, ["mnist-test-000001", "nope"])
    proc = subprocess.run([sys.executable, "-m", "saliency_audit.pipelines.cli", "figure", audit.path, "--ids", "mnist-test-000001",
                           "--methods", "sal,intg", "--output", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "method(s) intg not in this audit" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.png").exists()
