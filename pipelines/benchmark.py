"""Throughput of every method next to the model's own: how close each gets to its floor.

    python -m saliency_audit.pipelines.benchmark --methods sal,grad,elrp,occlusion --batch-size 64

A method that needs f forward and b backward passes per image can at best run at
    floor = 1 / (b / fwd_bwd + (f - b) / fwd)   images/s,
where fwd and fwd_bwd are the model's measured forward and forward+backward throughput
at the same batch size: b forward+backward pairs plus f - b extra forwards (fwd / f for
forward-only methods, fwd_bwd / n for n-step gradient methods).  ``ratio`` = measured
images/s / floor; well below 1 means overhead outside the model (Python loops, small
batches, host-device copies) worth a look. Each row also has the peak memory per image
(PeakMemory). benchmarks/gpu_benchmark.py runs the same measurement on ResNet-50 and ViT-B/16 at
224 px, on a GPU or a CPU (docs/performance.md).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import inspect
import io
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from saliency_audit.explainers import explainer_class, get_explainer, list_methods, method_parameters

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"


SCALABLE = {"intg": "n_steps", "smoothgrad": "n_samples", "expected_gradients": "n_samples", "xrai": "n_steps",
            "rise": "n_masks", "mask": "n_iter", "lime": "n_samples"}  # a count that passes() grows with
MIN_SCALED = 2


@dataclasses.dataclass
class Task:
    """Work timed beside the methods (a metric): ``fn(images, targets, seeds)`` and its passes per image."""
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]
    passes: dict[str, int]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(fn, device: torch.device, repeats: int, min_seconds: float = 0.25, warmup: int = 2,
           clock=time.perf_counter) -> float:
    """Seconds per fn() call in the fastest of ``repeats`` rounds, after ``warmup`` calls.

    A round repeats fn() until ``min_seconds`` have passed, so fast calls (one model
    forward) are not measured by a single noisy sample; slow ones run once per round.
    The fastest round is the usual estimate when other processes share the machine:
    interference only ever adds time.
    """
    for _ in range(warmup):  # first calls pay for allocator growth, kernel selection, thread start-up
        fn()
    rounds = []
    for _ in range(repeats):
        _sync(device)
        start, calls = clock(), 0
        while True:
            fn()
            calls += 1
            _sync(device)
            elapsed = clock() - start
            if elapsed >= min_seconds:
                break
        rounds.append(elapsed / calls)
    return min(rounds)


class PeakMemory:
    """Peak memory in bytes above the level at entry of what runs inside (``bytes``): the CUDA
    allocator's peak on a GPU; on a CPU the process's peak resident set (Linux: VmHWM, reset
    through /proc/self/clear_refs), None where that cannot be reset. On a CPU, blocks of 64 KiB and
    more are mapped afresh inside and unmapped when freed (glibc's mmap threshold, lowered inside
    and set to its 32 MiB ceiling after), so that memory the heap kept from earlier work neither
    hides new allocations nor counts: slower, so watch untimed calls only. Small blocks may still
    reuse the heap: a lower bound, to a few MiB."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.start = device, None, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim(0)
            libc.mallopt(M_MMAP_THRESHOLD, 64 << 10)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = _proc_status("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self.start is not None:
            self.bytes = max(0, _proc_status("VmHWM") - self.start)
            ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 32 << 20)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def floor_images_per_s(passes: dict[str, int], forward: float, forward_backward: float) -> float:
    """Best possible images/s for a method with these passes per image (see module doc)."""
    f, b = passes.get("forward", 0), passes.get("backward", 0)
    seconds = b / forward_backward + max(f - b, 0) / forward
    return float("inf") if seconds == 0 else 1.0 / seconds


def hours_for(images: int, images_per_s: float | None) -> float | None:
    """Hours to explain ``images`` at ``images_per_s`` on one device (None where there is no rate)."""
    return images / images_per_s / 3600 if images_per_s else None


def benchmark_methods(model: torch.nn.Module, images: torch.Tensor, methods: list[str], *,
                      batch_size: int = 64, repeats: int = 3,
                      method_options: dict[str, dict[str, Any]] | None = None, warmup: int = 2,
                      target_seconds: float | None = None, max_seconds_per_image: float | None = None,
                      tasks: dict[str, Task] | None = None, deadline: float | None = None,
                      min_seconds: float = 0.25, clock: str = "wall") -> list[dict]:
    """Measure the model and each method (then each of ``tasks``) on batches of the images.

    images: [N,C,H,W] on the device to measure (tiled to the batch size); targets are the
    model's predictions. Returns one dict per row: the model's forward and forward+backward
    passes at ``batch_size`` first (the best readings of the run), then each method with
    ``batch_size``, ``images_per_s``, ``forward_passes``, ``backward_passes`` (per image, from
    passes()), ``floor_images_per_s`` (from the model's throughput at ``batch_size``, measured
    in rounds taking turns with the method's), ``ratio`` and ``peak_bytes_per_image`` (PeakMemory
    over the last warm-up call, divided by the batch); a method that fails gets its ``error``
    instead of timings.

    ``target_seconds``: each method's batch is the largest power of two up to ``batch_size``
    whose call should take at most this long, judged by one call on one image (the first,
    which is also a warm-up). Its floor stays the model's at ``batch_size``: the best the model
    does, which a method that batches its passes inside (intg's steps, scorecam's channels) can
    reach from a smaller batch. ``min_seconds``: the shortest timed round (see _timed). ``clock``:
    "wall" (elapsed seconds), or on a CPU "cpu" (the process's CPU seconds: on a machine shared with
    other work, time spent waiting for a core is not counted, so a one-thread run measures what a
    core of its own would do).

    ``max_seconds_per_image``: a method that would take longer per image at its floor is run with
    its count option (SCALABLE) cut to fit, its images/s at the options given extrapolated as
    ratio x floor (``images_per_s_at_defaults``, ``extrapolated``, ``passes_at_defaults``); one
    without such an option is not run (``skipped``) and gets its floor. ``model_images_per_s``: the
    model's forward and forward+backward readings the row's floor was made of. ``deadline`` (a
    time.perf_counter() reading): rows not begun by then get the error "not run: the time budget
    ran out".
    """
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor [N,C,H,W], got {tuple(images.shape)}")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch_size and repeats must be >= 1, warmup >= 0")
    method_options = method_options or {}
    device = images.device
    if clock not in CLOCKS or (clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"clock must be 'wall', or 'cpu' on a CPU device, got {clock!r} on {device.type}")
    tick = CLOCKS[clock]
    batches: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def batch(n: int):
        if n not in batches:
            x = images.repeat(-(-n // len(images)), 1, 1, 1)[:n].contiguous()
            with torch.inference_mode():
                targets = model(x).argmax(dim=1)
            batches[n] = x, targets.clone(), torch.arange(n, dtype=torch.int64)
        return batches[n]

    def model_throughput(n: int, rounds: int, warm: int, watch: bool = False) -> tuple[float, float, int | None]:
        x, targets, _ = batch(n)

        def forward():
            with torch.inference_mode():
                model(x)

        def forward_backward():
            xg = x.detach().requires_grad_(True)
            score = model(xg).gather(1, targets[:, None]).sum()
            torch.autograd.grad(score, xg)
        fwd = n / _timed(forward, device, rounds, min_seconds, warm, tick)
        fwd_bwd = n / _timed(forward_backward, device, rounds, min_seconds, warm, tick)
        if not watch:
            return fwd, fwd_bwd, None
        with PeakMemory(device) as peak:  # one more call, warm and untimed
            forward_backward()
        return fwd, fwd_bwd, peak.bytes

    fwd, fwd_bwd, model_peak = model_throughput(batch_size, repeats, warmup, watch=True)
    rows = []
    for name in [*methods, *(tasks or {})]:
        task = (tasks or {}).get(name) if name not in methods else None
        options = dict(method_options.get(name, {})) if task is None else {}
        row: dict[str, Any] = {"method": name, "options": options}
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({**row, "error": "not run: the time budget ran out"})
            continue
        try:
            explainer = get_explainer(name, model, **options) if task is None else None
            run = task.fn if task is not None else explainer.explain
            passes = (lambda: task.passes) if task is not None else explainer.passes
            at_defaults = None
            if max_seconds_per_image is not None:
                projected = 1 / floor_images_per_s(passes(), fwd, fwd_bwd)
                if projected > max_seconds_per_image:
                    option = SCALABLE.get(name) if task is None else None
                    row.update(forward_passes=passes().get("forward", 0), backward_passes=passes().get("backward", 0),
                               projected_seconds_per_image=projected, extrapolated=True)
                    if option is None:
                        floor = floor_images_per_s(passes(), fwd, fwd_bwd)
                        row.update(skipped=f"{projected:,.0f} s per image at its floor", images_per_s_at_defaults=floor,
                                   floor_images_per_s=floor)
                        rows.append(row)
                        continue
                    at_defaults = passes()
                    full = explainer.options()[option]
                    options[option] = max(MIN_SCALED, int(full * max_seconds_per_image / projected))
                    row["reduced"] = {option: [options[option], full]}
                    explainer = get_explainer(name, model, **options)
                    run, passes = explainer.explain, explainer.passes
            n = batch_size
            if target_seconds is not None:
                one = batch(1)
                _sync(device)
                start = tick()
                run(*one)
                _sync(device)
                per_image = tick() - start
                n = 1
                while n * 2 <= batch_size and n * 2 * per_image <= target_seconds:
                    n *= 2
            x, targets, seeds = batch(n)
            for _ in range(warmup - 1):
                run(x, targets, seeds)
            with PeakMemory(device) as peak:  # the last warm-up call (or one more), untimed
                run(x, targets, seeds)
            # Rounds of the method and the model's own passes taking turns, so that load from other
            # work on a shared machine weighs on the method and its floor alike; the fastest of each.
            times, readings = [], []
            for _ in range(repeats):
                times.append(_timed(lambda: run(x, targets, seeds), device, 1, min_seconds, 0, tick))
                readings.append(model_throughput(batch_size, 1, 0)[:2])
            seconds = min(times)
            near = max(r[0] for r in readings), max(r[1] for r in readings)
            fwd, fwd_bwd = max(fwd, near[0]), max(fwd_bwd, near[1])
            p = passes()
            floor = floor_images_per_s(p, max(near[0], 1e-12), max(near[1], 1e-12))
            ratio = n / seconds / floor
            row.update(batch_size=n, images_per_s=n / seconds, forward_passes=p.get("forward", 0),
                       backward_passes=p.get("backward", 0), floor_images_per_s=floor, ratio=ratio,
                       peak_bytes_per_image=None if peak.bytes is None else peak.bytes / n,
                       model_images_per_s={"forward": near[0], "forward_backward": near[1]})
            if at_defaults is not None:
                row["images_per_s_at_defaults"] = ratio * floor_images_per_s(at_defaults, near[0], near[1])
                row["passes_at_defaults"] = at_defaults
        except Exception as e:  # report and go on: one broken method should not hide the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append(row)
    per_image = None if model_peak is None else model_peak / batch_size
    model_rows = [
        {"method": "(model forward)", "batch_size": batch_size, "images_per_s": fwd, "forward_passes": 1,
         "backward_passes": 0, "floor_images_per_s": fwd, "ratio": 1.0, "peak_bytes_per_image": None},
        {"method": "(model forward+backward)", "batch_size": batch_size, "images_per_s": fwd_bwd, "forward_passes": 1,
         "backward_passes": 1, "floor_images_per_s": fwd_bwd, "ratio": 1.0, "peak_bytes_per_image": per_image},
    ]
    return model_rows + rows


def markdown_table(rows: list[dict], projections: tuple[int, ...] = ()) -> str:
    """One line per row; ``projections``: image counts to add the hours for (at the measured
    rate, or the extrapolated one at the options given where a method ran reduced)."""
    lines = ["| method | images/s | passes/image (fwd+bwd) | floor images/s | ratio | batch | peak MiB / image |"
             + "".join(f" h for {n:,} |" for n in projections),
             "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(projections)]
    for r in rows:
        name = r["method"] + "".join(f" ({k} {v[0]} of {v[1]})" for k, v in r.get("reduced", {}).items())
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * (5 + len(projections)))
            continue
        rate = r.get("images_per_s_at_defaults", r.get("images_per_s"))
        hours = "".join(f" {_hours_text(hours_for(n, rate))}{'*' if r.get('extrapolated') else ''} |"
                        for n in projections)
        passes = f"{r['forward_passes']}+{r['backward_passes']}"
        if "skipped" in r:
            lines.append(f"| {name} | not run: {r['skipped']} (floor ~{r['floor_images_per_s']:,.3g}*) | {passes} "
                         f"| {r['floor_images_per_s']:,.3g} | | | |" + hours)
            continue
        rate_text = f"{r['images_per_s']:,.3g}" + (f" (defaults ~{r['images_per_s_at_defaults']:,.3g}*)"
                                                   if "images_per_s_at_defaults" in r else "")
        peak = r.get("peak_bytes_per_image")
        lines.append(f"| {name} | {rate_text} | {passes} | {r['floor_images_per_s']:,.3g} | {r['ratio']:.2f} "
                     f"| {r.get('batch_size', '')} | {'' if peak is None else f'{peak / 2**20:,.1f}'} |" + hours)
    return "\n".join(lines)


def _hours_text(hours: float) -> str:
    return f"{hours:,.2f}" if hours >= 1 else f"{hours:.3g}"  # three figures even for seconds' worth


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
    """Registered methods that need no required option and no attention layers (the demo CNN has none)."""
    return [m for m in list_methods() if not explainer_class(m).needs_attention
            and all(v is not inspect.Parameter.empty for v in method_parameters(m).values())]


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
