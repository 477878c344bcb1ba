"""The same inputs give identical Parquet values on every runner we can run here."""
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import add_member, read_output

from saliency_audit.pipelines import audit

pytestmark = pytest.mark.slow  # multiprocessing, portable and SDK worker pool runners

PER_SHARD = 16  # digits: batches of 5 leave a partial last batch in each shard
# The shards and the DirectRunner's values, made once per session: test_dask compares with them too.
_SHARED: dict = {}


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, demo_shard):
    if "shards" not in _SHARED:
        root = tmp_path_factory.mktemp("runner-shards")
        with tarfile.open(demo_shard) as src:
            members = src.getmembers()[:4 * PER_SHARD]  # .png + .cls per image
            for k in range(2):
                with tarfile.open(root / f"part-{k}.tar", "w") as dst:
                    for member in members[k * 2 * PER_SHARD:(k + 1) * 2 * PER_SHARD]:
                        add_member(dst, member.name, src.extractfile(member).read())
        _SHARED["shards"] = root
    return _SHARED["shards"]


def audit_with(runner_args, shards, output, demo_model_args):
    """One torch thread everywhere: a float's last bits depend on how torch splits a reduction
    over threads, and the runners' automatic thread counts differ (a Dask worker's is 1)."""
    audit.run(["--input", str(shards / "*.tar"), *demo_model_args, "--methods", "sal,intg,deeplift",
               "--output", str(output), "--channels", "1", "--batch-size", "5", "--torch-threads", "1",
               *runner_args])
    rows = read_output(output / "saliency")
    return {(r["image_id"], r["method"]): (r["saliency"], r["score"], r["predicted"]) for r in rows}


def test_in_process_multiprocessing_and_portable_runners_agree(two_shards, tmp_path, demo_model_args,
                                                               direct_reference):
    assert len(direct_reference) == 2 * PER_SHARD * 3
    for name, args in {
        "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    }.items():
        assert_same_values(direct_reference, audit_with(args, two_shards, tmp_path / name, demo_model_args), name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the worker pool exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def assert_same_values(reference: dict, other: dict, name: str) -> None:
    assert other.keys() == reference.keys(), name
    for key, (saliency, score, predicted) in reference.items():
        assert np.array_equal(np.asarray(other[key][0]), np.asarray(saliency)), (name, key)
        assert other[key][1:] == (score, predicted), (name, key)


@pytest.fixture(scope="module")
def direct_reference(two_shards, tmp_path_factory, demo_model_args):
    if "direct" not in _SHARED:
        _SHARED["direct"] = audit_with([], two_shards, tmp_path_factory.mktemp("direct"), demo_model_args)
    return _SHARED["direct"]


def test_external_sdk_worker_pool_gives_the_direct_runners_values(two_shards, tmp_path, demo_model_args,
                                                                   direct_reference):
    """Flink's topology, Python side: a separate SDK worker pool process (started as the Flink
    deployment starts it, with the venv's python first on PATH) and the EXTERNAL environment."""
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, pool)
        other = audit_with(["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
                            f"--environment_config=127.0.0.1:{port}"], two_shards, tmp_path / "external",
                           demo_model_args)
        manifest = json.loads((tmp_path / "external" / "manifest.json").read_text())
    finally:
        pool.terminate()
        pool.wait(timeout=30)
    assert_same_values(direct_reference, other, "external worker pool")
    assert manifest["runner"] == "PortableRunner" and "--environment_type=EXTERNAL" in manifest["beam_args"]
