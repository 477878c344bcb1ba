"""Smoke tests of benchmarks/precision_agreement.py and benchmarks/compile_speed.py in their reduced
modes (the tests' 32 px models): the scripts keep running and report what docs/performance.md
quotes. Their full figures are not measured here."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_precision_agreement_reports_each_methods_agreement(tmp_path, one_torch_thread, capsys):
    import precision_agreement
    figures = precision_agreement.main(["--tiny", "--models", "resnet50", "--methods", "sal,intg", "--images", "2",
                                        "--steps", "4", "--json", str(tmp_path / "f.json")])
    sal, intg = figures["models"]["resnet50"]
    assert (sal["method"], intg["method"]) == ("sal", "intg") and figures["size"] == 32
    assert 0.9 < sal["rank_mean"] <= 1 and 0.9 < intg["rank_min"] <= 1  # bf16 moves the maps a little
    assert 0 <= intg["gap_fp32"] < intg["gap_low"] < 0.1 and "gap_fp32" not in sal  # completeness, intg only
    assert json.loads((tmp_path / "f.json").read_text())["precision"] == "bf16"
    assert "| intg |" in capsys.readouterr().out


def test_precision_agreement_refuses_an_unmeasured_method():
    import precision_agreement
    with pytest.raises(SystemExit):
        precision_agreement.parse_args(["--methods", "scorecam"])


@pytest.mark.slow  # dynamo traces the model (compiling is skipped: the eager backend)
def test_compile_speed_times_eager_and_compiled(one_torch_thread):
    import compile_speed
    figures = compile_speed.main(["--models", "tiny_resnet50", "--methods", "sal", "--images", "1", "--repeats", "1",
                                  "--backend", "eager"])
    (sal,) = figures["models"]["tiny_resnet50"]
    assert sal["maps_close"] and sal["rank_min"] > 0.999 and sal["fell_back"] is None
    assert sal["eager_s_per_image"] > 0 and sal["compiled_s_per_image"] > 0 and sal["first_compiled_call_s"] > 0
