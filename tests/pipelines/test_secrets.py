"""Credentials never reach what a run writes or prints. Beam options are recorded by an allow-list
(saliency_audit.pipelines.config.options.BEAM_RECORDED): Beam has options that hold credentials under names that look
like nothing secret (--azure_connection_string, --hdfs_user, --s3_endpoint_url with a key in it),
so every option that is not known to be safe is recorded as <redacted>."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest
from audit_fixtures import MODEL_ARGS, sample_shard

from saliency_audit.pipelines import cli
from saliency_audit.pipelines.config import spec
from saliency_audit.pipelines.config.options import (
    BEAM_LOCATIONS,
    BEAM_RECORDED,
    REDACTED,
    beam_option_parser,
    recorded_options,
    redact_argv,
)

SECRET = "S3CR3T-7f3a"  # in every value below: found anywhere, a credential leaked
# Beam's options that may hold a credential (or a name its owner may not want published), each with
# a value Beam accepts; a location that is on the allow-list still hides user:password@ and ?query.
SECRET_OPTIONS = {
    "azure_connection_string": f"DefaultEndpointsProtocol=https;AccountName=p;AccountKey={SECRET}==",
    "blob_service_endpoint": f"https://p.blob.core.windows.net/?sv=2024-01-01&sig={SECRET}",
    "azure_managed_identity_client_id": f"{SECRET}-client",
    "s3_access_key_id": f"AKIA{SECRET}", "s3_secret_access_key": SECRET, "s3_session_token": f"{SECRET}-session",
    "s3_endpoint_url": f"https://minio:{SECRET}@s3.example.com", "s3_region_name": f"{SECRET}-region",
    "s3_api_version": f"{SECRET}-api", "s3_verify": f"/etc/ssl/{SECRET}.pem",
    "aws_access_key_id": f"AKIA{SECRET}-aws", "aws_secret_access_key": f"{SECRET}-aws",
    "aws_session_token": f"{SECRET}-aws-session", "aws_credentials_secret_manager": f"{SECRET}-manager",
    "aws_endpoint_url": f"https://u:{SECRET}@aws.example.com", "aws_region_name": f"{SECRET}-aws-region",
    "aws_verify": f"/etc/ssl/{SECRET}-aws.pem",
    "service_account_email": f"{SECRET}@p.iam.gserviceaccount.com",
    "impersonate_service_account": f"{SECRET}-impersonated@p.iam.gserviceaccount.com",
    "dataflow_kms_key": f"projects/p/locations/l/keyRings/r/cryptoKeys/{SECRET}",
    "gcp_oauth_scopes": f"https://www.googleapis.com/auth/{SECRET}",
    "hdfs_host": f"{SECRET}.internal", "hdfs_port": f"{SECRET}-port", "hdfs_user": f"{SECRET}-user",
    "labels": f"owner={SECRET}", "experiments": f"token={SECRET}",
    "dataflow_service_options": f"secret={SECRET}", "user_agent": f"agent/{SECRET}",
    "gcs_custom_audit_entries": f'{{"user": "{SECRET}"}}',
    "transform_name_mapping": f'{{"old": "{SECRET}"}}', "beam_services": f'{{"svc": "{SECRET}"}}',
    "job_server_jvm_properties": f"-Dpassword={SECRET}", "dataflow_endpoint": f"https://u:{SECRET}@df.example.com",
    "profile_location": f"gs://u:{SECRET}@bucket/profiles", "dask_client_name": f"{SECRET}-client-name",
    # on the allow-list as locations: recorded, but not with credentials in them
    "temp_location": f"s3://AKIA:{SECRET}@bucket/tmp", "staging_location": f"gs://bucket/stage?token={SECRET}",
    "flink_master": f"http://admin:{SECRET}@flink:8081", "dask_client_address": f"tcp://u:{SECRET}@dask:8786",
}


def leaks(data: bytes) -> list[str]:
    """Where SECRET occurs in ``data``, with some context."""
    found, start = [], data.find(SECRET.encode())
    while start >= 0 and len(found) < 5:
        found.append(data[max(0, start - 60):start + 40].decode("utf-8", "replace"))
        start = data.find(SECRET.encode(), start + 1)
    return found


def files_with_secrets(root: Path) -> dict[str, list[str]]:
    """Every file under ``root`` (Parquet included, read as bytes) that holds SECRET."""
    return {str(p.relative_to(root)): leaks(p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file() and leaks(p.read_bytes())}


def audit_argv(shard: Path, output: Path) -> list[str]:
    return ["--input", str(shard), *MODEL_ARGS, "--methods", "grad", "--output", str(output), "--channels", "1",
            "--device", "cpu", "--metric-steps", "4", "--batch-size", "4", "--runner", "DirectRunner",
            "--job_name", "nightly-audit", "--direct_num_workers", "1"]


def spec_with_beam_table(folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "audit.toml"
    path.write_text("[beam]\n" + "".join(f"{name} = {json.dumps(value)}\n" for name, value in SECRET_OPTIONS.items()))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("given", ["flags", "spec"])
def test_no_credential_in_beam_options_reaches_any_output_log_or_report(given, tmp_path, capsys, caplog):
    """A run with every credential-carrying Beam option (as flags, or as a spec's [beam] table)
    writes none of them: not in any file of the output (manifests, Parquet), the HTML
    report, stdout, stderr or the log; the options on the allow-list stay readable."""
    caplog.set_level(logging.INFO)
    shard = sample_shard(tmp_path / "shards", 4)
    output = tmp_path / "out"
    if given == "flags":
        beam = [f"--{name}={value}" for name, value in SECRET_OPTIONS.items()]
    else:
        beam = ["--config", str(spec_with_beam_table(tmp_path / "spec"))]
    assert cli.main(["run", *audit_argv(shard, output), *beam]) == 0
    assert cli.main(["report", str(output), "--output", str(tmp_path / "report.html")]) == 0
    captured = capsys.readouterr()
    assert files_with_secrets(output) == {}
    assert leaks((tmp_path / "report.html").read_bytes()) == []
    assert leaks(captured.out.encode()) == [] and leaks(captured.err.encode()) == []
    assert leaks(caplog.text.encode()) == []
    manifest = json.loads((output / "manifest.json").read_text())
    recorded = manifest["spec"]["resolved"]["beam"]
    assert {k: recorded[k] for k in ("runner", "job_name", "direct_num_workers")} == \
        {"runner": "DirectRunner", "job_name": "nightly-audit", "direct_num_workers": "1"}
    assert recorded["azure_connection_string"] == recorded["temp_location"] == REDACTED
    assert "--job_name" in manifest["command"] and "nightly-audit" in manifest["command"]


def test_every_beam_option_off_the_allow_list_is_redacted_in_every_record():
    """Walks all of Beam's options: the value of each that is not on the allow-list is <redacted>
    in the command, the beam_args and the resolved spec, in both --flag VALUE and --flag=VALUE;
    a location on the allow-list is redacted when it carries user:password@ or a ?query."""
    parser = beam_option_parser()
    flags = [f for f, action in parser._option_string_actions.items() if f.startswith("--") and action.nargs != 0]
    assert len(flags) > 100  # the walk sees Beam's whole option list
    for flag in flags:
        names = {f[2:] for f in parser._option_string_actions[flag].option_strings}
        location = bool(names & BEAM_LOCATIONS)
        value = f"https://user:{SECRET}@host/path?sig={SECRET}" if location else SECRET
        for argv in ([flag, value], [f"{flag}={value}"]):
            recorded = " ".join(redact_argv(["--input", "x", *argv, "--save_main_session"]))
            table = json.dumps(spec._beam_table(argv))
            if names & BEAM_RECORDED:
                assert SECRET in recorded and SECRET in table, flag  # kept: known to be safe
            else:
                assert SECRET not in recorded and SECRET not in table, (flag, recorded, table)
                assert REDACTED in recorded and REDACTED in table, flag


def test_allow_listed_options_are_recorded_as_given():
    argv = ["--runner=DataflowRunner", "--project", "my-project", "--region=europe-west4", "--num_workers", "4",
            "--worker_machine_type=n1-standard-8", "--temp_location", "gs://bucket/tmp",
            "--job_endpoint=localhost:8099", "--sdk_container_image", "gcr.io/p/audit@sha256:abc", "--streaming"]
    assert redact_argv(argv) == argv
    assert spec._beam_table(argv) == {
        "runner": "DataflowRunner", "project": "my-project", "region": "europe-west4", "num_workers": "4",
        "worker_machine_type": "n1-standard-8", "temp_location": "gs://bucket/tmp", "job_endpoint": "localhost:8099",
        "sdk_container_image": "gcr.io/p/audit@sha256:abc", "streaming": True}


METHOD_OPTIONS = json.dumps({"abele": {"aae": f"s3://AKIA:{SECRET}@bucket/aae.pt", "neighbours": 50,
                                       "storage_options": {"endpoint_url": f"https://u:{SECRET}@s3"}},
                             "lime": {"n_samples": 100, "segmentation": "slic"}})


def test_method_options_keep_their_settings_and_hide_credentials(tmp_path):
    """Method options are the explainers' own parameters (numbers, names, abele's aae path): they
    are recorded, except abele's storage_options and any text carrying user:password@ or a query."""
    argv = ["--input", "x.tar", "--model", "m.pt", "--output", "out", "--methods", "abele,lime", "--aae", "a.pt",
            "--method-options", METHOD_OPTIONS]
    args, beam_args = spec.parse_invocation(argv)
    entry = spec.manifest_entry(args, beam_args)
    assert SECRET not in json.dumps(entry) and SECRET not in json.dumps(redact_argv(argv))
    recorded = {"abele": {"aae": REDACTED, "neighbours": 50, "storage_options": REDACTED},
                "lime": {"n_samples": 100, "segmentation": "slic"}}
    assert entry["resolved"]["explain"]["options"] == recorded_options(args)["method_options"] == recorded


LOCATION = f"s3://AKIA:{SECRET}@bucket/audit"


@pytest.mark.parametrize("argv", [
    ["run", "--input", f"{LOCATION}/*.tar", "--model", "m.pt", "--output", "out"],
    ["run", "--input", "x.tar", "--model", f"https://tok{SECRET}@host/m.pt", "--output", "out"],
    ["run", "--input", "x.tar", "--model", "m:f", "--weights", f"{LOCATION}/w.pt", "--output", "out"],
    ["run", "--input", "x.tar", "--model", "m.pt", "--output", LOCATION],
    ["run", "--input", "x.tar", "--model", "m.pt", "--output", "out", "--aae", f"{LOCATION}/a.pt"],
    ["run", "--input", "x.tar", "--model", "m.pt", "--output", "out", "--baseline", LOCATION],
    ["report", LOCATION, "--output", "r.html"], ["figure", LOCATION, "--ids", "a", "--output", "f.png"],
    ["diff", "a", LOCATION, "--output", "d"], ["check", LOCATION], ["history", LOCATION],
], ids=["input", "model", "weights", "output", "aae", "baseline", "report", "figure", "diff", "check", "history"])
def test_a_path_with_credentials_in_it_is_refused_unrecorded(argv, tmp_path, capsys, monkeypatch):
    """Our own paths reach the manifest, the verdict and the report as given: a URL carrying
    credentials (user:password@) is refused in one line that does not repeat it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) if argv[0] in ("report", "figure", "diff") else contextlib.nullcontext():
        code = cli.main(argv)
        assert code == 2
    captured = capsys.readouterr()
    assert "credentials" in captured.err and not leaks((captured.out + captured.err).encode())
    assert not files_with_secrets(tmp_path)


def test_a_spec_path_with_credentials_in_it_is_refused_unrecorded(tmp_path, capsys):
    spec_file = tmp_path / "audit.toml"
    spec_file.write_text(f'[input]\npath = "{LOCATION}/*.tar"\n[model]\npath = "m.pt"\n[output]\npath = "out"\n')
    assert cli.main(["run", "--config", str(spec_file)]) == 2
    captured = capsys.readouterr()
    assert "credentials" in captured.err and not leaks((captured.out + captured.err).encode())

