"""Clever-Hans discovery (saliency_audit.pipelines.checks.findings): a planted watermark is found, a clean model raises
nothing, and the reader survives what a saliency table can hold."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from saliency_audit.pipelines.checks.findings import (
    FINDINGS_SCHEMA,
    SCORE_THRESHOLD,
    find_clever_hans,
    regions,
    score_group,
)
from saliency_audit.pipelines.job import phases

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import clever_hans  # noqa: E402

METHOD = "grad"  # gradient x input: one backward pass, and it finds the watermark


@pytest.fixture(scope="module")
def experiment(mnist_dir, tmp_path_factory):
    """The small CNN trained with and without a watermark on class 7 (3,000 digits, 1 epoch, one
    torch thread: about 7 s), and 300 test digits (16 watermarked 7s) audited with both models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workdir = tmp_path_factory.mktemp("clever-hans")
        prepared = clever_hans.prepare(workdir, 3000, 300, 1, "small", data=mnist_dir)
        assert prepared.control_accuracy > 0.8, "the control model did not learn the digits"
        findings = clever_hans.audit_findings(prepared, prepared.weights, workdir / "audit", [METHOD])
        control = clever_hans.audit_findings(prepared, prepared.control_weights, workdir / "control", [METHOD])
    finally:
        torch.set_num_threads(threads)
    return prepared, findings, control, workdir


@pytest.mark.slow
def test_watermark_class_is_the_top_finding_with_its_images(experiment):
    prepared, findings, _, _ = experiment
    top = findings.to_pylist()[0]
    assert (top["class"], top["flagged"]) == (clever_hans.WATERMARK_CLASS, True), top["description"]
    assert top["score"] >= SCORE_THRESHOLD
    assert top["kind"] == "spray_cluster" and top["clusters"] >= 2 and top["eigengap"] > 0
    carried = set(top["images"])
    assert len(carried & prepared.marked_ids) >= 0.9 * len(prepared.marked_ids)  # recall
    assert len(carried & prepared.marked_ids) >= 0.9 * len(carried)               # precision
    assert set(top["prototypes"]) <= prepared.marked_ids and len(top["prototypes"]) == 5
    assert top["region"].startswith("top-left corner") or "rows 0-" in top["region"]
    mean_map = np.array(top["mean_map"]).reshape(top["map_height"], top["map_width"])
    assert mean_map[:2, :2].sum() > 0.5  # the watermark's cells hold most of the cluster's mass


@pytest.mark.slow
def test_benchmark_outcome_reads_the_same(experiment):
    prepared, findings, control, _ = experiment
    outcome = clever_hans.outcome(findings, control, METHOD, prepared.marked_ids)
    assert (outcome.rank, outcome.kind) == (1, "spray_cluster")
    assert outcome.recall >= 0.9 and outcome.precision >= 0.9
    assert outcome.score >= SCORE_THRESHOLD > outcome.control_max


@pytest.mark.slow
def test_control_model_raises_no_finding(experiment):
    _, _, control, _ = experiment
    assert control.num_rows > 10 and set(control.column("method").to_pylist()) == {METHOD}
    assert max(control.column("score").to_pylist()) < SCORE_THRESHOLD
    assert not any(control.column("flagged").to_pylist())


@pytest.mark.slow
def test_random_maps_raise_no_finding(experiment, tmp_path):
    """The watermarked model's rows with their maps replaced by noise: nothing stands out."""
    _, _, _, workdir = experiment
    table = pq.read_table(workdir / "audit" / "saliency")
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((table.num_rows, 28 * 28)).astype(np.float32)
    index = table.schema.get_field_index("saliency")
    table = table.set_column(index, "saliency", pa.array(list(noise), type=pa.list_(pa.float32())))
    pq.write_table(table, tmp_path / "random.parquet")
    findings = find_clever_hans([str(tmp_path / "random.parquet")])
    assert max(findings.column("score").to_pylist()) < SCORE_THRESHOLD


# Synthetic maps: no training, no MNIST.

def synthetic_rows(n_per_class: int = 40, classes: int = 4, seed: int = 0, float16: bool = False,
                   spotted: tuple[int, ...] = (0,)) -> pa.Table:
    """A blob at a random place in the centre, the same for every class (the object); half of
    the spotted classes' maps also carry a bright spot in the top-left corner (the shortcut)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(classes):
        for i in range(n_per_class):
            m = rng.random((28, 28)).astype(np.float32) * 0.01
            r, c = 8 + rng.integers(0, 8, size=2)
            m[r:r + 6, c:c + 6] += 1.0
            if label in spotted and i % 2 == 0:
                m[1:4, 1:4] += 10.0
            rows.append({"image_id": f"c{label}-{i:03d}", "method": "sal", "target": label, "predicted": label,
                         "height": 28, "width": 28,
                         "saliency": m.ravel().astype(np.float16 if float16 else np.float32)})
    dtype = pa.float16() if float16 else pa.float32()
    schema = pa.schema([("image_id", pa.string()), ("method", pa.string()), ("target", pa.int64()),
                        ("predicted", pa.int64()), ("height", pa.int32()), ("width", pa.int32()),
                        ("saliency", pa.list_(dtype))])
    return pa.Table.from_pylist(rows, schema=schema)


def write(table: pa.Table, path: Path, parts: int = 1) -> list[str]:
    files = []
    for k, start in enumerate(range(0, table.num_rows, -(-table.num_rows // parts))):
        files.append(str(path / f"part-{k}.parquet"))
        pq.write_table(table.slice(start, -(-table.num_rows // parts)), files[-1], row_group_size=17)
    return files


def test_synthetic_corner_spot_found_in_float16_maps_over_several_files(tmp_path):
    findings = find_clever_hans(write(synthetic_rows(float16=True), tmp_path, parts=3))
    assert findings.schema == FINDINGS_SCHEMA
    flagged = [r for r in findings.to_pylist() if r["flagged"]]
    assert flagged and flagged == findings.to_pylist()[:len(flagged)]
    kinds = {(r["class"], r["kind"], r["region"].split(" (")[0]) for r in flagged}
    assert kinds == {(0, "spray_cluster", "top-left corner")}
    # SpRAy may split the spotted maps further (by where their blob lies), never mix them with the others
    assert set().union(*(r["images"] for r in flagged)) == {f"c0-{i:03d}" for i in range(0, 40, 2)}


def test_a_spot_every_class_shares_is_no_finding(tmp_path):
    findings = find_clever_hans(write(synthetic_rows(spotted=(0, 1, 2, 3)), tmp_path))
    assert not any(findings.column("flagged").to_pylist())
    corner = [r["score"] for r in findings.to_pylist() if (r["region"] or "").startswith("top-left")]
    assert max(corner, default=0.0) < SCORE_THRESHOLD / 4


def test_score_is_excess_times_consistency():
    """Half the maps with all their mass in a corner scores half of every map with half of it there."""
    masks = np.stack([r.mask.ravel() for r in regions(10, 2, 28, 28)]).astype(float)
    corner, centre = np.zeros((10, 10)), np.zeros((10, 10))
    corner[0, 0], centre[5, 5] = 1.0, 1.0
    reference = np.full(len(masks), 0.1)
    split = score_group(np.stack([corner, centre]), reference, masks)
    shared = score_group(np.stack([(corner + centre) / 2] * 2), reference, masks)
    assert (split.excess, split.consistency) == pytest.approx((0.4, 0.5))
    assert split.score == pytest.approx(0.2) and shared.score == pytest.approx(0.4)


def test_same_findings_whatever_the_row_order_and_a_bounded_sample(tmp_path):
    """The sample is the smallest hashes of the ids, so shuffled rows give the same table, and
    no class's sample exceeds the cap."""
    table = synthetic_rows(n_per_class=60)
    order = list(range(table.num_rows))
    random.Random(1).shuffle(order)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = find_clever_hans(write(table, tmp_path / "a"), sample=25)
    second = find_clever_hans(write(table.take(order), tmp_path / "b", parts=2), sample=25)
    assert first.equals(second)
    assert max(first.column("size").to_pylist()) <= 25
    assert set(first.column("class_images").to_pylist()) == {60}


def test_hostile_rows_cost_only_themselves(tmp_path):
    table = synthetic_rows()
    bad = [{"image_id": "null-map", "method": "sal", "target": 1, "predicted": 1, "height": 28, "width": 28,
            "saliency": None},
           {"image_id": "short", "method": "sal", "target": 1, "predicted": 1, "height": 28, "width": 28,
            "saliency": [1.0] * 10},
           {"image_id": "nan", "method": "sal", "target": 2, "predicted": 2, "height": 28, "width": 28,
            "saliency": [float("nan")] * 784},
           {"image_id": "empty", "method": "sal", "target": 3, "predicted": 3, "height": 28, "width": 28,
            "saliency": [0.0] * 784},
           {"image_id": "no-class", "method": "sal", "target": None, "predicted": None, "height": 28, "width": 28,
            "saliency": [1.0] * 784},
           {"image_id": "zero-size", "method": "sal", "target": 1, "predicted": 1, "height": 0, "width": 0,
            "saliency": []},
           # maps smaller than the 10x10 grid, read first: a cell would hold no pixel (this crashed the run)
           {"image_id": "tiny", "method": "sal", "target": 1, "predicted": 1, "height": 5, "width": 5,
            "saliency": [1.0] * 25},
           {"image_id": "thin", "method": "sal", "target": 2, "predicted": 2, "height": 7, "width": 40,
            "saliency": [1.0] * 280}]
    table = pa.concat_tables([pa.Table.from_pylist(bad, schema=table.schema), table])
    rows = find_clever_hans(write(table, tmp_path)).to_pylist()
    assert rows[0]["class"] == 0 and rows[0]["flagged"]
    assert {r["class_images"] for r in rows} == {40}  # every bad row skipped, every good one counted
    assert not {b["image_id"] for b in bad} & {i for r in rows for i in r["images"]}


def test_no_files_no_findings_and_bad_invocations_fail_in_one_line(tmp_path):
    assert find_clever_hans([]) == FINDINGS_SCHEMA.empty_table()
    with pytest.raises(ValueError, match="window"):
        find_clever_hans(write(synthetic_rows(), tmp_path), window=10)
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="lacks the columns"):
        find_clever_hans([str(tmp_path / "other.parquet")])


@pytest.mark.slow
def test_the_run_publishes_its_findings_and_the_gate_and_report_use_them(experiment, tmp_path):
    """audit.run writes findings/ itself; the findings gate fails on the watermarked model and
    holds on the control; the report shows the flagged finding with its prototypes."""
    import json

    from saliency_audit.pipelines import cli
    from saliency_audit.pipelines.reporting.report import write_report
    prepared, findings, _, workdir = experiment
    manifest = json.loads((workdir / "audit" / "manifest.json").read_text())
    published = ds.dataset([str(workdir / "audit" / f) for f in manifest["files"]["findings"]]).to_table()
    assert published.to_pylist() == findings.to_pylist()  # the same as on the committed maps
    assert manifest["findings"]["flagged"] >= 1 and manifest["findings"]["top"]["class"] == clever_hans.WATERMARK_CLASS
    for audit_dir, expected in ((workdir / "audit", 1), (workdir / "control", 0)):
        verdict_path = tmp_path / f"{audit_dir.name}.json"
        assert cli.main(["check", str(audit_dir), "--gate", "error_rate=off", "--verdict", str(verdict_path)]) == expected
        gate = next(g for g in json.loads(verdict_path.read_text())["gates"] if g["name"] == "findings")
        assert gate["status"] == ("fail" if expected else "pass")
        if expected:  # the images it names are the watermarked ones
            assert gate["worst_images"] and set(gate["worst_images"]) <= prepared.marked_ids
    page = Path(write_report(str(workdir / "audit"), str(tmp_path / "report.html"))).read_text()
    section = page[page.index('id="findings"'):]
    section = section[:section.index("</section>")]
    assert "yes" in section and "top-left corner" in section
    assert section.count("<img") >= 1 + 5  # the mean map and the prototypes


@pytest.mark.slow
def test_a_failing_analysis_never_costs_the_run(tmp_path, monkeypatch, demo_shard, demo_model_args):
    """findings/ is an analysis of the committed maps: if it fails, the run is still published,
    with an empty findings/ and the error in the manifest."""
    import json

    from saliency_audit.pipelines import audit

    def broken(*args, **kwargs):
        raise MemoryError("planted")

    monkeypatch.setattr(phases, "findings_from_statistics", broken)
    manifest = audit.run(["--input", str(demo_shard), *demo_model_args, "--methods", "sal", "--channels", "1",
                          "--limit-per-shard", "8", "--no-metrics", "--output", str(tmp_path / "out")])
    assert manifest["counts"]["sal"] == {"read": 8, "explained": 8, "errors": 0}
    assert manifest["findings"]["candidates"] == 0 and "MemoryError: planted" in manifest["findings"]["error"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert pq.read_table(tmp_path / "out" / on_disk["files"]["findings"][0]).num_rows == 0


def test_the_reference_pool_is_exact_for_few_classes_and_bounded_for_many():
    from saliency_audit.pipelines.checks.findings import references
    rng = np.random.default_rng(0)
    masks = np.eye(4)[:, :4].repeat(1, axis=1)  # 4 one-cell regions of a 2x2 grid
    samples = {c: rng.random((30, 2, 2)) for c in range(5)}
    exact = references(samples, masks, pool=10_000)
    for c in samples:  # every other class's maps: the plain quantile
        others = np.concatenate([samples[o].reshape(30, -1) @ masks.T for o in samples if o != c])
        assert np.allclose(exact[c], np.quantile(others, 0.9, axis=0))
    bounded = references({c: rng.random((400, 2, 2)) for c in range(300)}, masks, pool=600)
    assert len(bounded) == 300 and all(np.isfinite(v).all() and v.shape == (4,) for v in bounded.values())


def test_a_handful_of_sparse_maps_in_one_place_is_no_finding(tmp_path):
    """The demo's false alarm: lore's maps are a few superpixels; a SpRAy cluster of 3 of a class's
    8 maps on the same spot, where other classes' maps put nothing, scored 0.73 and was flagged.
    A group under MIN_SUPPORT maps is not scored."""
    from saliency_audit.pipelines.checks.findings import MIN_SUPPORT
    rng = np.random.default_rng(1)
    rows = []
    for c in range(6):
        for i in range(8 if c == 5 else 40):
            m = np.zeros((28, 28), np.float32)
            r, q = ((2, 18) if i < 3 else (12, 12)) if c == 5 else rng.integers(8, 20, 2)
            m[r:r + 5, q:q + 5] = 1.0  # one superpixel kept
            rows.append({"image_id": f"{c}-{i}", "method": "lore", "target": c, "predicted": c, "height": 28,
                         "width": 28, "saliency": m.ravel().tolist()})
    table = pa.Table.from_pylist(rows)
    found = find_clever_hans(write(table, tmp_path)).to_pylist()
    five = [r for r in found if r["class"] == 5]
    assert five and not any(r["flagged"] for r in five)
    small = [r for r in five if r["kind"] == "spray_cluster" and r["size"] < MIN_SUPPORT]
    assert small and all(r["score"] == 0 and "too few maps" in r["description"] for r in small)


# The statistics a run's job gathers (saliency_audit.pipelines.job.findings_step): the launcher
# computes the findings from them, never from the maps.

def job_statistics(table: pa.Table, sample: int, seed: int) -> pa.Table:
    """What the job does with ``table``'s rows: shuffled into bundles, each pooled (in batches of a
    few rows) into one accumulator per (method, class), pickled between stages as Beam does, merged
    in a random order and grouping, written and read back."""
    import pickle

    from saliency_audit.pipelines.checks.findings import DEFAULT_GRID, statistics_table
    from saliency_audit.pipelines.job import findings_step
    rng = random.Random(seed)
    rows = table.to_pylist()
    for row in rows:  # as the job holds them: maps as arrays of the stored dtype
        row["saliency"] = None if row["saliency"] is None else np.asarray(row["saliency"], table.schema.field(
            "saliency").type.value_type.to_pandas_dtype())
    rng.shuffle(rows)
    pool = findings_step._PoolPerBundle(DEFAULT_GRID, sample, None)
    partial: dict[tuple, list] = {}
    for bundle in np.split(np.arange(len(rows)), sorted(rng.sample(range(1, len(rows)), 6))):
        pool.start_bundle()
        for i in bundle:
            pool.process(rows[i])
        for value in pool.finish_bundle():
            key, acc = value.value
            partial.setdefault(key, []).append(pickle.loads(pickle.dumps(acc)))
    combine = findings_step._MergeFn(sample)
    merged = {}
    for key, parts in partial.items():
        parts = [combine.add_input(combine.create_accumulator(), part) for part in parts]
        rng.shuffle(parts)
        while len(parts) > 1:  # merge a random pair at a time
            a, b = parts.pop(), parts.pop()
            parts.insert(rng.randrange(len(parts) + 1), combine.merge_accumulators([a, b]))
        merged[key] = combine.extract_output(parts[0])
    buffer = pa.BufferOutputStream()
    pq.write_table(statistics_table(merged, DEFAULT_GRID), buffer)
    return pq.read_table(pa.BufferReader(buffer.getvalue()))


def test_the_jobs_statistics_give_the_files_findings_in_any_order(tmp_path, monkeypatch):
    """Per (method, class) the exact sum and the sample of the smallest hashes merge to the same
    state in any order of rows, bundles, batches and merges: the findings equal those of the files
    (float16 maps, rows the findings skip, a sample cap the classes exceed), to the last bit."""
    from saliency_audit.pipelines.checks.findings import findings_from_statistics
    from saliency_audit.pipelines.job import findings_step
    monkeypatch.setattr(findings_step, "BATCH_BYTES", 5 * 784 * 2)  # a bundle pools every 5 maps
    table = synthetic_rows(n_per_class=60, float16=True)
    bad = pa.Table.from_pylist([
        {"image_id": "empty", "method": "sal", "target": 3, "predicted": 3, "height": 28, "width": 28,
         "saliency": [0.0] * 784},
        {"image_id": "short", "method": "sal", "target": 1, "predicted": 1, "height": 28, "width": 28,
         "saliency": [1.0] * 10},
        {"image_id": "tiny", "method": "sal", "target": 1, "predicted": 1, "height": 5, "width": 5,
         "saliency": [1.0] * 25},
        {"image_id": "no-class", "method": "sal", "target": None, "predicted": None, "height": 28, "width": 28,
         "saliency": [1.0] * 784}], schema=table.schema)
    table = pa.concat_tables([table, bad])
    expected = find_clever_hans(write(table, tmp_path, parts=3), sample=25)
    assert expected.num_rows and max(expected.column("size").to_pylist()) <= 25
    for seed in (0, 1):
        statistics = job_statistics(table, 25, seed)
        assert statistics.num_rows == 4 and set(statistics.column("count").to_pylist()) == {60}
        assert max(len(c) for c in statistics.column("cells").to_pylist()) == 25 * 100  # bounded: the sample
        assert findings_from_statistics(statistics).equals(expected)


def test_a_class_mean_is_its_exact_mean():
    """The fixed-point sum is exact: the mean map of maps whose float sum depends on the order."""
    from saliency_audit.pipelines.checks.findings import ClassMaps
    rng = np.random.default_rng(0)
    cells = rng.random((500, 10, 10)).astype(np.float32) ** 8  # values from ~1e-30 to 1
    cells /= cells.sum(axis=(1, 2), keepdims=True)
    exact = np.array([[math.fsum(cells[:, r, c].astype(float)) for c in range(10)] for r in range(10)]) / 500
    forward, backward = ClassMaps(10), ClassMaps(10)
    for i in range(500):
        forward.add([f"{i}"], cells[i:i + 1], (28, 28))
        backward.add([f"{499 - i}"], cells[499 - i:500 - i], (28, 28))
    assert np.array_equal(forward.mean(), backward.mean())
    assert np.allclose(forward.mean(), exact, rtol=1e-14, atol=0)


@pytest.mark.slow
def test_what_the_launcher_reads_after_the_job_does_not_grow_with_the_audit(monkeypatch, demo_shard, demo_model_args):
    """Issue 26: the launcher re-read every committed map for the findings after the job (terabytes at
    10 million 224-px maps). Now it reads the job's statistics: the bytes it reads from the audit's
    output after the job stay flat when the audit triples (with a sample cap of 3 maps per class,
    which both sizes reach for most classes), and of the saliency files it reads no map. The
    output is in memory:// so that every read, pyarrow's included, goes through one file class."""
    import uuid

    import fsspec
    from fsspec.implementations.memory import MemoryFile

    from saliency_audit.pipelines import audit
    from saliency_audit.pipelines.job import findings_step

    monkeypatch.setattr(findings_step, "DEFAULT_SAMPLE", 3)
    after_job = {"on": False}
    read: dict[str, int] = {}
    commit_files, original_read = phases.commit_files, MemoryFile.read

    def commit(*args, **kwargs):  # the launcher's first step after the job
        after_job["on"] = True
        return commit_files(*args, **kwargs)

    def counted(self, *args, **kwargs):
        data = original_read(self, *args, **kwargs)
        if after_job["on"]:
            folder = self.path.strip("/").split("/")[2]  # ROOT/N/<folder>: saliency, _runs, findings...
            read[folder] = read.get(folder, 0) + len(data)
        return data

    monkeypatch.setattr(phases, "commit_files", commit)
    monkeypatch.setattr(MemoryFile, "read", counted)
    fs, root = fsspec.filesystem("memory"), f"launcher-reads-{uuid.uuid4().hex}"
    found, size = {}, {}
    try:
        for n in (64, 192):
            after_job["on"], read = False, {}
            output = f"memory://{root}/{n}"
            manifest = audit.run(["--input", str(demo_shard), *demo_model_args, "--methods", "sal", "--channels", "1",
                                  "--limit-per-shard", str(n), "--no-metrics", "--output", output])
            assert manifest["counts"]["sal"]["explained"] == n
            published = ds.dataset([f"{root}/{n}/{f}" for f in manifest["files"]["findings"]], filesystem=fs).to_table()
            assert sum(r["class_images"] for r in published.to_pylist() if r["kind"] == "concentration") == n
            found[n] = dict(read)
            size[n] = sum(fs.size(f"{root}/{n}/{f}") for f in manifest["files"]["saliency"])
    finally:
        fs.rm(root, recursive=True)
    assert size[192] > 2.5 * size[64]  # the maps tripled
    assert found[192]["saliency"] <= found[64]["saliency"] + 64  # the counts' method column, no map
    assert sum(found[192].values()) <= 1.1 * sum(found[64].values()), found


def test_kmeans_finds_the_clusters_scikit_learn_finds():
    """SpRAy's k-means (NumPy, so that a run does not import scikit-learn) against scikit-learn's
    KMeans as the reference, on spectral-embedding-like rows: unit vectors around k directions."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from saliency_audit.pipelines.checks.findings import kmeans
    for seed in range(6):
        rng = np.random.default_rng(seed)
        k = 2 + seed % 5
        directions = np.linalg.qr(rng.normal(size=(k, k)))[0]  # orthogonal, as the eigenvectors are
        for noise in (0.1, 0.35):  # apart, and overlapping (where either may find the better split)
            x = directions[rng.integers(0, k, 300)] + rng.normal(0, noise, (300, k))
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            reference = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x)
            ours = kmeans(x, k, seed=0)
            inertia = sum(((x[ours == c] - x[ours == c].mean(axis=0)) ** 2).sum() for c in range(k))
            assert len(set(ours)) == k and inertia <= reference.inertia_ * 1.001
            if noise < 0.2:
                assert adjusted_rand_score(reference.labels_, ours) > 0.99


def test_spectral_clusters_number_only_the_clusters_k_means_used(monkeypatch):
    """A cluster k-means leaves empty (possible where there are fewer distinct rows than k) is not
    numbered: every label in 0..k-1 has members, or SpRAy would report a cluster of no maps."""
    from saliency_audit.pipelines.checks import findings
    rows = np.repeat(np.eye(3, 16), [20, 20, 20], axis=0)
    monkeypatch.setattr(findings, "kmeans", lambda x, k, seed: np.where(np.arange(len(x)) < 30, 0, k - 1))
    labels, k, _ = findings.spectral_clusters(rows, 10, 8)
    assert k == 2 and sorted(set(labels.tolist())) == [0, 1]
