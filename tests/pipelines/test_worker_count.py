"""Smoke test of benchmarks/worker_count.py at a minimal size: the script runs the real pipeline
with 2 SDK worker processes, the counts reconcile, and each worker gets its share of the cores."""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two SDK worker processes

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_two_workers_share_the_cores(tmp_path, capsys):
    import worker_count

    rows = worker_count.main(["--images", "6", "--shards", "2", "--methods", "sal", "--configs", "2",
                              "--scratch", str(tmp_path)])
    [(config, result)] = rows
    assert config.workers == 2 and result["counts"]["sal"]["explained"] == 6  # main checks read == 6 too
    # the digits are small images: auto is one torch thread per worker (transforms.model.threads)
    assert result["threads"] == {"requested": "auto", "worker_processes": 2, "small_images": True, "per_process": 1}
    assert result["cpu_s"] > 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("| 2 workers | 2 | ") and len(table[-1].split("|")) == 9
