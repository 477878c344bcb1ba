"""The job on Beam's DaskRunner against a real dask.distributed cluster: two worker processes
talking over TCP on 127.0.0.1 (saliency_audit.pipelines.runners.dask works around the Beam bugs that stop it)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as ds
import pytest

distributed = pytest.importorskip("distributed")

from conftest import read_output  # noqa: E402
from test_runners import PER_SHARD, assert_same_values, audit_with, direct_reference, two_shards  # noqa: E402,F401

from saliency_audit.pipelines import audit  # noqa: E402

pytestmark = pytest.mark.slow  # a Dask cluster per test


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as local:
        with distributed.Client(local.scheduler_address) as client:
            yield local.scheduler_address, client


def _executed(client) -> dict[str, int]:
    return client.run(lambda dask_worker: dask_worker.state.executed_count)


def test_two_worker_cluster_gives_the_direct_runners_values(cluster, two_shards, tmp_path, demo_model_args,
                                                             direct_reference):
    address, client = cluster
    assert len(client.scheduler_info()["workers"]) == 2 and address.startswith("tcp://127.0.0.1:")
    before = _executed(client)
    other = audit_with(["--runner", "DaskRunner", "--dask_client_address", address], two_shards,
                       tmp_path / "dask", demo_model_args)
    assert_same_values(direct_reference, other, "dask")
    worked = {w for w, n in _executed(client).items() if n > before.get(w, 0)}
    assert len(worked) == 2, "both worker processes ran tasks"
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert manifest["runner"] == "DaskRunner"
    n = 2 * PER_SHARD
    assert all(c == {"read": n, "explained": n, "errors": 0} for c in manifest["counts"].values())
    assert manifest["model"]["device"] == "cpu"  # as the workers reported it


def test_every_output_of_a_run_with_bad_records_is_written(cluster, tmp_path, demo_shard, demo_model_args):
    """Beam's own runner computes only the last sink and sends tagged outputs to every consumer:
    errors, the read count and the worker devices must all arrive, each in its own place."""
    import tarfile

    from conftest import add_member
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(demo_shard) as src, tarfile.open(shards / "bad.tar", "w") as dst:
        for member in src.getmembers()[:20]:
            add_member(dst, member.name, src.extractfile(member).read())
        add_member(dst, "broken.png", b"not a png")
        add_member(dst, "broken.cls", b"3")
    address, _ = cluster
    audit_with(["--runner", "DaskRunner", "--dask_client_address", address], shards, tmp_path / "out",
               demo_model_args)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all(c == {"read": 11, "explained": 10, "errors": 1} for c in manifest["counts"].values())
    errors = read_output(tmp_path / "out" / "errors")
    assert [(e["image_id"], e["stage"]) for e in errors] == [("broken", "decode")]
    assert np.isfinite([r["score"] for r in read_output(tmp_path / "out" / "saliency")]).all()


def test_a_worker_killed_mid_run_costs_nothing(cluster, tmp_path, mnist_dir, demo_model_args):
    """SIGKILL one of the two worker processes while the job runs (its nanny starts a new one):
    Dask recomputes the lost tasks, the driver keeps only the files the final tasks committed,
    and every digit is explained exactly once per method."""
    import os
    import signal
    import threading
    import time

    from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards
    images, labels = load_mnist_split(mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz")
    n, shard_size = 600, 75  # 8 shards: the first files land with most shards still to run
    write_tar_shards(images[:n], labels[:n], tmp_path / "shards", shard_size, "digit")
    address, client = cluster
    output = tmp_path / "out"
    pids = client.run(os.getpid)
    killed: list[int] = []
    written_at_kill: list[str] = []

    def kill_when_files_appear():  # mid-run: some shards are written, most are not
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if any(output.glob("saliency/run=*/*.parquet")) and not (output / "manifest.json").exists():
                pid = max(pids.values())
                written_at_kill.extend(p.name for p in output.glob("saliency/run=*/*.parquet"))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_files_appear, daemon=True)
    killer.start()
    audit.run(["--input", str(tmp_path / "shards" / "*.tar"), *demo_model_args, "--methods", "sal,grad",
               "--output", str(output), "--channels", "1", "--batch-size", "50", "--no-metrics",
               "--runner", "DaskRunner", "--dask_client_address", address])
    killer.join(timeout=5)
    assert killed, "the run finished before a worker could be killed"
    assert killed[0] not in client.run(os.getpid).values()  # that process is gone, a new one took its place
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["counts"] == {m: {"read": n, "explained": n, "errors": 0} for m in ("sal", "grad")}
    rows = ds.dataset(str(output / "saliency"), format="parquet").to_table(columns=["image_id", "method"])
    keys = list(zip(rows.column("image_id").to_pylist(), rows.column("method").to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * n  # no duplicates, none missing
    on_disk = sorted(f"saliency/{p.parent.name}/{p.name}" for p in output.glob("saliency/run=*/*.parquet"))
    assert on_disk == sorted(manifest["files"]["saliency"])  # the killed attempt's files are gone
    assert len(written_at_kill) < len(on_disk) / 2, written_at_kill  # the kill landed mid-run
