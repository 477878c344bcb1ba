"""Worker count: the demo's methods through the real pipeline with 1 and 2 SDK worker processes
(DirectRunner multi_processing) side by side, and one oversubscribed configuration, 2 workers x 2
torch threads each (not run in CI).

    python benchmarks/worker_count.py [--images 1000] [--methods abele,lime,...] [--shards 4] [--configs 1,2,2x2]

Digits: the first --images of the MNIST test set in /work/shared/data/mnist (../shared/data/mnist
from the repository), as --shards PNG tar shards; without those files, the bundled sample (at most
300). Each configuration runs in a fresh subprocess (audit.plan, then audit.run_plan: preflight is
not timed) with the demo's model, --channels 1, the bundled AAE for abele, metrics on and no
sanity check. Figures: wall seconds, images/s, and CPU-seconds per image counted over the
launcher and every SDK worker process (getrusage of the subprocess and its reaped children), which
is what to compare on a machine shared with other work. A Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.pipelines.cli import DEMO_AAE, DEMO_METHODS, DEMO_MODEL, DEMO_SHARD, DEMO_WEIGHTS  # noqa: E402

MNIST = ROOT.parent / "shared/data/mnist"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    workers: int
    torch_threads: str = "auto"


CONFIGS = {"1x1": Config("1 worker x 1 thread", 1, "1"), "1": Config("1 worker", 1), "2": Config("2 workers", 2),
           "2x2": Config("2 workers x 2 threads (oversubscribed)", 2, "2")}


def digit_shards(directory: Path, images: int, shards: int) -> tuple[str, int | None]:
    """(input glob, --limit-per-shard or None) for the first ``images`` test digits."""
    if (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards
        pixels, labels = load_mnist_split(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
        write_tar_shards(pixels[:images], labels[:images], directory, -(-images // shards), "mnist-test")
        return str(directory / "*.tar"), None
    return str(DEMO_SHARD), min(images, 300)  # one bundled shard: one worker does all of it


def audit_argv(config: Config, pattern: str, limit: int | None, methods: str, output: Path) -> list[str]:
    names = [m.strip() for m in methods.split(",")]
    return ["--input", pattern, "--model", DEMO_MODEL, "--weights", str(DEMO_WEIGHTS), "--methods", methods,
            "--channels", "1", "--device", "cpu", "--output", str(output), "--torch-threads", config.torch_threads,
            *(["--aae", str(DEMO_AAE)] if "abele" in names else []),
            *(["--limit-per-shard", str(limit)] if limit else []),
            "--direct_running_mode=multi_processing", "--direct_num_workers", str(config.workers)]


def child(argv: list[str]) -> dict:
    """One run in this (fresh) process: wall seconds of the run after its plan, and counts."""
    from saliency_audit.pipelines import audit
    from saliency_audit.pipelines.job.preflight import thread_budget, threads_entry
    plan = audit.plan(argv)
    # the budget the run carries to its workers, as the plan resolves it from the flags
    budget = thread_budget(plan.options.torch_threads, plan.beam_args, plan.config.threads.small_images)
    plan.config = dataclasses.replace(plan.config, threads=budget)
    start = time.perf_counter()
    manifest, _ = audit.run_plan(plan)
    return {"seconds": time.perf_counter() - start, "counts": manifest["counts"],
            "threads": threads_entry(budget, plan.beam_args, remote=False)}


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(config: Config, pattern: str, limit: int | None, methods: str, scratch: Path) -> dict:
    output = Path(tempfile.mkdtemp(dir=scratch, prefix="out-"))
    argv = audit_argv(config, pattern, limit, methods, output)
    cpu = cpu_of_children()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{config.name}: the run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu_s"] = cpu_of_children() - cpu  # the subprocess and the SDK workers it reaped
    return result


def table(rows: list[tuple[Config, dict]], images: int) -> str:
    lines = ["| configuration | SDK workers | torch threads / worker | wall s | images/s | CPU s | CPU s / image |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for config, r in rows:
        threads = r["threads"]["per_process"]
        lines.append(f"| {config.name} | {config.workers} | {threads} | {r['seconds']:.1f} | "
                     f"{images / r['seconds']:.2f} | {r['cpu_s']:.1f} | {r['cpu_s'] / images:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="digits (default 1000)")
    parser.add_argument("--methods", default=DEMO_METHODS, help=f"default the demo's: {DEMO_METHODS}")
    parser.add_argument("--shards", type=int, default=4, help="tar shards the digits are split into (default 4)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"configurations to run, of {', '.join(CONFIGS)} (workers, x torch threads; default all)")
    parser.add_argument("--scratch", help="directory for shards and outputs (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.images < 1 or args.shards < 1:
        parser.error("--images and --shards must be at least 1")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {', '.join(sorted(unknown))}; known: {', '.join(CONFIGS)}")
    return args


def main(argv=None) -> list[tuple[Config, dict]]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        pattern, limit = digit_shards(Path(scratch) / "shards", args.images, args.shards)
        images = limit or args.images
        rows = []
        for config in (CONFIGS[key] for key in args.configs.split(",")):
            result = measure(config, pattern, limit, args.methods, Path(scratch))
            if any(c["read"] != images or c["explained"] + c["errors"] != images for c in result["counts"].values()):
                raise SystemExit(f"{config.name}: counts do not reconcile: {result['counts']}")
            rows.append((config, result))
    print(f"{images} digits, methods {args.methods}, metrics on; CPU s = launcher + SDK workers\n")
    print(table(rows, images))
    return rows


if __name__ == "__main__":
    main()
