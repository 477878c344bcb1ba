"""Incremental audits: what a scheduled run over a growing input costs, side by side with a full
audit of the same input (not run in CI).

    python benchmarks/incremental.py [--images 2000] [--shards 5] [--methods sal,grad,intg]

Digits: the first --images of the MNIST test set in ../shared/data/mnist, as --shards PNG tar
shards (without those files, the bundled sample). Three runs, in one process, one torch thread:

1. ``full``: a plain audit of every shard (what a schedule without --incremental redoes each time);
2. ``first``: an incremental run over all shards but the last (slot 1), then
3. ``grown``: the next slot, after the last shard arrived: it reads and explains only that one;
4. ``rerun``: slot 2 again (idempotent: the same images again, the slot's row replaced).

Figures: wall seconds, images explained and skipped, and the ratio ``grown / full``, which the
new shard's share of the input bounds from below (the history's id listing and the planning are
the overhead). A Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saliency_audit.pipelines import audit  # noqa: E402
from saliency_audit.pipelines.cli import DEMO_MODEL, DEMO_SHARD, DEMO_WEIGHTS  # noqa: E402
from saliency_audit.transforms.io import history  # noqa: E402

MNIST = ROOT.parent / "shared/data/mnist"


def make_shards(images: int, shards: int, directory: Path) -> list[Path]:
    from saliency_audit.pipelines.training.mnist import load_mnist_split, write_tar_shards
    if (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pixels, labels = load_mnist_split(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    else:  # the bundled sample: decode it back
        import io
        import tarfile

        import numpy as np
        from PIL import Image
        with tarfile.open(DEMO_SHARD) as tar:
            names = sorted(m.name for m in tar.getmembers())
            keys = sorted({n.rsplit(".", 1)[0] for n in names})
            pixels = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{k}.png").read()))) for k in keys])
            labels = np.array([int(tar.extractfile(f"{k}.cls").read()) for k in keys])
    n = min(images, len(pixels))
    size = -(-n // shards)
    return [Path(p) for p in write_tar_shards(pixels[:n], labels[:n], directory, size, "digits")]


def timed(argv: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = audit.run(argv)
    return time.perf_counter() - start, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--methods", default="sal,grad,intg")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="incremental-bench-"))
    try:
        shards = make_shards(args.images, args.shards, work / "all")
        growing = work / "growing"
        growing.mkdir()
        base = ["--model", DEMO_MODEL, "--weights", str(DEMO_WEIGHTS), "--channels", "1", "--methods", args.methods,
                "--torch-threads", "1", "--device", "cpu"]
        results = []
        seconds, m = timed(["--input", str(work / "all" / "*.tar"), *base, "--output", str(work / "full")])
        results.append(("full", seconds, m))
        for shard in shards[:-1]:
            shutil.copy(shard, growing / shard.name)
        incremental = ["--input", str(growing / "*.tar"), *base, "--output", str(work / "history"), "--incremental"]
        seconds, m = timed([*incremental, "--slot", "slot-1"])
        results.append(("first", seconds, m))
        shutil.copy(shards[-1], growing / shards[-1].name)
        seconds, m = timed([*incremental, "--slot", "slot-2"])
        results.append(("grown", seconds, m))
        seconds, m = timed([*incremental, "--slot", "slot-2"])
        results.append(("rerun", seconds, m))
        rows = history.read(str(work / "history"))
        pairs = history.saliency_dataset(str(work / "history")).to_table(columns=["image_id", "method"])
        unique = len(set(zip(pairs["image_id"].to_pylist(), pairs["method"].to_pylist())))
        print(f"{args.images} digits in {len(shards)} shards, methods {args.methods}, one torch thread\n")
        print("| run | seconds | shards read | explained (pairs) | skipped (pairs) |")
        print("|---|---|---|---|---|")
        for name, seconds, m in results:
            explained = sum(c["explained"] for c in m["counts"].values())
            skipped = sum(c.get("skipped", 0) for c in m["counts"].values())
            read = (m.get("incremental") or {}).get("shards_read", m["input"]["shards"])
            print(f"| {name} | {seconds:.1f} | {read} of {m['input']['shards']} | {explained} | {skipped} |")
        full, grown = results[0][1], results[2][1]
        print(f"\ngrown / full: {grown / full:.3f} (the new shard is {1 / len(shards):.3f} of the input); history: "
              f"{len(rows)} slot(s), {pairs.num_rows} (image, method) rows, {unique} distinct")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
