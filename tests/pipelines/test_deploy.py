"""Launcher and workers apart (preflight on the launcher's CPU, the worker device in the
manifest, model code the workers can import), and the deployment files: the Dataflow Flex
Template against the run CLI, and the Flink-on-Kubernetes topology's pieces fitting together."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.config.options import UsageError, add_run_arguments, parse_run_args
from saliency_audit.pipelines.job import preflight

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo_data"
DEPLOY = ROOT / "deploy"
DATAFLOW_ARGS = ["--runner", "DataflowRunner", "--project", "p", "--region", "r", "--temp_location", "gs://b/t"]
MODEL_ARGS = ["--model", "saliency_audit.pipelines.training.reference_model:mnist_cnn", "--weights", str(DEMO / "mnist_cnn.pt")]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    """The first 8 bundled digits as one tar shard."""
    path = tmp_path_factory.mktemp("shards") / "digits.tar"
    with tarfile.open(DEMO / "mnist-test-sample.tar") as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers()[:16]:
            dst.addfile(member, src.extractfile(member))
    return path


def run_argv(shard: Path, output: Path, *extra: str, model_args=MODEL_ARGS) -> list[str]:
    return ["--input", str(shard), *model_args, "--methods", "sal,grad", "--channels", "1",
            "--output", str(output), "--batch-size", "4", *extra]


# --- launcher and workers apart -------------------------------------------------------------

@pytest.mark.parametrize("beam_args, remote", [
    ([], False),
    (["--runner", "DirectRunner", "--direct_running_mode", "multi_processing"], False),
    (["--runner", "PortableRunner", "--job_endpoint", "embed"], False),
    (["--runner", "FlinkRunner"], False),  # [auto]: an embedded Flink in the launcher's process tree
    (["--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:8786"], False),
    (DATAFLOW_ARGS, True),
    (["--runner", "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner"], True),
    (["--runner", "FlinkRunner", "--flink_master", "flink-rest:8081"], True),
    (["--runner", "PortableRunner", "--job_endpoint", "localhost:8099"], True),  # e.g. a port-forwarded job server
    (["--runner", "SparkRunner", "--spark_master_url", "spark://h:7077"], True),
    (["--runner", "DaskRunner", "--dask_client_address", "tcp://10.0.0.2:8786"], True),
])
def test_which_runners_have_remote_workers(beam_args, remote):
    assert preflight.workers_are_remote(beam_args) is remote


def test_dataflow_cuda_run_passes_preflight_on_a_cpu_launcher(no_cuda, shard, tmp_path, caplog):
    caplog.set_level("INFO", logger="saliency_audit")
    plan = audit.plan(run_argv(shard, tmp_path / "out", "--device", "cuda", *DATAFLOW_ARGS))
    assert plan.resolved["device"] == "cuda"  # recorded for the workers, who resolve it themselves
    assert plan.resolved["device_check"] == "cpu"  # where the launcher ran the model on a sample
    assert plan.resolved["device_requested"] == "cuda"
    assert plan.resolved["num_classes"] == 10 and plan.resolved["sample_image"]
    assert plan.config.device == "cuda"  # the job's config still asks the workers for CUDA
    assert "preflight runs on its CPU" in caplog.text


@pytest.mark.parametrize("beam_args", [[], ["--runner", "PortableRunner", "--job_endpoint", "embed"]])
def test_local_runner_without_cuda_still_fails_fast(no_cuda, shard, tmp_path, beam_args):
    with pytest.raises(UsageError, match="--device cuda was requested but no CUDA device is available"):
        audit.plan(run_argv(shard, tmp_path / "out", "--device", "cuda", *beam_args))


def test_misspelt_device_fails_on_remote_runners_too(shard, tmp_path):
    with pytest.raises(UsageError, match="--device must be cpu, cuda.* got 'gpu'"):
        audit.plan(run_argv(shard, tmp_path / "out", "--device", "gpu", *DATAFLOW_ARGS))


def test_auto_on_a_remote_runner_is_left_to_the_workers(no_cuda, shard, tmp_path):
    resolved = audit.plan(run_argv(shard, tmp_path / "out", "--device", "auto", *DATAFLOW_ARGS)).resolved
    assert (resolved["device"], resolved["device_check"]) == ("auto", "cpu")


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A model factory in a module that no installed distribution holds (the user's own code)."""
    package = tmp_path / "user_code"
    package.mkdir()
    (package / "my_models_for_test.py").write_text(
        "from saliency_audit.pipelines.training.reference_model import mnist_cnn\n\ndef build():\n    return mnist_cnn()\n")
    monkeypatch.syspath_prepend(str(package))
    return "my_models_for_test:build"


def test_user_module_model_is_refused_on_a_remote_runner(shard, tmp_path, user_module):
    argv = run_argv(shard, tmp_path / "out", "--device", "cpu", *DATAFLOW_ARGS,
                    model_args=["--model", user_module, "--weights", str(DEMO / "mnist_cnn.pt")])
    with pytest.raises(UsageError, match=r"module 'my_models_for_test' is not part of an installed distribution.*"
                                         r"--extra_package"):
        audit.plan(argv)
    audit.plan(argv[:argv.index("--runner")])  # DirectRunner: the workers share the launcher's sys.path


@pytest.mark.parametrize("shipping", [["--extra_package", "dist/my_models-1.0-py3-none-any.whl"],
                                      ["--setup_file", "./setup.py"], ["--requirements_file", "requirements.txt"],
                                      ["--sdk_container_image", "europe-docker.pkg.dev/p/r/audit:1"]])
def test_user_module_model_passes_when_its_code_is_shipped(shard, tmp_path, user_module, shipping):
    argv = run_argv(shard, tmp_path / "out", "--device", "cpu", *DATAFLOW_ARGS, *shipping,
                    model_args=["--model", user_module, "--weights", str(DEMO / "mnist_cnn.pt")])
    assert audit.plan(argv).resolved["num_classes"] == 10


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_installed_and_file_models_need_no_shipping(shard, tmp_path):
    audit.plan(run_argv(shard, tmp_path / "a", "--device", "cpu", *DATAFLOW_ARGS))  # pipelines: installed
    from saliency_audit.pipelines.training.reference_model import mnist_cnn
    model = mnist_cnn()
    model.load_state_dict(torch.load(DEMO / "mnist_cnn.pt", weights_only=True))
    scripted = tmp_path / "model.pt"
    torch.jit.trace(model.eval(), torch.zeros(1, 1, 28, 28)).save(str(scripted))
    audit.plan(run_argv(shard, tmp_path / "b", "--device", "cpu", *DATAFLOW_ARGS,
                        model_args=["--model", str(scripted)]))


@pytest.mark.slow
def test_manifest_records_the_workers_device_on_directrunner(shard, tmp_path):
    manifest = audit.run(run_argv(shard, tmp_path / "out", "--device", "auto", "--no-metrics"))
    model = manifest["model"]
    assert model["device_requested"] == "auto"
    assert model["device_check"] == "cpu"
    assert model["worker_devices"] == ["cpu"]  # reported by the explain step itself
    assert model["device"] == "cpu"
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == model


def test_worker_device_entry_convention():
    resolved = {"device": "cuda", "device_requested": "cuda", "device_check": "cpu"}
    assert preflight.worker_device_entry(resolved, ["cuda", "cuda", "cuda"]) == {
        "device": "cuda", "device_requested": "cuda", "device_check": "cpu", "worker_devices": ["cuda"]}
    assert preflight.worker_device_entry(resolved, ["cuda", "cpu"])["device"] == "cpu,cuda"
    assert preflight.worker_device_entry(resolved, [])["device"] == "cuda"  # no batch reached a worker


# --- Dataflow Flex Template ------------------------------------------------------------------

def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser


def _run_actions() -> dict[str, argparse.Action]:
    """The documented run options by dest (hidden ones, kept for old scripts, excluded)."""
    return {a.dest: a for a in _run_parser()._actions
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"}


def _metadata() -> dict:
    return json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())


def test_template_parameters_match_the_run_options():
    actions, parameters = _run_actions(), _metadata()["parameters"]
    names = [p["name"] for p in parameters]
    assert len(names) == len(set(names))
    for p in parameters:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p["name"]), p["name"]
        assert p["name"] in actions, f"metadata.json parameter {p['name']} is not a run option"
        assert p.get("isOptional", False) is not actions[p["name"]].required, p["name"]
        assert p["label"] and p["helpText"]
    required = {dest for dest, a in actions.items() if a.required}
    assert required <= set(names), f"required run options missing from metadata.json: {required - set(names)}"


def test_template_entry_point_turns_parameters_into_run_options():
    sys.path.insert(0, str(DEPLOY / "dataflow"))
    try:
        import main as entry
    finally:
        sys.path.remove(str(DEPLOY / "dataflow"))
    argv = entry.run_argv(["--input=gs://b/s/*.tar", "--model=m.pt", "--output=gs://b/o", "--batch_size=16",
                           "--method_options={\"intg\": {\"n_steps\": 8}}", "--metrics=false", "--sanity_check=true",
                           "--trust_model=false", "--runner=DataflowRunner", "--temp_location=gs://b/t",
                           "--number_of_worker_harness_threads=4"])
    args, beam_args = parse_run_args(argv)
    assert (args.batch_size, args.method_options, args.metrics, args.sanity_check, args.trust_model) == (
        16, {"intg": {"n_steps": 8}}, False, True, False)
    assert beam_args == ["--runner=DataflowRunner", "--temp_location=gs://b/t", "--number_of_worker_harness_threads=4"]


def _dry_run(script: Path, *args: str, **env: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "DRY_RUN": "1", **env}, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _flags(command: list[str]) -> dict[str, str]:
    return dict(t[2:].split("=", 1) for t in command if t.startswith("--") and "=" in t)


def test_launch_script_renders_the_gcloud_commands():
    commands = _dry_run(DEPLOY / "dataflow" / "launch.sh", "build-and-run",
                        "input=gs://b/shards/*.tar", "model=gs://b/m.pt", "methods=sal,grad,intg",
                        "output=gs://b/audits/1", "batch_size=64",
                        PROJECT="p", REGION="europe-west4", BUCKET="b", REPOSITORY="audit", TAG="1")
    docker, build, run = commands
    image = "europe-west4-docker.pkg.dev/p/audit/saliency-audit:1"
    assert docker[:3] == ["gcloud", "builds", "submit"] and Path(docker[3]).resolve() == ROOT
    assert _flags(docker)["substitutions"] == f"_IMAGE={image}"
    assert Path(_flags(docker)["config"]).resolve() == DEPLOY / "dataflow" / "cloudbuild.yaml"
    assert build[:4] == ["gcloud", "dataflow", "flex-template", "build"]
    assert build[4] == "gs://b/templates/saliency-audit.json"
    flags = _flags(build)
    assert flags["image"] == image and flags["sdk-language"] == "PYTHON"
    assert Path(flags["metadata-file"]).resolve() == DEPLOY / "dataflow" / "metadata.json"
    assert run[:4] == ["gcloud", "dataflow", "flex-template", "run"]
    flags = _flags(run)
    assert flags["template-file-gcs-location"] == "gs://b/templates/saliency-audit.json"
    assert flags["region"] == "europe-west4" and flags["worker-machine-type"] == "g2-standard-8"
    assert flags["additional-experiments"] == "no_use_multiple_sdk_containers"
    assert flags["parameters"].startswith("^~^")  # ~ separates parameters: values hold commas
    parameters = dict(p.split("=", 1) for p in flags["parameters"][3:].split("~"))
    assert parameters["methods"] == "sal,grad,intg" and parameters["batch_size"] == "64"
    assert parameters["device"] == "cuda"
    assert parameters["sdk_container_image"] == image  # the workers run the template's own image
    assert parameters["dataflow_service_options"] == (
        "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver")
    assert parameters["number_of_worker_harness_threads"] == "4"
    ours = {p["name"] for p in _metadata()["parameters"]}
    beam = {a.dest for a in _beam_parser()._actions}
    for name in parameters:  # every parameter is a template parameter or a Beam pipeline option
        assert name in ours or name in beam, name


def _beam_parser():
    from saliency_audit.pipelines.config.options import beam_option_parser
    return beam_option_parser()


def test_launch_script_refuses_missing_settings():
    result = subprocess.run(["bash", str(DEPLOY / "dataflow" / "launch.sh"), "run", "input=x"],
                            capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in {**os.environ, "DRY_RUN": "1"}.items() if k != "PROJECT"})
    assert result.returncode != 0 and "PROJECT" in result.stderr


def test_direct_submit_script_ships_a_wheel():
    commands = _dry_run(DEPLOY / "dataflow" / "submit.sh", "--input", "gs://b/s/*.tar")
    wheel, job = commands
    assert wheel[1:4] == ["-m", "pip", "wheel"] and Path(wheel[-1]).resolve() == ROOT
    assert "--runner" in job and job[job.index("--runner") + 1] == "DataflowRunner"
    package = job[job.index("--extra_package") + 1]
    assert package.endswith(".whl")


# --- Flink on Kubernetes ---------------------------------------------------------------------

def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(documents, kind, name=None):
    found = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name)
    return found[0]


def _option(args: list[str], flag: str) -> str:
    for i, token in enumerate(args):
        if token == flag:
            return args[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def _worker_pool_port(command: list[str]) -> int:
    assert command[:3] == ["python", "-m", "apache_beam.runners.worker.worker_pool_main"], command
    return int(_option(command, "--service_port"))


@pytest.mark.slow
def test_worker_pool_command_is_one_the_module_accepts():
    """The flag is --service_port (worker_pool_main exits without it); there is no --worker_port."""
    help_text = subprocess.run([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    assert "--service_port" in help_text and "--worker_port" not in help_text


def test_flink_kubernetes_manifests_fit_together():
    docs = _documents(DEPLOY / "flink" / "flink-deployment.yaml")
    flink = _kind(docs, "FlinkDeployment")
    assert flink["apiVersion"] == "flink.apache.org/v1beta1"
    name, version = flink["metadata"]["name"], flink["spec"]["flinkVersion"]  # e.g. v1_19
    taskmanager = flink["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]
    pool = next(c for c in taskmanager if c["name"] == "beam-worker-pool")
    port = _worker_pool_port(pool["command"] + pool.get("args", []))
    assert {"containerPort": port, "name": "pool"}.items() <= pool["ports"][0].items()
    assert _option(pool["command"], "--container_executable") == "/opt/apache/beam/boot"

    job_server = _kind(docs, "Deployment", "beam-job-server")["spec"]["template"]["spec"]["containers"][0]
    minor = version.removeprefix("v").replace("_", ".")
    assert job_server["image"].startswith(f"apache/beam_flink{minor}_job_server:")
    assert _option(job_server["args"], "--flink-master") == f"{name}-rest:8081"  # the operator's REST service
    service = _kind(docs, "Service", "beam-job-server")
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert service_ports["job"] == int(_option(job_server["args"], "--job-port"))
    assert service_ports["artifact"] == int(_option(job_server["args"], "--artifact-port"))

    launcher = _kind(docs, "Job", "saliency-audit")["spec"]["template"]["spec"]["containers"][0]
    argv = launcher["args"]
    assert launcher["command"] == ["python", "-m", "saliency_audit", "run"]
    assert _option(argv, "--runner") == "PortableRunner"
    assert _option(argv, "--job_endpoint") == f"beam-job-server:{service_ports['job']}"
    assert _option(argv, "--artifact_endpoint") == f"beam-job-server:{service_ports['artifact']}"
    assert _option(argv, "--environment_type") == "EXTERNAL"
    assert _option(argv, "--environment_config") == f"localhost:{port}"  # the sidecar in each task manager pod
    assert launcher["image"] == pool["image"]  # the launcher and the workers run the same code
    parse_run_args(argv)  # a valid run invocation: our options and Beam options only
    assert "PROCESS" not in (DEPLOY / "flink" / "flink-deployment.yaml").read_text()


def test_flink_compose_fits_together():
    compose = yaml.safe_load((DEPLOY / "flink" / "compose.yaml").read_text())["services"]
    pool, taskmanager = compose["beam-worker-pool"], compose["taskmanager"]
    port = _worker_pool_port(pool["command"])
    assert pool["network_mode"] == "service:taskmanager"  # so localhost:PORT in the task manager is the pool
    job_server = compose["beam-job-server"]
    assert _option(job_server["command"], "--flink-master") == "jobmanager:8081"
    assert "jobmanager" in compose and "taskmanager" in compose
    assert taskmanager["image"].startswith("flink:") and compose["jobmanager"]["image"] == taskmanager["image"]
    job_port = int(_option(job_server["command"], "--job-port"))
    assert f"{job_port}:{job_port}" in job_server["ports"]
    launcher = compose["saliency-audit"]
    argv = launcher["command"][launcher["command"].index("run") + 1:]
    assert _option(argv, "--job_endpoint") == f"beam-job-server:{job_port}"
    assert (_option(argv, "--environment_type"), _option(argv, "--environment_config")) == (
        "EXTERNAL", f"localhost:{port}")
    parse_run_args(argv)


def _dask_cli_flags(command: str) -> str:
    """The help of `dask worker` / `dask scheduler` (the modules behind the two subcommands)."""
    return subprocess.run([sys.executable, "-m", f"distributed.cli.dask_{command}", "--help"],
                          capture_output=True, text=True, timeout=60).stdout


def test_dask_kubernetes_manifests_fit_together():
    docs = _documents(DEPLOY / "dask" / "dask-cluster.yaml")
    cluster = _kind(docs, "DaskCluster")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    worker = cluster["spec"]["worker"]["spec"]["containers"][0]
    scheduler = cluster["spec"]["scheduler"]["spec"]["containers"][0]
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    worker_help, scheduler_help = _dask_cli_flags("worker"), _dask_cli_flags("scheduler")
    for flag in (a for a in worker["args"][2:] if a.startswith("--")):
        assert flag in worker_help, flag  # every flag is one `dask worker` takes
    for flag in (a for a in scheduler["args"][2:] if a.startswith("--")):
        assert flag in scheduler_help, flag
    assert _option(worker["args"], "--nthreads") == "1"  # one model per process; torch uses the cores
    port = int(_option(scheduler["args"], "--port"))
    service_ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert service_ports["tcp-comm"] == port

    launcher = _kind(docs, "Job", "saliency-audit")["spec"]["template"]["spec"]["containers"][0]
    argv = launcher["args"]
    assert launcher["command"] == ["python", "-m", "saliency_audit", "run"]
    assert _option(argv, "--runner") == "DaskRunner"
    name = cluster["metadata"]["name"]
    assert _option(argv, "--dask_client_address") == f"tcp://{name}-scheduler:{port}"  # the operator's Service
    assert launcher["image"] == worker["image"] == scheduler["image"]  # Dask pickles code: one image
    parse_run_args(argv)  # a valid run invocation, the Dask options included
    assert preflight.workers_are_remote(argv[argv.index("--runner"):])


def test_dask_image_installs_the_dask_extra():
    dockerfile = (DEPLOY / "dask" / "Dockerfile").read_text()
    assert re.search(r'pip install [^\n]*"\.\[[^\]]*\bdask\b', dockerfile)
    assert "dask[distributed]" in (DEPLOY.parent / "pyproject.toml").read_text()
