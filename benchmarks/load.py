"""Load test: peak memory, exact counts and throughput of the audit at growing sizes (not run in CI).

Full run (hours on 2 CPU cores):

    python benchmarks/load.py --parts digits,rgb --sizes 10000,35000,70000 --rgb-images 2000

digits: the 70,000 MNIST digits (10,000 test, then 60,000 train; ids prefixed mnist-test- and
    mnist-train-, so they are unique) as PNG tar shards of --shard-size; each size in --sizes audits
    the first N of them (the first N / shard-size shards) with --methods (default sal,grad,intg),
    metrics on, in a fresh subprocess that reports its own peak RSS (VmHWM). Counts must
    reconcile exactly: read == N == explained + errors for every method. Unless --no-loop, the
    bare loop of benchmarks/pipeline_vs_loop.py does the same work on the same shards in another
    subprocess, for images/s side by side. Peak RSS should grow by less than 10% from the smallest
    to the largest size.
rgb: --rgb-images distinct 224x224 RGB images (random crops and flips of skimage.data photographs,
    resized; PNG tar shards of --rgb-shard-size) through the untrained ResNet-18-shaped
    ``saliency_audit.pipelines.training.reference_model:resnet18``, one subprocess per method in --rgb-methods, each on
    the first min(--rgb-images, its count in RGB_IMAGES) images (rounded up to whole shards):
    slow methods get fewer. abele is left out unless --aae gives an autoencoder trained on such
    images (the bundled one is for 28x28 digits).

Reduced run for a shared 2-core machine, e.g.:

    python benchmarks/load.py --parts digits --sizes 1000,2000,4000 --intg-steps 8
    python benchmarks/load.py --parts rgb --rgb-images 50 --rgb-methods sal,grad,gradcam --rgb-no-metrics

--json FILE writes every figure. Threads: torch.set_num_threads(--threads) in every subprocess
(default 1, OMP_NUM_THREADS too).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_vs_loop import MODEL, WEIGHTS, Work, audit_argv, bare_loop, write_digit_shards  # noqa: E402

RGB_MODEL = "saliency_audit.pipelines.training.reference_model:resnet18"
RGB_SIZE = 224
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "cat")
# Images per method in the full RGB run: the perturbation and superpixel methods cost hundreds
# to thousands of ResNet-18 forwards per 224x224 image, so they get fewer.
RGB_IMAGES = {"sal": 2000, "grad": 2000, "gradcam": 2000, "deeplift": 2000, "elrp": 2000, "intg": 500,
              "smoothgrad": 500, "occlusion": 200, "mask": 200, "lime": 100, "anchor": 100, "lore": 100, "abele": 100}
# Occlusion's windows at 224 px, as its defaults now resolve them (before issue 25 the defaults were a
# fixed window 4, stride 2: 12,321 forwards per 224x224 image); kept explicit so older figures compare.
RGB_OPTIONS = {"occlusion": {"window": 32, "stride": 16}}


# --- children: one measurement each, in a fresh process ------------------------------------------

def child(spec: dict) -> dict:
    """Run one audit or one bare loop; its wall time, counts and this process's peak RSS."""
    import torch
    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["kind"] == "audit":
        from saliency_audit.pipelines import audit
        counts = audit.run(spec["argv"])["counts"]
    else:
        work = Work(**spec["work"])
        counts = bare_loop(work, Path(spec["output"]))
    seconds = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {"seconds": seconds, "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage), "counts": counts,
            # VmHWM: ru_maxrss would carry the parent's peak across fork and exec
            "peak_rss_mb": int(next(line.split()[1] for line in open("/proc/self/status")
                                    if line.startswith("VmHWM:"))) / 1024,
            "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def in_subprocess(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_shards(shards: list[str], count: int, directory: Path) -> str:
    """A glob over the first ``count`` shards (symlinked into ``directory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in shards[:count]:
        (directory / Path(shard).name).symlink_to(shard)
    return str(directory / "*.tar")


# --- digits ---------------------------------------------------------------------------------------

def digits(args, scratch: Path) -> list[dict]:
    sizes = sorted(args.sizes)
    if bad := [n for n in sizes if n % args.shard_size]:
        raise SystemExit(f"--sizes {bad} are not multiples of --shard-size {args.shard_size}")
    methods = {m: ({"n_steps": args.intg_steps} if m == "intg" and args.intg_steps else {}) for m in args.methods}
    shards = write_digit_shards(scratch / "digits", sizes[-1], args.shard_size, splits=("t10k", "train"))
    results = []
    for n in sizes:
        pattern = first_shards(shards, n // args.shard_size, scratch / f"digits-{n}")
        work = Work(sorted(str(p) for p in Path(pattern).parent.glob("*.tar")), methods, args.batch_size, True)
        row = {"images": n, "methods": ",".join(methods), "method_options": methods}
        audit = in_subprocess({"kind": "audit", "threads": args.threads,
                               "argv": audit_argv(work, pattern, scratch / f"out-{n}")}, args.threads)
        shutil.rmtree(scratch / f"out-{n}", ignore_errors=True)
        counts = audit["counts"]
        row.update(pipeline_s=audit["seconds"], pipeline_images_per_s=n / audit["seconds"],
                   pipeline_cpu_s=audit["cpu_s"],
                   peak_rss_mb=audit["peak_rss_mb"], counts=counts,
                   reconciled=all(c["read"] == n == c["explained"] + c["errors"] for c in counts.values()))
        if not args.no_loop:
            loop = in_subprocess({"kind": "loop", "threads": args.threads, "output": str(scratch / f"loop-{n}.parquet"),
                                  "work": {"shards": work.shards, "methods": methods, "batch_size": args.batch_size,
                                           "metrics": True}}, args.threads)
            row.update(loop_s=loop["seconds"], loop_images_per_s=n / loop["seconds"], loop_cpu_s=loop["cpu_s"],
                       loop_peak_rss_mb=loop["peak_rss_mb"],
                       loop_rows=loop["counts"]["rows"], ratio_to_loop=loop["seconds"] / audit["seconds"])
            (scratch / f"loop-{n}.parquet").unlink(missing_ok=True)
        print(json.dumps(row), flush=True)
        results.append(row)
    first, last = results[0]["peak_rss_mb"], results[-1]["peak_rss_mb"]
    print("\n| images | pipeline images/s | loop images/s | ratio | pipeline CPU s | loop CPU s | peak RSS MB "
          "| loop peak RSS MB | counts reconcile |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['images']} | {r['pipeline_images_per_s']:.1f} | {r.get('loop_images_per_s', float('nan')):.1f} | "
              f"{r.get('ratio_to_loop', float('nan')):.2f} | {r['pipeline_cpu_s']:.0f} | "
              f"{r.get('loop_cpu_s', float('nan')):.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r.get('loop_peak_rss_mb', float('nan')):.0f} | {r['reconciled']} |")
    print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} images: {100 * (last / first - 1):+.1f}% (goal: under +10%)")
    return results


# --- RGB photographs ------------------------------------------------------------------------------

def rgb_images(n: int):
    """``n`` distinct 224x224 RGB uint8 images: seeded random crops (40-100% of the short side) and
    flips of the skimage photographs, resized."""
    import numpy as np
    from PIL import Image
    from skimage import data
    photos = [getattr(data, name)()[..., :3] for name in PHOTOS]
    seen = set()
    i = 0
    while len(seen) < n:
        rng = np.random.default_rng(i)
        photo = photos[i % len(photos)]
        i += 1
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((RGB_SIZE, RGB_SIZE), Image.BILINEAR))
        key = image.tobytes()
        if key in seen:
            continue
        seen.add(key)
        yield image


def write_rgb_shards(directory: Path, n: int, shard_size: int) -> list[str]:
    from PIL import Image
    directory.mkdir(parents=True, exist_ok=True)
    paths, tar = [], None
    for i, image in enumerate(rgb_images(n)):
        if i % shard_size == 0:
            if tar:
                tar.close()
            paths.append(str(directory / f"rgb-{i // shard_size:06d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        info = tarfile.TarInfo(f"rgb-{i:06d}.png")
        info.size = len(buffer.getvalue())
        tar.addfile(info, io.BytesIO(buffer.getvalue()))
    if tar:
        tar.close()
    return paths


def rgb(args, scratch: Path) -> list[dict]:
    methods = [m for m in args.rgb_methods if m != "abele" or args.aae]
    counts = {m: min(args.rgb_images, RGB_IMAGES.get(m, args.rgb_images)) for m in methods}
    shards = write_rgb_shards(scratch / "rgb", max(counts.values()), args.rgb_shard_size)
    results = []
    for method in methods:
        n_shards = -(-counts[method] // args.rgb_shard_size)
        pattern = first_shards(shards, n_shards, scratch / f"rgb-{method}")
        options = {method: RGB_OPTIONS.get(method, {})}
        work = Work([], options, args.rgb_batch_size, not args.rgb_no_metrics, RGB_MODEL, None)
        argv = audit_argv(work, pattern, scratch / f"out-{method}") + ["--channels", "3"]
        if method == "abele":
            argv += ["--aae", args.aae]
        audit = in_subprocess({"kind": "audit", "threads": args.threads, "argv": argv}, args.threads)
        shutil.rmtree(scratch / f"out-{method}", ignore_errors=True)
        c = audit["counts"][method]
        row = {"method": method, "images": c["read"], "options": options[method], "seconds": audit["seconds"],
               "cpu_s": audit["cpu_s"],
               "images_per_s": c["read"] / audit["seconds"], "peak_rss_mb": audit["peak_rss_mb"], "counts": c,
               "reconciled": c["read"] == c["explained"] + c["errors"], "metrics": not args.rgb_no_metrics}
        print(json.dumps(row), flush=True)
        results.append(row)
    print("\n| method | images | s | images/s | peak RSS MB | counts reconcile |\n|---|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['method']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['reconciled']} |")
    if "abele" in args.rgb_methods and not args.aae:
        print("abele left out: it needs --aae, an autoencoder trained on 224x224 RGB images")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    csv = lambda text: [v.strip() for v in text.split(",") if v.strip()]  # noqa: E731
    add("--parts", type=csv, default=["digits", "rgb"], help="digits, rgb or both (default both)")
    add("--sizes", type=lambda t: [int(v) for v in csv(t)], default=[10_000, 35_000, 70_000],
        help="digit counts, multiples of --shard-size (default 10000,35000,70000; at most 70000)")
    add("--shard-size", type=int, default=1000)
    add("--methods", type=csv, default=["sal", "grad", "intg"])
    add("--intg-steps", type=int, help="intg's n_steps (default: the method's 50)")
    add("--batch-size", type=int, default=32)
    add("--no-loop", action="store_true", help="skip the bare loop next to each digits size")
    add("--rgb-images", type=int, default=2000, help="distinct 224x224 images (per method at most RGB_IMAGES[m])")
    add("--rgb-methods", type=csv, default=list(RGB_IMAGES))
    add("--rgb-shard-size", type=int, default=50)
    add("--rgb-batch-size", type=int, default=16)
    add("--rgb-no-metrics", action="store_true", help="skip the metrics in the RGB part")
    add("--aae", help="autoencoder for abele in the RGB part (trained on 224x224 RGB)")
    add("--threads", type=int, default=1, help="torch threads in every subprocess (default 1)")
    add("--scratch", help="working directory (default: a temporary one, removed)")
    add("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if bad := set(args.parts) - {"digits", "rgb"}:
        parser.error(f"unknown part(s) {', '.join(sorted(bad))}; known: digits, rgb")
    if args.sizes and max(args.sizes) > 70_000:
        parser.error("--sizes: MNIST has 70,000 digits")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="load-"))
    figures = {"threads": args.threads}
    try:
        if "digits" in args.parts:
            figures["digits"] = digits(args, scratch)
        if "rgb" in args.parts:
            figures["rgb"] = rgb(args, scratch)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return figures
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
