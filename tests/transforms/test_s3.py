"""Reading shards from and writing results to a real S3-compatible HTTP server (moto)."""
import json
import tarfile

import pytest
from conftest import DEMO_DATA, add_member, moto_s3

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

from saliency_audit.pipelines import audit  # noqa: E402


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    with moto_s3(monkeypatch_module, "audit-bucket") as server:
        yield server


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_s3_round_trip(s3, demo_shard, demo_model_args, tmp_path):
    fs, endpoint = s3
    with tarfile.open(demo_shard) as src, tarfile.open(tmp_path / "s.tar", "w") as dst:
        for member in src.getmembers()[:20]:
            add_member(dst, member.name, src.extractfile(member).read())
    fs.put(str(tmp_path / "s.tar"), "audit-bucket/shards/s-0.tar")
    fs.put(str(tmp_path / "s.tar"), "audit-bucket/shards/s-1.tar")
    fs.pipe("audit-bucket/shards/broken.tar", b"not a tar" * 100)
    options = json.dumps({"endpoint_url": endpoint})
    manifest = audit.run(["--input", "s3://audit-bucket/shards/*.tar", *demo_model_args, "--methods", "sal,grad",
                          "--output", "s3://audit-bucket/results", "--channels", "1",
                          "--storage-options", options])
    # 10 images per shard, twice (same ids in two shards: explained once, from the first shard; the
    # copies are errors), plus one unreadable shard
    assert manifest["counts"]["sal"] == {"read": 21, "explained": 10, "errors": 11}
    assert fs.exists("audit-bucket/results/manifest.json")
    import pyarrow.parquet as pq
    files = fs.glob("audit-bucket/results/saliency/run=*/*.parquet")
    assert [f"audit-bucket/results/{f}" for f in manifest["files"]["saliency"]] == files
    rows = [r for f in files for r in pq.read_table(fs.open(f, "rb")).to_pylist()]
    assert len(rows) == 20 and {r["source"] for r in rows} == {"s3://audit-bucket/shards/s-0.tar"}
    errors = [r for f in fs.glob("audit-bucket/results/errors/run=*/*.parquet")
              for r in pq.read_table(fs.open(f, "rb")).to_pylist()]
    assert sorted(e["source"] for e in errors) == ["s3://audit-bucket/shards/broken.tar"] + [
        "s3://audit-bucket/shards/s-1.tar"] * 10
    assert all("duplicate image id: already read from s3://audit-bucket/shards/s-0.tar" in e["reason"]
               for e in errors if e["source"].endswith("s-1.tar"))

    # the report and the figure read the audit, and the images from the shards, back from S3
    from saliency_audit.pipelines import cli
    assert cli.main(["report", "s3://audit-bucket/results", "--output", "s3://audit-bucket/results/report.html",
                     "--storage-options", options]) == 0
    page = fs.cat("audit-bucket/results/report.html").decode()
    assert page.count("data:image/png;base64,") > 20 and "broken.tar" in page and "image not readable" not in page
    assert cli.main(["figure", "s3://audit-bucket/results", "--ids", rows[0]["image_id"], "--output",
                     str(tmp_path / "fig.png"), "--storage-options", options]) == 0
    from PIL import Image

    from saliency_audit.pipelines.reporting.figure import figure_size
    assert Image.open(tmp_path / "fig.png").size == figure_size(1, 2, 112)


@pytest.mark.slow
def test_abele_reads_its_aae_from_s3_with_the_run_s_storage_options(s3, demo_shard, demo_model_args, tmp_path):
    fs, endpoint = s3
    with tarfile.open(demo_shard) as src, tarfile.open(tmp_path / "few.tar", "w") as dst:
        for member in src.getmembers()[:4]:  # 2 digits
            add_member(dst, member.name, src.extractfile(member).read())
    fs.put(str(tmp_path / "few.tar"), "audit-bucket/few/few-0.tar")
    fs.put(str(DEMO_DATA / "mnist_aae.pt"), "audit-bucket/models/aae.pt")
    secret = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    manifest = audit.run(["--input", "s3://audit-bucket/few/*.tar", *demo_model_args, "--methods", "abele",
                          "--aae", "s3://audit-bucket/models/aae.pt", "--output", str(tmp_path / "out"),
                          "--channels", "1", "--storage-options", json.dumps(secret), "--method-options",
                          '{"abele": {"neighbours": 60, "generations": 2, "exemplars": 5}}'])
    assert manifest["counts"]["abele"] == {"read": 2, "explained": 2, "errors": 0}
    assert manifest["methods"]["abele"]["options"]["aae"] == "s3://audit-bucket/models/aae.pt"
    recorded = json.dumps(manifest)
    assert endpoint not in recorded and '"secret"' not in recorded  # credentials never reach the manifest
    assert manifest["command"][manifest["command"].index("--storage-options") + 1] == "<redacted>"


def test_environment_endpoint_works_too(s3, demo_model_args, monkeypatch, tmp_path):
    fs, endpoint = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(audit.UsageError, match="no input files match s3://audit-bucket/nothing/"):
        audit.run(["--input", "s3://audit-bucket/nothing/*.tar", *demo_model_args, "--output", str(tmp_path)])


def test_unreachable_storage_fails_fast(demo_model_args, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    options = json.dumps({"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(audit.UsageError, match="cannot list s3://bucket/x/\\*.tar"):
        audit.run(["--input", "s3://bucket/x/*.tar", *demo_model_args, "--output", str(tmp_path),
                   "--storage-options", options])


UNREACHABLE = json.dumps({"endpoint_url": "http://127.0.0.1:1",
                          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})


@pytest.mark.parametrize("command", [
    ["report", "s3://bucket/audit", "--output", "OUT/r.html"],
    ["figure", "s3://bucket/audit", "--ids", "a", "--output", "OUT/f.png"],
    ["diff", "s3://bucket/audit", "s3://bucket/other", "--output", "OUT/diff"],
    ["check", "s3://bucket/audit"],
    ["history", "s3://bucket/audit"],
])
def test_commands_on_an_unreachable_store_fail_in_one_line(command, tmp_path, monkeypatch, capsys):
    import logging

    from saliency_audit.pipelines import cli
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    # logging as in a fresh process: an earlier audit.main in this one configured it on a stream now closed
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    argv = [a.replace("OUT", str(tmp_path)) for a in command] + ["--storage-options", UNREACHABLE]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"saliency-audit {command[0]}: error: cannot read s3://bucket/"), err
