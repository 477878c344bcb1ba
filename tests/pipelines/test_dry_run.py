"""run --dry-run: the plan and an estimate, and nothing written."""
import re

from saliency_audit.pipelines import audit


def test_dry_run_prints_the_plan_and_writes_nothing(demo_shard, demo_model_args, tmp_path, capsys):
    code = audit.main(["--input", str(demo_shard), *demo_model_args, "--methods", "sal,intg", "--channels", "1",
                       "--limit-per-shard", "40", "--output", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    assert "1 shard(s), 40 record(s) (at most 40 per shard)" in out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\s+(sal|intg)\s+(\S+)\s+[\d.]+\s+\S+", out, re.M)}
    assert rows == {"sal": "1+1", "intg": "50+50"}
    # explain ms: preflight's warm explanation of the sample image, the figure the report holds the run to
    explain = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(sal|intg)\s.*\s([\d.]+)$", out, re.M)}
    assert 0 < explain["sal"] < explain["intg"]  # 1 gradient against 50
    assert re.search(r"estimated time: [\d.]+ (s|min|h) in one process", out) and "Nothing was run" in out
    # the metrics' forward passes per image on the sample's size: the curves of each map, the reference once
    assert re.search(r"^\s+deletion\s+34/map\+34$", out, re.M) and "forward passes on 28x28 inputs" in out
    assert "forward passes per image and target: methods 51, metrics 102, in all 153" in out


def test_dry_run_fails_like_a_run_on_a_bad_invocation(demo_shard, demo_model_args, tmp_path, capsys):
    code = audit.main(["--input", str(demo_shard), *demo_model_args, "--methods", "sal,nope", "--channels", "1",
                       "--output", str(tmp_path / "out"), "--dry-run"])
    assert code == 2 and "unknown method(s) nope" in capsys.readouterr().err
