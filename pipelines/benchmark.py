"""Throughput of every method next to the model's own: how close each gets to its floor.

    python -m saliency_audit.pipelines.benchmark --methods sal,grad,elrp,occlusion --batch-size 64

A method that needs f forward and b backward passes per image can at best run at
    floor = 1 / (b / fwd_bwd + (f - b) / fwd)   images/s,
where fwd and fwd_bwd are the model's measured forward and forward+backward throughput
at the same batch size: b forward+backward pairs plus f - b extra forwards (fwd / f for
forward-only methods, fwd_bwd / n for n-step gradient methods).  ``ratio`` = measured
images/s / floor; well below 1 means overhead outside the model (Python loops, small
batches, host-device copies) worth a look.
"""
from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_audit.explainers import get_explainer, list_methods, method_parameters

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


def _timed(fn, device: torch.device, repeats: int, min_seconds: float = 0.25) -> float:
    """Seconds per fn() call in the fastest of ``repeats`` rounds, after two warm-up calls.

    A round repeats fn() until ``min_seconds`` have passed, so fast calls (one model
    forward) are not measured by a single noisy sample; slow ones run once per round.
    The fastest round is the usual estimate when other processes share the machine:
    interference only ever adds time.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(2):  # first calls pay for allocator growth, kernel selection, thread start-up
        fn()
    rounds = []
    for _ in range(repeats):
        sync()
        start, calls = time.perf_counter(), 0
        while True:
            fn()
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rounds.append(elapsed / calls)
    return min(rounds)


def floor_images_per_s(passes: dict[str, int], forward: float, forward_backward: float) -> float:
    """Best possible images/s for a method with these passes per image (see module doc)."""
    f, b = passes.get("forward", 0), passes.get("backward", 0)
    seconds = b / forward_backward + max(f - b, 0) / forward
    return float("inf") if seconds == 0 else 1.0 / seconds


def benchmark_methods(model: torch.nn.Module, images: torch.Tensor, methods: list[str], *,
                      batch_size: int = 64, repeats: int = 3,
                      method_options: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """Measure the model and each method on one batch of ``batch_size`` images.

    images: [N,C,H,W] on the device to measure (tiled if N < batch_size); targets are the
    model's predictions.  Returns one dict per row: the model's forward and
    forward+backward passes first (the best readings of the run), then each method with
    ``images_per_s``,
    ``forward_passes``, ``backward_passes`` (per image, from passes()), ``floor_images_per_s``
    (from the model's throughput measured right after the method) and ``ratio``; a method
    that fails gets its ``error`` instead of timings.
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor [N,C,H,W], got {tuple(images.shape)}")
    if batch_size < 1 or repeats < 1:
        raise ValueError("batch_size and repeats must be >= 1")
    method_options = method_options or {}
    device = images.device
    reps = -(-batch_size // len(images))
    x = images.repeat(reps, 1, 1, 1)[:batch_size].contiguous()
    with torch.inference_mode():
        targets = model(x).argmax(dim=1)
    targets = targets.clone()
    seeds = torch.arange(batch_size, dtype=torch.int64)

    def forward():
        with torch.inference_mode():
            model(x)

    def forward_backward():
        xg = x.detach().requires_grad_(True)
        score = model(xg).gather(1, targets[:, None]).sum()
        torch.autograd.grad(score, xg)

    def model_throughput() -> tuple[float, float]:
        return batch_size / _timed(forward, device, repeats), batch_size / _timed(forward_backward, device, repeats)

    fwd, fwd_bwd = model_throughput()
    rows = []
    for name in methods:
        row: dict[str, Any] = {"method": name, "options": method_options.get(name, {})}
        try:
            explainer = get_explainer(name, model, **method_options.get(name, {}))
            seconds = _timed(lambda: explainer.explain(x, targets, seeds), device, repeats)
            # The model's throughput again, right after the method's, so that load from
            # other work on a shared machine weighs on the method and its floor alike.
            near = model_throughput()
            fwd, fwd_bwd = max(fwd, near[0]), max(fwd_bwd, near[1])
            passes = explainer.passes()
            floor = floor_images_per_s(passes, max(near[0], 1e-12), max(near[1], 1e-12))
            row.update(images_per_s=batch_size / seconds, forward_passes=passes.get("forward", 0),
                       backward_passes=passes.get("backward", 0), floor_images_per_s=floor,
                       ratio=batch_size / seconds / floor)
        except Exception as e:  # report and go on: one broken method should not hide the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
    model_rows = [
        {"method": "(model forward)", "images_per_s": fwd, "forward_passes": 1, "backward_passes": 0,
         "floor_images_per_s": fwd, "ratio": 1.0},
        {"method": "(model forward+backward)", "images_per_s": fwd_bwd, "forward_passes": 1, "backward_passes": 1,
         "floor_images_per_s": fwd_bwd, "ratio": 1.0},
    ]
    return model_rows + rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | images/s | passes/image (fwd+bwd) | floor images/s | ratio |",
             "|---|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['images_per_s']:,.1f} | {r['forward_passes']}+{r['backward_passes']} "
                     f"| {r['floor_images_per_s']:,.1f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def load_tar_images(path: Path, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` KEY.png (+ KEY.cls) samples of a WebDataset tar as [N,1,H,W] in [0,1]."""
    from PIL import Image

    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)
            if key not in samples:
                if len(order) == limit:
                    break
                samples[key] = {}
                order.append(key)
            samples[key][ext] = tar.extractfile(member).read()
    images, labels = [], []
    for key in order:
        if "png" not in samples[key]:
            continue
        pixels = np.asarray(Image.open(io.BytesIO(samples[key]["png"])).convert("L"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(pixels)[None])
        labels.append(int(samples[key].get("cls", b"-1").decode().strip() or -1))
    return torch.stack(images), torch.tensor(labels)


def demo_model_and_images(batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The demo MNIST CNN and digits when pipelines/demo_data has them, else an untrained
    CNN on random digits-shaped images."""
    from saliency_audit.pipelines.training.reference_model import mnist_cnn

    model = mnist_cnn()
    weights, shard = DEMO_DATA / "mnist_cnn.pt", DEMO_DATA / "mnist-test-sample.tar"
    source = []
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        source.append(f"weights {weights.name}")
    else:
        source.append("untrained model (no demo weights)")
    if shard.exists():
        images, _ = load_tar_images(shard, batch_size)
        source.append(f"{len(images)} images from {shard.name}")
    else:
        images = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        source.append("random images (no demo shard)")
    return model.eval(), images, ", ".join(source)


def _runnable_methods() -> list[str]:
    """Registered methods that need no required option."""
    return [m for m in list_methods()
            if all(v is not inspect.Parameter.empty for v in method_parameters(m).values())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--options", default="{}",
                        help='JSON {method: {option: value}}, e.g. \'{"intg": {"n_steps": 20}}\'')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = (_runnable_methods() if args.methods == "all"
               else [m.strip() for m in args.methods.split(",") if m.strip()])
    model, images, source = demo_model_and_images(args.batch_size)
    device = torch.device(args.device)
    model, images = model.to(device), images.to(device)
    rows = benchmark_methods(model, images, methods, batch_size=args.batch_size, repeats=args.repeats,
                             method_options=json.loads(args.options))
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"batch {args.batch_size}, fastest of {args.repeats} rounds; {source}\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
