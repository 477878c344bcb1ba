"""The same inputs give identical Parquet values on every runner we can run here."""
import tarfile

import numpy as np
import pytest

from conftest import add_member, read_output
from pipelines import audit


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, demo_shard):
    root = tmp_path_factory.mktemp("runner-shards")
    with tarfile.open(demo_shard) as src:
        members = src.getmembers()[:96]  # .png + .cls per image
        for k in range(2):
            with tarfile.open(root / f"part-{k}.tar", "w") as dst:
                for member in members[k * 48:(k + 1) * 48]:
                    add_member(dst, member.name, src.extractfile(member).read())
    return root


def audit_with(runner_args, shards, output, demo_model_args):
    audit.run(["--input", str(shards / "*.tar"), *demo_model_args, "--methods", "sal,intg,deeplift",
               "--output", str(output), "--channels", "1", "--batch-size", "5", *runner_args])
    rows = read_output(output / "saliency")
    return {(r["image_id"], r["method"]): (r["saliency"], r["score"], r["predicted"]) for r in rows}


def test_in_process_multiprocessing_and_portable_runners_agree(two_shards, tmp_path, demo_model_args):
    reference = audit_with([], two_shards, tmp_path / "direct", demo_model_args)
    assert len(reference) == 48 * 3
    for name, args in {
        "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    }.items():
        other = audit_with(args, two_shards, tmp_path / name, demo_model_args)
        assert other.keys() == reference.keys(), name
        for key, (saliency, score, predicted) in reference.items():
            assert np.array_equal(np.asarray(other[key][0]), np.asarray(saliency)), (name, key)
            assert other[key][1:] == (score, predicted), (name, key)
