"""Every gradient and CAM method against the model's own speed, on an accelerator, in one call.

    python benchmarks/gpu_benchmark.py --json acc.json --markdown acc.md     # a CUDA machine: under 8 minutes
    python benchmarks/gpu_benchmark.py --reduced                             # CI: tiny models at 32 px on the CPU
    OMP_NUM_THREADS=1 python benchmarks/gpu_benchmark.py --device cpu --threads 1 --models resnet50,vit_s16 \\
        --precisions fp32 --methods all --no-metric --no-pipeline --images 0 --batch-size 2 --target-seconds 0 \\
        --warmup 2 --repeats 2 --max-seconds-per-image 5 --clock cpu --budget 2400   # the CPU table at 224 px: ~15 min

What it does, in order, within --budget seconds (methods left when it runs out are reported, not run):

1. writes --images synthetic 224x224 JPEGs (smooth random colour fields with shapes, quality 90) into
   --shards WebDataset tar shards, and decodes and preprocesses them all with the job's own reader
   (read_shard, decode, preprocess: ImageNet normalisation) in one process and in --workers processes:
   the decode figures;
2. for each model (Hugging Face `transformers` ResNet-50 and ViT-B/16 by default, random weights,
   1,000 classes, wrapped in LogitsOnly as `--model hf:` loads them) and each precision (fp32: IEEE
   float32, TF32 off; bf16: the model's forwards under autocast, as `run --precision bf16` runs them,
   saliency_audit.transforms.model.precision.at_precision), times every gradient and CAM method (and on
   a ViT the transformer methods) and deletion/insertion (the job's metric, 16 steps, on one map per
   image) with saliency_audit.pipelines.benchmark.benchmark_methods: images/s, the ratio to the floor
   (the model's own forward and forward+backward images/s at --batch-size and the same precision,
   over passes()), the peak memory per image (the CUDA allocator's peak on a GPU; on a CPU the
   process's peak resident set above its level at the call's start, PeakMemory), and the hours
   50,000 and 1,281,167 images take;
3. the pipeline figure: every shard image read, decoded in --workers processes, batched in pinned
   memory, copied to the device and explained with `sal`, end to end (a plain loop, not Beam).

Each method's batch is the largest power of two up to --batch-size whose call takes at most
--target-seconds (one call on one image decides), so the slow ones (scorecam's 1 + 2,048 forwards
per image, xrai's segmentation) fit the budget; the floor stays the model's at --batch-size. Method
options are the defaults (--max-seconds-per-image cuts a count option to fit, and extrapolates).
--reduced is CI's mode (the tests' 32 px models, 16 images, the CPU): it checks that the script
runs, not its timings. Results: docs/performance.md.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import multiprocessing
import platform
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROJECTIONS = (50_000, 1_281_167)  # ImageNet validation, ImageNet training
FAMILIES = ("gradient", "cam", "transformer")
TINY = {"resnet50": "resnet50", "vit_b16": "vit", "vit_s16": "vit"}  # --reduced: the tests' 32 px models
DELETION = "deletion/insertion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if there is one), cuda, cuda:N or cpu")
    parser.add_argument("--models", default="resnet50,vit_b16", help="resnet50, vit_b16, vit_s16")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--methods", default="default",
                        help="'default' (every gradient, CAM and, on a ViT, transformer method), 'all' (every "
                             "method that needs no file), or a comma list")
    parser.add_argument("--no-metric", action="store_true", help="leave out deletion/insertion")
    parser.add_argument("--no-pipeline", action="store_true", help="leave out the pipeline figure")
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs for the decode and pipeline figures")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--target-seconds", type=float, default=0.5,
                        help="longest call a method's batch may take (0: every method at --batch-size)")
    parser.add_argument("--max-seconds-per-image", type=float, default=None,
                        help="cut a method's count option (n_steps...) to fit; skip one that has none")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=0.25, help="shortest timed round")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu (on a CPU device): the process's CPU seconds, so waiting for a core on a busy "
                             "machine does not count; meant for --threads 1")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for the whole run")
    parser.add_argument("--workers", type=int, default=0, help="decode processes (0: one per core)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--scratch", default=None, help="folder for the shards (default: a temporary one)")
    parser.add_argument("--reduced", action="store_true", help="CI: the tests' 32 px models, 16 images, the CPU")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in TINY]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: {', '.join(TINY)}")
    args.precisions = [p for p in args.precisions.split(",") if p]
    if not set(args.precisions) <= {"fp32", "bf16"}:
        parser.error("--precisions: fp32, bf16")
    if args.reduced:
        args.device, args.size, args.batch_size = "cpu", 32, min(args.batch_size, 4)
        args.images, args.shards, args.target_seconds = min(args.images, 16), min(args.shards, 2), 0.05
        args.repeats, args.warmup, args.min_seconds, args.workers = 1, 1, 0.0, 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- data ---------------------------------------------------------------------------------------------

def synthetic_jpeg(index: int, size: int) -> bytes:
    """A size x size colour JPEG: a smooth random field with a few filled shapes (what JPEG and the
    resize see in photographs: gradients and edges), different for every index."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(index)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: Path, images: int, shards: int, size: int) -> list[str]:
    """``images`` synthetic JPEGs with a label each, split over ``shards`` tar files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"synthetic-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, images, shards):
                for name, data in ((f"{i:07d}.jpg", synthetic_jpeg(i, size)), (f"{i:07d}.cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def preprocessing(size: int):
    from saliency_audit.transforms.io.preprocess import Preprocessing
    return Preprocessing(resize=(size, size), channels=3, mean=MEAN, std=STD)


def decode_shard(url: str, size: int) -> np.ndarray:
    """One shard through the job's reader, decoder and preprocessing: [n,3,size,size] float32."""
    torch.set_num_threads(1)
    from saliency_audit.transforms.io.preprocess import decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    from saliency_audit.transforms.io.records import RawImage
    prep = preprocessing(size)
    arrays = [preprocess(decode(r, prep.max_pixels), prep) for r in read_shard(url, max_pixels=prep.max_pixels)
              if isinstance(r, RawImage)]
    return np.stack(arrays)


def decode_figures(pool: ProcessPoolExecutor, shards: list[str], size: int, workers: int) -> tuple[dict, torch.Tensor]:
    """Images/s decoding every shard in this process, then in the pool's ``workers`` processes; and the images."""
    start = time.perf_counter()
    decoded = [decode_shard(url, size) for url in shards]
    one = time.perf_counter() - start
    n = sum(len(d) for d in decoded)
    list(pool.map(decode_shard, shards[:1] * workers, [size] * workers))  # start-up and imports, not decoding
    start = time.perf_counter()
    list(pool.map(decode_shard, shards, [size] * len(shards)))
    many = time.perf_counter() - start
    return ({"images": n, "one_process_images_per_s": n / one, "workers": workers,
             "workers_images_per_s": n / many}, torch.from_numpy(np.concatenate(decoded)))


def pipeline_figure(pool: ProcessPoolExecutor, model, shards: list[str], size: int, batch: int,
                    device: torch.device) -> dict:
    """Shards -> decode (the pool's processes) -> pinned batches -> device -> sal, end to end."""
    from saliency_audit.explainers import get_explainer
    explainer = get_explainer("sal", model)
    pin = device.type == "cuda"
    done, start = 0, time.perf_counter()
    pending = np.zeros((0, 3, size, size), np.float32)
    for arrays in pool.map(decode_shard, shards, [size] * len(shards)):
        pending = np.concatenate([pending, arrays])
        while len(pending) >= batch:
            chunk, pending = pending[:batch], pending[batch:]
            done += _explain_chunk(model, explainer, chunk, device, pin)
    if len(pending):
        done += _explain_chunk(model, explainer, pending, device, pin)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"method": "sal", "images": done, "batch_size": batch, "seconds": seconds, "images_per_s": done / seconds}


def _explain_chunk(model, explainer, chunk: np.ndarray, device: torch.device, pin: bool) -> int:
    host = torch.from_numpy(chunk)
    x = (host.pin_memory() if pin else host).to(device, non_blocking=pin)
    with torch.inference_mode():
        targets = model(x).argmax(dim=1)
    maps = explainer.explain(x, targets.clone()).maps
    maps.to("cpu")  # the job stores every map: it comes back to the host
    return len(chunk)


# --- models and methods -------------------------------------------------------------------------------

def build_model(name: str, reduced: bool) -> torch.nn.Module:
    """Random weights, 1,000 classes, as `--model hf:FOLDER` would give it (LogitsOnly, eager attention)."""
    from saliency_audit.transforms.model.hf import LogitsOnly
    if reduced:
        from hf_models import logits_model
        model = logits_model(TINY[name])
    else:
        import transformers as t
        torch.manual_seed(0)
        if name == "resnet50":
            hf = t.ResNetForImageClassification(t.ResNetConfig(num_labels=1000))  # the defaults are ResNet-50
        elif name == "vit_b16":
            hf = t.ViTForImageClassification(t.ViTConfig(num_labels=1000))  # the defaults are ViT-B/16 at 224 px
        else:
            hf = t.ViTForImageClassification(t.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                         intermediate_size=1536, num_labels=1000))
        model = LogitsOnly(hf)
    model.eval().requires_grad_(False)  # as the job loads models: gradients reach the input only
    return model


def chosen_methods(spec: str, model_name: str) -> list[str]:
    """'default': every gradient and CAM method, and on a ViT the transformer methods; 'all': every
    method but the controls and those that need a file (abele's autoencoder); else the list given."""
    from saliency_audit.explainers import explainer_class, list_methods, method_parameters
    if spec not in ("default", "all"):
        return [m for m in spec.split(",") if m]
    vit = model_name.startswith("vit")
    out = []
    for name in list_methods():
        cls = explainer_class(name)
        family = cls.__module__.split(".")[-2]  # saliency_audit.explainers.gradient.saliency -> gradient
        if cls.control or (cls.needs_attention and not vit):
            continue
        if spec == "default" and (family not in FAMILIES or (family == "transformer" and not vit)):
            continue
        if any(v is inspect.Parameter.empty for v in method_parameters(name).values()):
            continue
        out.append(name)
    return out


def deletion_task(model, steps: int = 16):
    """The job's deletion/insertion metric on one map per image (a random one: the cost does not
    depend on the map), as Task for benchmark_methods: 2 x (steps + 1) forwards per image."""
    from saliency_audit.explainers.metrics.causal import DeletionInsertion, random_maps
    from saliency_audit.explainers.metrics.registry import MetricBatch
    from saliency_audit.pipelines.benchmark import Task
    metric = DeletionInsertion({"metric_steps": steps, "metric_substrate": "zero"})

    def run(x, targets, seeds):
        maps = random_maps(x.shape[:1] + x.shape[2:], seeds, device=x.device)
        with torch.no_grad():
            return metric.score(MetricBatch(model, x, targets, seeds, targets), maps, {})
    return Task(run, {"forward": 2 * (steps + 1), "backward": 0})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"


def main(argv: list[str] | None = None) -> dict:
    from saliency_audit.pipelines.benchmark import benchmark_methods, markdown_table
    from saliency_audit.transforms.model.precision import at_precision, set_matmul_precision
    from saliency_audit.transforms.model.threads import available_cores
    args = parse_args(argv)
    began = time.perf_counter()
    deadline = began + args.budget
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workers = args.workers or available_cores()
    # decoding processes never touch CUDA, but a process forked from one that has it is fragile
    context = multiprocessing.get_context("spawn" if device.type == "cuda" else None)
    figures: dict = {"device": device_name(device), "torch": torch.__version__, "size": args.size, "clock": args.clock,
                     "batch_size": args.batch_size, "reduced": args.reduced, "projections": list(PROJECTIONS),
                     "runs": []}
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch, ProcessPoolExecutor(workers, context) as pool:
        shards, images = [], None
        if args.images:
            start = time.perf_counter()
            shards = write_shards(Path(scratch), args.images, args.shards, args.size)
            figures["shards"] = {"images": args.images, "shards": len(shards),
                                 "seconds_to_write": time.perf_counter() - start}
            figures["decode"], images = decode_figures(pool, shards, args.size, workers)
        if images is None:  # no shards: the same synthetic images, decoded in memory
            from saliency_audit.transforms.io.preprocess import decode, preprocess
            from saliency_audit.transforms.io.records import RawImage
            prep = preprocessing(args.size)
            images = torch.from_numpy(np.stack([
                preprocess(decode(RawImage(f"{i}", "memory", synthetic_jpeg(i, args.size), "jpg"), prep.max_pixels),
                           prep) for i in range(8)]))
        sample = images[:args.batch_size].to(device)
        for model_name in args.models:
            model = build_model(model_name, args.reduced).to(device)
            methods = chosen_methods(args.methods, model_name)
            for precision in args.precisions:
                set_matmul_precision(precision, device)
                runs = at_precision(model, precision, device)
                tasks = {} if args.no_metric else {DELETION: deletion_task(runs)}
                rows = benchmark_methods(runs, sample, methods, batch_size=args.batch_size, repeats=args.repeats,
                                         warmup=args.warmup, target_seconds=args.target_seconds or None,
                                         max_seconds_per_image=args.max_seconds_per_image, tasks=tasks,
                                         deadline=deadline, min_seconds=args.min_seconds, clock=args.clock)
                for row in rows:
                    rate = row.get("images_per_s_at_defaults", row.get("images_per_s"))
                    row["hours"] = {str(n): (n / rate / 3600 if rate else None) for n in PROJECTIONS}
                run = {"model": model_name, "precision": precision, "rows": rows}
                if shards and not args.no_pipeline and time.perf_counter() < deadline:
                    run["pipeline"] = pipeline_figure(pool, runs, shards, args.size, args.batch_size, device)
                figures["runs"].append(run)
                print(f"\n{model_name}, {precision}: {time.perf_counter() - began:.0f} s so far", file=sys.stderr)
    figures["seconds"] = time.perf_counter() - began
    text = report(figures, markdown_table)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return figures


def report(figures: dict, markdown_table) -> str:
    lines = [f"Device: {figures['device']}; torch {figures['torch']}; {figures['size']} px; batch up to "
             f"{figures['batch_size']}; {figures['seconds']:.0f} s in all."]
    if "decode" in figures:
        d = figures["decode"]
        lines.append(f"Decode ({d['images']} synthetic JPEGs, the job's reader, decode and preprocessing): "
                     f"{d['one_process_images_per_s']:,.0f} images/s in one process, "
                     f"{d['workers_images_per_s']:,.0f} in {d['workers']}.")
    for run in figures["runs"]:
        lines += ["", f"### {run['model']}, {run['precision']}", ""]
        if "pipeline" in run:
            p = run["pipeline"]
            lines += [f"Pipeline (shards -> decode -> device -> sal, batch {p['batch_size']}): "
                      f"{p['images_per_s']:,.1f} images/s over {p['images']} images.", ""]
        lines.append(markdown_table(run["rows"], PROJECTIONS))
    lines.append("\n\\* extrapolated: a method run with a reduced count (its ratio times the floor at the count "
                 "given), or not run (its floor).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
