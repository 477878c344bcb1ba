"""The audit pipeline against a bare Python loop doing the same work, side by side in one run.

    python benchmarks/pipeline_vs_loop.py [--images 5000] [--shards 5] [--methods sal,grad]
        [--metrics] [--threads 2] [--repeats 3] [--modes loop,inprocess,mp1,mp2] [--profile]

Both read the same MNIST test digits as PNG tar shards (saliency_audit.transforms.io.readers.read_shard), decode and
preprocess them (saliency_audit.transforms.io.preprocess), cut batches of --batch-size per shard in shard order,
explain them with the same explainers on the same model (the bundled CNN) with the same seeds
(saliency_audit.transforms.io.records.seed_for), compute the same metrics when --metrics is given, and write the
same saliency rows to Parquet. The loop builds each batch's columns with NumPy and writes them
through one pyarrow ParquetWriter; the pipeline is ``audit.run`` (preflight, Beam job, summary,
errors, count verification, manifest) on:

    inprocess  DirectRunner (Beam's in-process FnApiRunner), torch threads = --threads
    mp1, mp2   --direct_running_mode=multi_processing --direct_num_workers 1 / 2; each SDK worker
               is a subprocess with --threads torch threads (--torch-threads, and OMP_NUM_THREADS
               for its OpenMP pool), so mp2 may use twice the cores of mp1 (the scaling question)

The pipeline gets the loop's threads (--torch-threads --threads); --auto-threads leaves it the
audit's default instead (auto: the cores it may use, divided among its worker processes; one
thread where the images have at most 3x32x32 values, as these digits) while the loop keeps
--threads. Before auto knew small images it gave these digits 2 threads on 2 cores against the
loop's 1, and on a busy machine either side runs 5 to 10 times slower at 2 threads. Torch
threads are set back to --threads before every run, since an in-process run leaves its own behind.
Where the process has cores that --threads leaves, the pipeline's reader also decodes ahead in one
of them while the model runs (docs/performance.md; benchmarks/decode_model_pipeline.py measures that).

--threads defaults to 1: on a 2-core machine shared with other work, 2 OpenMP threads per process
made the same loop 7x slower (20 against 150 images/s), so 1 thread per process is the
figure that means something there.

Modes run interleaved (loop, inprocess, mp1, mp2, loop, ...) --repeats times; images/s are from
the median wall time of each mode, and the ratios are pipeline images/s / loop images/s. With
--profile, one more in-process run and one loop run go under cProfile and the time of the
pipeline's stages is printed next to the loop's. --check compares the loop's maps with the
pipeline's (they must be equal: same work). --json FILE writes the figures.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from saliency_audit.explainers import get_explainer  # noqa: E402
from saliency_audit.explainers import metrics as quality  # noqa: E402
from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards  # noqa: E402
from saliency_audit.transforms.io.preprocess import BadImage, Preprocessing, decode, preprocess  # noqa: E402
from saliency_audit.transforms.io.readers import read_shard  # noqa: E402
from saliency_audit.transforms.io.records import ErrorRecord, seed_for  # noqa: E402
from saliency_audit.transforms.io.rows import extra_value, saliency_schema  # noqa: E402
from saliency_audit.transforms.model.load import ModelSpec, load_model  # noqa: E402
from saliency_audit.transforms.parquet_sink import GROUP_BYTES  # noqa: E402

MNIST = ROOT.parent / "shared/data/mnist"
MODEL = "saliency_audit.pipelines.training.reference_model:mnist_cnn"
WEIGHTS = str(ROOT / "pipelines/demo_data/mnist_cnn.pt")
MODES = ("loop", "inprocess", "mp1", "mp2")
METRIC_STEPS = 16  # the audit's default --metric-steps


# --- inputs ---------------------------------------------------------------------------------------

def write_digit_shards(directory: Path, n_images: int, shard_size: int, splits=("t10k",)) -> list[str]:
    """The first ``n_images`` digits of ``splits`` (t10k = test, train), in that order, as PNG tar
    shards of ``shard_size``; ids are prefixed by the split, so they are unique across splits."""
    paths, left = [], n_images
    for split in splits:
        if left <= 0:
            break
        images, labels = load_mnist_split(MNIST / f"{split}-images-idx3-ubyte.gz",
                                          MNIST / f"{split}-labels-idx1-ubyte.gz")
        take = min(left, len(images))
        prefix = "mnist-test" if split == "t10k" else f"mnist-{split}"
        paths += write_tar_shards(images[:take], labels[:take], directory, shard_size, prefix)
        left -= take
    if left > 0:
        raise SystemExit(f"only {n_images - left} digits in {', '.join(splits)}; asked for {n_images}")
    return paths


# --- the bare loop --------------------------------------------------------------------------------

@dataclasses.dataclass
class Work:
    """What both sides do: the same shards, methods, batch size, metrics and model."""

    shards: list[str]
    methods: dict[str, dict[str, Any]]
    batch_size: int = 32
    metrics: bool = False
    model: str = MODEL
    weights: str | None = WEIGHTS
    prep: Preprocessing = Preprocessing()


def bare_loop(work: Work, output: Path) -> dict[str, int]:
    """Read, decode, preprocess, batch, explain and write Parquet in plain Python; the counts."""
    model = load_model(ModelSpec(work.model, work.weights), "cpu")
    explainers = {name: get_explainer(name, model, **opts) for name, opts in work.methods.items()}
    schema = saliency_schema(work.methods)
    output.parent.mkdir(parents=True, exist_ok=True)
    counts = {"read": 0, "rows": 0, "errors": 0}
    pending: list[pa.Table] = []
    buffered = 0
    with pq.ParquetWriter(output, schema, compression="zstd") as writer:
        def add(tables):  # row groups as big as the sink's
            nonlocal buffered
            pending.extend(tables)
            buffered += sum(t.nbytes for t in tables)
            if buffered >= GROUP_BYTES:
                flush()

        def flush():
            nonlocal buffered
            if pending:
                writer.write_table(pa.concat_tables(pending))
                pending.clear()
                buffered = 0

        for url in work.shards:
            batch = []
            for record in read_shard(url, max_pixels=work.prep.max_pixels):
                counts["read"] += 1
                try:
                    if isinstance(record, ErrorRecord):
                        raise BadImage("read", record.reason)
                    array = decode(record, work.prep.max_pixels)
                    batch.append((record, array.shape[:2], preprocess(array, work.prep)))
                except BadImage:
                    counts["errors"] += 1
                    continue
                if len(batch) == work.batch_size:
                    add(explain_batch(batch, model, explainers, schema, work.metrics))
                    batch = []
            if batch:
                add(explain_batch(batch, model, explainers, schema, work.metrics))
        flush()
    counts["rows"] = pq.ParquetFile(output).metadata.num_rows
    return counts


def explain_batch(batch, model, explainers, schema, metrics: bool) -> list[pa.Table]:
    """One table per method for one batch: the audit's saliency columns, built column-wise."""
    records = [r for r, _, _ in batch]
    images = torch.from_numpy(np.stack([p for _, _, p in batch]))
    with torch.inference_mode():
        probabilities = torch.softmax(model(images).float(), dim=1)
    predicted = probabilities.argmax(dim=1)
    targets = predicted.clone()
    seeds = torch.tensor([seed_for(r.image_id) for r in records], dtype=torch.int64)
    n = len(records)
    rows = torch.arange(n)
    common = {
        "image_id": [r.image_id for r in records], "source": [r.source for r in records],
        "label": [r.label for r in records], "target": targets.numpy(), "predicted": predicted.numpy(),
        "score": probabilities[rows, targets].numpy(), "predicted_score": probabilities[rows, predicted].numpy(),
        "original_height": [s[0] for _, s, _ in batch], "original_width": [s[1] for _, s, _ in batch],
        "seed": seeds.numpy(),
    }
    metric_args = {"steps": METRIC_STEPS, "substrate": "zero", "seeds": seeds}
    if metrics:
        noise = quality.random_maps(images.shape[:1] + images.shape[2:], seeds)
        common["deletion_auc_random"] = quality.deletion_auc(model, images, noise, targets, **metric_args).numpy()
        common["insertion_auc_random"] = quality.insertion_auc(model, images, noise, targets, **metric_args).numpy()
    tables = []
    for name, explainer in explainers.items():
        start = time.perf_counter()
        result = explainer.explain(images, targets, seeds)
        ms = 1000 * (time.perf_counter() - start) / n
        maps = result.maps.detach().float()
        flat = maps.numpy().reshape(n, -1)
        columns = dict(common, method=[name] * n, height=[maps.shape[1]] * n, width=[maps.shape[2]] * n,
                       time_ms=[ms] * n, saliency=pa.ListArray.from_arrays(
                           pa.array(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)),
                           pa.array(flat.reshape(-1))),
                       saliency_min=flat.min(1), saliency_max=flat.max(1),
                       saliency_sum=flat.sum(1, dtype=np.float64), saliency_abs_mean=np.abs(flat).mean(1, np.float64))
        if metrics:
            columns["deletion_auc"] = quality.deletion_auc(model, images, maps, targets, **metric_args).numpy()
            columns["insertion_auc"] = quality.insertion_auc(model, images, maps, targets, **metric_args).numpy()
            columns["gini"] = quality.gini(maps).numpy()
        for extra, values in result.extras.items():
            columns[extra] = [extra_value(values[k]) for k in range(n)]
        tables.append(pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns
                                else pa.nulls(n, f.type) for f in schema}, schema=schema))
    return tables


# --- the pipeline ---------------------------------------------------------------------------------

MODE_ARGS = {"inprocess": [], "mp1": ["--direct_running_mode=multi_processing", "--direct_num_workers", "1"],
             "mp2": ["--direct_running_mode=multi_processing", "--direct_num_workers", "2"]}


def audit_argv(work: Work, pattern: str, output: Path, mode: str = "inprocess",
               threads: int | None = None) -> list[str]:
    methods = ",".join(work.methods)
    argv = ["--input", pattern, "--model", work.model, "--methods", methods, "--batch-size", str(work.batch_size),
            "--device", "cpu", "--output", str(output)] + (["--torch-threads", str(threads)] if threads else [])
    if work.weights:
        argv += ["--weights", work.weights]
    if any(work.methods.values()):
        argv += ["--method-options", json.dumps({k: v for k, v in work.methods.items() if v})]
    return argv + ([] if work.metrics else ["--no-metrics"]) + MODE_ARGS[mode]


def workers(mode: str) -> int:
    return int(mode[2:]) if mode.startswith("mp") else 0


def run_pipeline(work: Work, pattern: str, output: Path, mode: str, threads: int, auto_threads: bool = False) -> dict:
    """audit.run in ``mode`` with ``threads`` torch threads per process (the audit's own choice
    with ``auto_threads``); SDK worker subprocesses size their OpenMP pool from OMP_NUM_THREADS."""
    from saliency_audit.pipelines import audit
    if workers(mode):  # read by torch when a worker starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return audit.run(audit_argv(work, pattern, output, mode, None if auto_threads else threads))


# --- measuring ------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the SDK workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_once(mode: str, work: Work, pattern: str, scratch: Path, threads: int,
             auto_threads: bool = False) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, counts) of one run. CPU time is what to compare on a machine
    shared with other work: their load stretches wall time far more than it does CPU time."""
    torch.set_num_threads(threads)  # an in-process run leaves its own thread count behind
    output = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{mode}-"))
    cpu, start = cpu_seconds(), time.perf_counter()
    if mode == "loop":
        counts = bare_loop(work, output / "part-0.parquet")
    else:
        counts = run_pipeline(work, pattern, output, mode, threads, auto_threads)["counts"]
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    shutil.rmtree(output, ignore_errors=True)
    return seconds, cpu, counts


def compare(modes: list[str], repeats: int, work: Work, pattern: str, scratch: Path, threads: int,
            n_images: int, auto_threads: bool = False) -> dict:
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    counts = {}
    for r in range(repeats):
        for mode in modes:
            seconds, cpu_s, counts[mode] = run_once(mode, work, pattern, scratch, threads, auto_threads)
            times[mode].append(seconds)
            cpu[mode].append(cpu_s)
            print(f"  round {r + 1} {mode:>9}: {seconds:7.2f} s  {n_images / seconds:8.1f} images/s  "
                  f"CPU {cpu_s:7.2f} s", flush=True)
    result = {m: {"seconds": t, "median_s": statistics.median(t), "images_per_s": n_images / statistics.median(t),
                  "cpu_seconds": cpu[m], "median_cpu_s": statistics.median(cpu[m])} for m, t in times.items()}
    if "loop" in result:
        for m in modes:
            result[m]["ratio_to_loop"] = result[m]["images_per_s"] / result["loop"]["images_per_s"]
            result[m]["cpu_ratio_to_loop"] = result["loop"]["median_cpu_s"] / result[m]["median_cpu_s"]
    return {"modes": result, "counts": counts}


# Stages of the pipeline by (file suffix, function), for the profile; cumulative seconds each.
STAGES = {
    "read_shard (tar reading)": [("transforms/io/readers.py", "_read_tar")],
    "decode": [("transforms/io/preprocess.py", "decode")],
    "preprocess": [("transforms/io/preprocess.py", "preprocess")],
    "explainers (explain)": [("explainers/gradient/saliency.py", "explain"), ("explainers/gradient/integrated_gradients.py", "explain"),
                             ("explainers/relevance/deeplift.py", "explain"), ("explainers/relevance/lrp.py", "explain"),
                             ("explainers/cam/gradcam.py", "explain"), ("explainers/gradient/smoothgrad.py", "explain"),
                             ("explainers/perturbation/occlusion.py", "explain")],
    "metrics (deletion/insertion/gini)": [("explainers/metrics/causal.py", "deletion_auc"),
                                          ("explainers/metrics/causal.py", "insertion_auc"),
                                          ("explainers/metrics/complexity.py", "gini")],
    "explain step in all (_explain_batch)": [("transforms/explain.py", "_explain_batch")],
    "map checks + rows (map_problem, _row)": [("transforms/io/rows.py", "map_problem"), ("transforms/explain.py", "_row")],
    "to_table (rows -> Arrow)": [("transforms/io/rows.py", "to_table")],
    "pyarrow write_table": [("pyarrow/parquet/core.py", "write_table")],
    "summary combine (add_input)": [("transforms/summary.py", "add_input"),
                                    ("transforms/summary.py", "merge_accumulators"),
                                    ("transforms/summary.py", "extract_output")],
    "duplicate-id pass (shard_ids)": [("transforms/duplicates.py", "shard_ids")],
    "preflight": [("pipelines/job/preflight.py", "preflight")],
    "verify counts (reads Parquet back)": [("pipelines/job/phases.py", "verify")],
    "findings statistics (in the job)": [("pipelines/job/findings_step.py", "_entries"),
                                         ("pipelines/job/findings_step.py", "add_input"),
                                         ("pipelines/job/findings_step.py", "merge_accumulators"),
                                         ("pipelines/job/findings_step.py", "_write")],
    "findings (launcher, from the statistics)": [("pipelines/job/phases.py", "write_findings")],
    "manifest + commit + publish": [("pipelines/job/manifest.py", "build_manifest"), ("pipelines/job/phases.py", "commit_files"),
                                    ("transforms/io/publication.py", "commit"), ("transforms/io/publication.py", "reclaim")],
    "model load (explainers built)": [("transforms/model/handler.py", "build_explainers")],
    "pickle dumps/loads": [("~", "<built-in method _pickle.dumps>"), ("~", "<built-in method _pickle.loads>"),
                           ("~", "<built-in method dill._dill.dumps>")],
}


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per stage. Recursive and nested entries are counted once: a stage's
    functions are matched by name, and a function's cumulative time already holds its callees."""
    table = stats.stats  # (file, line, function) -> (calls, primitive calls, tottime, cumtime, callers)
    out = {}
    for stage, keys in STAGES.items():
        out[stage] = sum(cum for (file, _, func), (_, _, _, cum, _) in table.items()
                         if any(file.endswith(suffix) and func == name for suffix, name in keys))
    return out


def profile(mode: str, work: Work, pattern: str, scratch: Path, threads: int, top: int,
            auto_threads: bool = False) -> dict:
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    run_once(mode, work, pattern, scratch, threads, auto_threads)
    total = time.perf_counter() - start
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\n--- cProfile of one {mode} run: {total:.2f} s wall; top {top} functions by own time ---")
    stats.sort_stats("tottime").print_stats(top)
    return {"total_s": total, "stages_s": stage_seconds(stats)}


def print_stages(profiles: dict[str, dict]) -> None:
    names = list(profiles)
    print("\n| stage | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{profiles[n]['stages_s'][stage]:.2f}" for n in names) + " |")
    print("| total wall | " + " | ".join(f"{profiles[n]['total_s']:.2f}" for n in names) + " |")


def check_same_maps(work: Work, pattern: str, scratch: Path) -> int:
    """The loop's and the in-process pipeline's maps and scores agree per (image, method)."""
    loop_out = scratch / "check-loop.parquet"
    bare_loop(work, loop_out)
    run_pipeline(work, pattern, scratch / "check-pipeline", "inprocess", torch.get_num_threads())
    import pyarrow.dataset as ds
    columns = ["image_id", "method", "target", "score", "saliency", "seed"] + (
        ["deletion_auc", "insertion_auc", "deletion_auc_random"] if work.metrics else [])
    key = [("image_id", "ascending"), ("method", "ascending")]
    a = pq.read_table(loop_out, columns=columns).sort_by(key)
    b = ds.dataset(scratch / "check-pipeline/saliency").to_table(columns=columns).sort_by(key)
    if a.num_rows != b.num_rows:
        raise AssertionError(f"loop wrote {a.num_rows} rows, the pipeline {b.num_rows}")
    for name in columns:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name == "saliency":
            same = all(np.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(x, y))
        elif isinstance(x[0], float):
            same = np.allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            same = x == y
        if not same:
            raise AssertionError(f"column {name} differs between the loop and the pipeline")
    return a.num_rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--images", type=int, default=5000, help="MNIST test digits (default 5000)")
    add("--shards", type=int, default=5, help="tar shards they are split into (default 5)")
    add("--methods", default="sal,grad")
    add("--method-options", type=json.loads, default={})
    add("--batch-size", type=int, default=32)
    add("--metrics", action="store_true", help="compute the audit's metrics on both sides (default off)")
    add("--threads", type=int, default=1, help="torch threads per process, SDK workers included (default 1)")
    add("--auto-threads", action="store_true", help="the pipeline chooses its torch threads (the audit's default)")
    add("--repeats", type=int, default=3)
    add("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    add("--profile", action="store_true", help="also cProfile one loop and one in-process run")
    add("--top", type=int, default=25, help="functions listed per profile")
    add("--check", action="store_true", help="check that the loop and the pipeline write the same maps")
    add("--scratch", help="directory for shards and outputs (default: a temporary one, removed)")
    add("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s) {', '.join(bad)}; known: {', '.join(MODES)}")
    args.modes = modes
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="pipeline-vs-loop-"))
    methods = {m.strip(): args.method_options.get(m.strip(), {}) for m in args.methods.split(",") if m.strip()}
    try:
        shards = write_digit_shards(scratch / "shards", args.images, -(-args.images // args.shards))
        work = Work(shards, methods, args.batch_size, args.metrics)
        pattern = str(scratch / "shards/*.tar")
        print(f"{args.images} digits in {len(shards)} shards, methods {args.methods}, batch {args.batch_size}, "
              f"metrics {'on' if args.metrics else 'off'}; torch threads {args.threads} in the loop, "
              f"{'the audit default (auto)' if args.auto_threads else args.threads} in each pipeline process",
              flush=True)
        figures: dict[str, Any] = {"images": args.images, "shards": len(shards), "methods": args.methods,
                                   "batch_size": args.batch_size, "metrics": args.metrics, "threads": args.threads}
        if args.check:
            figures["checked_rows"] = check_same_maps(work, pattern, scratch)
            print(f"check: the loop and the pipeline wrote the same {figures['checked_rows']} rows", flush=True)
        figures["auto_threads"] = args.auto_threads
        figures.update(compare(args.modes, args.repeats, work, pattern, scratch, args.threads, args.images,
                               args.auto_threads))
        print("\n| mode | median s | images/s | ratio to loop | median CPU s | CPU ratio (loop CPU / mode CPU) |"
              "\n|---|---:|---:|---:|---:|---:|")
        nan = float("nan")
        for mode, m in figures["modes"].items():
            print(f"| {mode} | {m['median_s']:.2f} | {m['images_per_s']:.1f} | {m.get('ratio_to_loop', nan):.2f} "
                  f"| {m['median_cpu_s']:.2f} | {m.get('cpu_ratio_to_loop', nan):.2f} |")
        if args.profile:
            os.environ["OMP_NUM_THREADS"] = str(args.threads)
            figures["profile"] = {mode: profile(mode, work, pattern, scratch, args.threads, args.top, args.auto_threads)
                                  for mode in ("loop", "inprocess")}
            print_stages(figures["profile"])
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
        return figures
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
