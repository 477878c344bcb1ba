"""--torch-threads: the default from the runner's worker processes, the option's checks, and the
budget applied on the worker (torch's pools and abele's tree-fitting pool)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from apache_beam.utils import shared

from saliency_audit.pipelines import audit
from saliency_audit.pipelines.config.options import UsageError, parse_run_args
from saliency_audit.pipelines.config.spec import parse_invocation
from saliency_audit.pipelines.job import dry_run
from saliency_audit.pipelines.job.preflight import preflight, thread_budget, worker_processes
from saliency_audit.transforms.explain import ExplainBatches
from saliency_audit.transforms.io.preprocess import Preprocessing
from saliency_audit.transforms.model.handler import MODEL_CALLS, BatchHandler, ExplainConfig
from saliency_audit.transforms.model.load import ModelSpec
from saliency_audit.transforms.model.threads import ThreadBudget, available_cores, is_small_image

BASE = ["--input", "x.tar", "--model", "m.pt", "--output", "out"]
RESNET = "saliency_audit.pipelines.training.reference_model:resnet18"


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("beam_args, processes", [
    ([], 1),
    (["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"], 2),
    (["--direct_running_mode", "multi_processing", "--direct_num_workers", "0"], 0),  # Beam: one per core
    (["--direct_running_mode", "multi_threading", "--direct_num_workers", "4"], 1),  # one process
    (["--runner", "PortableRunner", "--job_endpoint", "embed", "--sdk_worker_parallelism", "3"], 3),
    (["--runner", "DataflowRunner"], 0),
    (["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"], 1),
])
def test_worker_processes_from_the_runner_options(beam_args, processes):
    assert worker_processes(beam_args) == processes


@pytest.mark.parametrize("budget, cores, threads", [
    (ThreadBudget(None, 1), 8, 8), (ThreadBudget(None, 2), 8, 4), (ThreadBudget(None, 3), 8, 2),
    (ThreadBudget(None, 4), 2, 1), (ThreadBudget(None, 0), 8, 1), (ThreadBudget(3, 2), 2, 3)])
def test_auto_is_the_cores_shared_among_the_processes(budget, cores, threads):
    assert budget.resolve(cores) == threads


def test_auto_uses_the_cores_this_process_may_run_on():
    assert thread_budget(None, []).resolve() == available_cores()


@pytest.mark.parametrize("value, expected", [("auto", None), ("3", 3)])
def test_option_values(value, expected):
    args, _ = parse_run_args(BASE + ["--torch-threads", value])
    assert args.torch_threads == expected
    assert parse_run_args(BASE)[0].torch_threads is None  # default auto


@pytest.mark.parametrize("value, message", [("0", "--torch-threads must be between 1 and 1024, got 0"),
                                            ("many", "expected auto or a number of threads")])
def test_option_refuses_bad_values(value, message):
    with pytest.raises(UsageError, match=message):
        parse_run_args(BASE + ["--torch-threads", value])


@pytest.mark.parametrize("value, expected", [('"auto"', None), ("2", 2)])
def test_spec_key(tmp_path, value, expected):
    spec = tmp_path / "audit.toml"
    spec.write_text(f"[explain]\ntorch_threads = {value}\n")
    args, _ = parse_invocation(["--config", str(spec), *BASE])
    assert args.torch_threads == expected


@pytest.mark.parametrize("value, message", [('"two"', "explain.torch_threads"), ("0", "explain.torch_threads")])
def test_spec_key_refuses_bad_values(tmp_path, value, message):
    spec = tmp_path / "audit.toml"
    spec.write_text(f"[explain]\ntorch_threads = {value}\n")
    with pytest.raises(UsageError, match=message):
        parse_invocation(["--config", str(spec), *BASE])


def test_setup_applies_the_budget(demo_model_args, restore_torch_threads):
    spec = ModelSpec(demo_model_args[1], demo_model_args[3])
    torch.set_num_threads(2)
    step = ExplainBatches(ExplainConfig(spec, {"sal": {}}, device="cpu", threads=ThreadBudget(1)), shared.Shared())
    step.setup()
    assert torch.get_num_threads() == 1


def test_abele_pool_respects_the_budget(demo_images, demo_model, monkeypatch, restore_torch_threads):
    import saliency_audit.explainers.blackbox.abele as abele
    from saliency_audit.explainers import get_explainer
    from saliency_audit.pipelines.cli import DEMO_AAE
    sizes = []

    class Recording(abele.ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            sizes.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(abele, "ThreadPoolExecutor", Recording)
    explainer = get_explainer("abele", demo_model, aae=str(DEMO_AAE), neighbours=16, generations=1,
                              exemplars=4, max_attempts=50)
    images, _ = demo_images
    torch.set_num_threads(1)
    explainer.explain(images[:2], torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert sizes == [1]


def test_preflight_records_the_threads(demo_shard, demo_model_args):
    config = ExplainConfig(ModelSpec(demo_model_args[1], demo_model_args[3]), {"sal": {}}, device="cpu")
    big = Preprocessing(channels=3, resize=(64, 64))  # 3x64x64 values: over SMALL_IMAGE_VALUES
    config = dataclasses.replace(config, model=ModelSpec(RESNET))  # the digits' CNN takes 1x28x28 only
    auto = preflight(config, [str(demo_shard)], big, {},
                     ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    assert auto["torch_threads"] == {"requested": "auto", "worker_processes": 2, "small_images": False,
                                     "per_process": max(1, available_cores() // 2)}
    given = preflight(dataclasses.replace(config, threads=ThreadBudget(3)), [str(demo_shard)],
                      Preprocessing(channels=3, resize=(32, 32)), {}, [])
    assert given["torch_threads"] == {"requested": 3, "worker_processes": 1, "small_images": True, "per_process": 3}
    remote = preflight(config, [str(demo_shard)], big, {}, ["--runner", "DataflowRunner"])
    assert remote["torch_threads"] == {"requested": "auto", "worker_processes": 0, "small_images": False,
                                       "per_process": None}
    dask = preflight(config, [str(demo_shard)], big, {},
                     ["--runner", "DaskRunner", "--dask_client_address", "127.0.0.1:8786"])
    assert dask["torch_threads"] == {"requested": "auto", "worker_processes": 1, "small_images": False,
                                     "per_process": None}


@pytest.mark.parametrize("budget, cores, split", [
    (ThreadBudget(None, 1, small_images=True), 2, (1, 1)), (ThreadBudget(None, 1, small_images=True), 16, (1, 2)),
    (ThreadBudget(None, 1, small_images=True), 1, (1, 0)), (ThreadBudget(None, 2, small_images=True), 2, (1, 0)),
    (ThreadBudget(3, 1, small_images=True), 8, (3, 1))])  # an explicit --torch-threads N is kept
def test_auto_on_small_images_is_one_torch_thread(budget, cores, split):
    assert budget.split("cpu", cores) == split
    assert budget.resolve(cores) == split[0]


def test_small_images_by_their_values():
    assert is_small_image((1, 1, 28, 28)) and is_small_image((3, 32, 32))
    assert not is_small_image((3, 33, 32)) and not is_small_image((1, 3, 224, 224))


def test_auto_follows_the_sample_image(demo_shard, demo_model_args, tmp_path):
    """The digits' 1x28x28 images: auto is one torch thread on the workers (and so in the manifest),
    whatever the cores; at 3x64x64, the cores shared among the worker processes."""
    argv = ["--input", str(demo_shard), "--methods", "sal", "--device", "cpu", "--no-metrics",
            "--output", str(tmp_path / "out")]
    small = audit.plan(argv + [*demo_model_args, "--channels", "1"])
    assert small.config.threads.small_images and small.config.threads.split("cpu", 4) == (1, 1)
    assert small.resolved["torch_threads"]["per_process"] == 1
    big = audit.plan(argv + ["--model", RESNET, "--channels", "3", "--resize", "64,64"])
    assert not big.config.threads.small_images and big.config.threads.split("cpu", 4) == (4, 0)


def test_dask_worker_uses_its_own_threads():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=3, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        assert client.submit(ThreadBudget(None, 1).resolve, 64).result() == 3
        assert ThreadBudget(None, 1).resolve(64) == 64  # the launcher, with dask loaded, is no worker


# --- the dry run's calibration and the demo's dry run -----------------------------------------

def test_calibration_measures_each_method_alone(demo_shard, demo_model_args, tmp_path, restore_torch_threads,
                                               monkeypatch):
    plan = audit.plan(["--input", str(demo_shard), *demo_model_args, "--methods", "sal,intg", "--channels", "1",
                       "--device", "cpu", "--no-metrics", "--method-options", '{"intg": {"n_steps": 16}}',
                       "--output", str(tmp_path / "out")])
    # What each measurement ran, by the model's call counter (per method: forward calls, images),
    # not by the clock: seconds are noise on a busy machine (benchmarks/ has the speed figures).
    measured = []

    class Recording(BatchHandler):
        def process(self, batch):
            counts = {}
            for tag, value in super().process(batch):
                if tag == MODEL_CALLS and not value[0].startswith("*"):
                    counts[value[0]] = value[1:]
                yield tag, value
            measured.append(counts)

    monkeypatch.setattr(dry_run, "BatchHandler", Recording)
    seconds = dry_run.calibrate(plan, images=2)
    assert set(seconds) == {"sal", "intg", None}
    assert all(math.isfinite(v) and v >= 0 for v in seconds.values()) and seconds[None] > 0
    # Measured together every time, the shared figure was the cost of both and the methods' own
    # figures were noise around 0: a warm-up of both, then the shared work alone, then each method alone.
    assert [set(counts) for counts in measured] == [{"sal", "intg"}, set(), {"sal"}, {"intg"}]
    sal_images, intg_images = measured[2]["sal"][1], measured[3]["intg"][1]
    assert 0 < 16 * sal_images <= intg_images  # intg: 16 forward passes per image, sal one
    passes = {name: info["passes"]["forward"] for name, info in plan.resolved["methods"].items()}
    assert passes["intg"] > passes["sal"]


def test_demo_dry_run_stops_after_the_plan(tmp_path, capsys, restore_torch_threads):
    from saliency_audit.pipelines import cli
    code = cli.main(["demo", "--output", str(tmp_path / "out"), "--methods", "sal", "--no-sanity-check",
                     "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0 and "Nothing was run (--dry-run)" in captured.out and "error" not in captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "400000 100000\n"}, 4),               # cgroup v2: a 4-CPU Kubernetes limit
    ({"cpu.max": "150000 100000\n"}, 2),               # 1.5 CPUs: rounded up
    ({"cpu.max": "max 100000\n"}, None),               # no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage"}, None),
    ({}, None),
])
def test_a_container_cpu_quota_caps_the_cores(tmp_path, files, limit):
    from saliency_audit.transforms.model.threads import cgroup_cpu_limit
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(str(tmp_path)) == limit
    assert available_cores(str(tmp_path)) == min(available_cores(str(tmp_path / "none")), limit or 10**6)


def test_a_one_cpu_quota_gives_one_thread_per_worker(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert available_cores(str(tmp_path)) == 1
