"""diff of two audits: an audit against itself is the identity; against a changed model, maps move."""
import pyarrow.parquet as pq
import pytest
import torch
from audit_fixtures import MODEL_ARGS, N_IMAGES, run_audit, shared_audit
from conftest import DEMO_DATA

from saliency_audit.pipelines import cli
from saliency_audit.pipelines.reporting.diff import top_k_overlap


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_audit(tmp_path_factory)


def perturbed_weights(path):
    """The demo model with every weight jittered by 30% of its layer's spread: a "new version"."""
    state = torch.load(DEMO_DATA / "mnist_cnn.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
             for k, v in state.items()}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def changed_model_audit(shared, tmp_path_factory):
    root = tmp_path_factory.mktemp("changed")
    weights = perturbed_weights(root / "perturbed.pt")
    run_audit(shared.shard, root / "out", ("sal", "grad"), "--no-metrics",
              model_args=[MODEL_ARGS[0], MODEL_ARGS[1], "--weights", str(weights)])
    return root / "out"


def read(directory):
    return pq.read_table(directory / "diff").to_pylist()


def test_diff_with_itself_is_the_identity(shared, tmp_path):
    assert cli.main(["diff", str(shared.output), str(shared.output), "--output", str(tmp_path)]) == 0
    rows = read(tmp_path)
    assert len(rows) == N_IMAGES * len(shared.manifest["methods"])
    for r in rows:
        assert r["rank_correlation"] == pytest.approx(1.0) and r["top_k_overlap"] == 1.0
        assert r["ssim"] == pytest.approx(1.0) and r["top_k"] == round(0.1 * 28 * 28)
        assert not r["prediction_changed"] and r["score_change"] == 0.0
    assert "Explanations that moved most" in (tmp_path / "diff.html").read_text()


def test_diff_with_a_changed_model_shows_change(shared, changed_model_audit, tmp_path):
    assert cli.main(["diff", str(shared.output), str(changed_model_audit), "--output", str(tmp_path),
                     "--top-k", "50", "--show", "5"]) == 0
    rows = read(tmp_path)
    assert {r["method"] for r in rows} == {"sal", "grad"} and len(rows) == 2 * N_IMAGES  # only shared pairs
    assert all(r["top_k"] == 50 for r in rows)
    assert all(r["rank_correlation"] < 0.999 for r in rows)
    assert sum(r["top_k_overlap"] < 1 for r in rows) > len(rows) / 2
    assert sum(abs(r["score_change"]) > 1e-4 for r in rows) > len(rows) / 2
    page = (tmp_path / "diff.html").read_text()
    lowest = min(rows, key=lambda r: r["rank_correlation"])
    assert page.index(lowest["image_id"]) < page.index('<section id="methods"')   # the page leads with what moved most
    assert "20 pair(s) only in A" not in page and "80 pair(s) only in A" in page  # lime and edge: only in A


def test_top_k_overlap():
    a = torch.arange(16.0).view(1, 4, 4)
    assert top_k_overlap(a, a, 4).item() == 1.0
    assert top_k_overlap(a, -a, 4).item() == 0.0
    b = a.clone()
    b[0, 3, 3] = -1  # one of a's top 4 drops out of b's
    assert top_k_overlap(a, b, 4).item() == 0.75


def test_report_of_an_audit_without_metrics_or_sanity_check(changed_model_audit, tmp_path):
    """The report degrades to what the audit has: no metric columns, no sanity section."""
    assert cli.main(["report", str(changed_model_audit), "--output", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert ">Galleries by class</h2>" in text and ">Sanity check</h2>" not in text
    assert "No metrics in this audit" in text and "deletion AUC (random)" not in text
