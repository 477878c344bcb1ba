"""Decode-only, model-only and the pipeline (decoding overlapped with the model), side by side in one run.

    python benchmarks/decode_model_pipeline.py [--images 300] [--size 500x375] [--batch-size 16]
        [--torch-threads 1] [--decode-threads N] [--prefetch 2] [--width 16] [--methods sal]
        [--repeats 3] [--no-beam] [--stand-in-ms MS] [--json FILE]

Writes --images JPEGs (photo-like: smooth colour fields, shapes and grain, --size pixels, quality
90) into one WebDataset tar shard, preprocessed as for an ImageNet model at 224 px (shorter side
256, centre crop 224, ImageNet mean/std). The modes, interleaved --repeats times (images/s from
the median wall time of each):

    decode     the audit's reader (transforms.read.ReadShardBatches) with its decode pool, the
               batches dropped: what the decoding side can deliver
    model      the explain step (transforms.model.handler.BatchHandler: predict, targets, --methods,
               metrics off) on the same batches decoded beforehand: what the model side can take
    pipeline   the reader feeding the explain step batch by batch in one thread, as Beam's fused
               stage runs them: the decode pool works on the next batches while the model runs
    inline     the same with the decode pool off (decoding between batches, as before prefetch)
    beam       the pipeline as a Beam job on the in-process FnApiRunner: read -> explain steps,
               fused; its seconds less those of the same job on an empty shard (Beam's start-up
               and the model's loading), so the figure is the stage's rate (skip with --no-beam)

Each mode's CPU seconds (all threads) over its wall seconds is the cores it got. On a machine
shared with other work the cores a process gets may not grow with its threads (Linux's
autogrouping gives each session one share, whatever its threads), and then decoding can only
take turns with the model: pipeline ~ inline. --stand-in-ms MS replaces the model by a step that
waits MS per image without using the CPU (as a CPU thread waits for a GPU), which shows the
overlap whatever the cores: the decoder runs while the step waits.

The model is a plain CNN (five stride-2 convolutions of --width to 8 x --width channels, 1000
classes, random weights), on --torch-threads torch threads (default 1); the decode pool gets
--decode-threads, by default what the audit gives it: ThreadBudget(--torch-threads).split("cpu")
on this machine's cores. The figure that matters is pipeline / min(decode, model): 1.0 is
perfect overlap, and decoding between batches (inline) gives 1 / (1 + min/max) at best.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from saliency_audit.transforms.io.preprocess import Preprocessing  # noqa: E402
from saliency_audit.transforms.io.records import ImageBatch  # noqa: E402
from saliency_audit.transforms.model.handler import BatchHandler, ExplainConfig, build_explainers, default_settings  # noqa: E402
from saliency_audit.transforms.model.load import ModelSpec  # noqa: E402
from saliency_audit.transforms.model.threads import ThreadBudget, apply_threads  # noqa: E402
from saliency_audit.transforms.read import ReadShardBatches  # noqa: E402

PREP = Preprocessing(resize_shortest=256, crop=(224, 224), channels=3, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225))
WIDTH_ENV = "DECODE_MODEL_PIPELINE_WIDTH"  # the model's width, for the Beam mode's import of cnn()
MODES = ("decode", "model", "pipeline", "inline", "beam")


def cnn() -> torch.nn.Module:
    """Five stride-2 3x3 convolutions (width, 2w, 4w, 8w, 8w channels) with ReLU, global average
    pooling and a 1000-class head: a model whose cost --width sets, with the same seed each time."""
    width = int(os.environ.get(WIDTH_ENV, "16"))
    torch.manual_seed(0)
    layers, channels = [], 3
    for out in (width, 2 * width, 4 * width, 8 * width, 8 * width):
        layers += [torch.nn.Conv2d(channels, out, 3, stride=2, padding=1), torch.nn.ReLU()]
        channels = out
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(channels, 1000))


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: a smooth colour field, a few flat shapes, and sensor grain, so
    the JPEG decoder has the work of a photograph, not of a flat or a pure-noise image."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, 3), dtype=np.float32)
    field = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC),
                       dtype=np.float32)
    ys, xs = np.mgrid[:height, :width]
    for _ in range(4):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(height // 12, height // 3)
        field[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    field += rng.normal(0, 6, field.shape).astype(np.float32)
    return np.clip(field, 0, 255).astype(np.uint8)


def write_shard(path: Path, n: int, size: tuple[int, int], seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    width, height = size
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray(photo(rng, height, width)).save(buffer, format="JPEG", quality=90)
            for name, data in ((f"img{i:05d}.jpg", buffer.getvalue()), (f"img{i:05d}.cls", str(i % 1000).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def batches(reader: ReadShardBatches, url: str):
    return (out for out in reader.process(url) if isinstance(out, ImageBatch))


def beam_pipeline(url: str, reader: ReadShardBatches, config: ExplainConfig, stand_in=None) -> None:
    """The read and explain steps (or the stand-in) as a Beam job on the in-process runner: one fused stage."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.utils import shared

    from saliency_audit.transforms.explain import ExplainBatches
    from saliency_audit.transforms.read import ERRORS, READ
    with beam.Pipeline(runner=FnApiRunner()) as p:
        read = p | beam.Create([url]) | beam.ParDo(reader).with_outputs(ERRORS, READ, main="batches")
        if stand_in is None:
            read.batches | beam.ParDo(ExplainBatches(config, shared.Shared())).with_outputs(main="rows")
        else:
            read.batches | beam.Map(stand_in)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--images", type=int, default=300)
    add("--size", default="500x375", help="JPEG width x height (default 500x375, ImageNet's typical)")
    add("--batch-size", type=int, default=16)
    add("--torch-threads", type=int, default=1)
    add("--decode-threads", type=int, help="default: the audit's split of the budget on this machine")
    add("--prefetch", type=int, default=2, help="batches decoded ahead (default 2)")
    add("--width", type=int, default=16, help="the CNN's first width; the model's cost (default 16)")
    add("--methods", default="sal", help="comma list; empty: predictions only")
    add("--repeats", type=int, default=3)
    add("--no-beam", action="store_true")
    add("--stand-in-ms", type=float, help="a model that waits this long per image, off the CPU")
    add("--json")
    args = parser.parse_args(argv)
    os.environ[WIDTH_ENV] = str(args.width)
    budget = ThreadBudget(args.torch_threads)
    torch_threads, decode_threads = budget.split("cpu")
    decode_threads = decode_threads if args.decode_threads is None else args.decode_threads
    apply_threads(torch_threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    methods = {m.strip(): {} for m in args.methods.split(",") if m.strip()}
    config = ExplainConfig(ModelSpec(f"{Path(__file__).stem}:cnn"), methods, device="cpu",
                           settings={**default_settings(), "metrics": False}, threads=budget)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # cnn() for the model loader
    handler = BatchHandler(config, build_explainers(config))
    scratch = Path(tempfile.mkdtemp(prefix="decode-model-"))
    try:
        url = write_shard(scratch / "photos.tar", args.images, size)
        empty = write_shard(scratch / "empty.tar", 0, size)
        reader = ReadShardBatches(PREP, args.batch_size, prefetch=args.prefetch, decode_threads=decode_threads)
        inline = ReadShardBatches(PREP, args.batch_size, decode_threads=0)
        decoded = list(batches(inline, url))
        assert sum(len(b.image_ids) for b in decoded) == args.images, "some images did not decode"
        for batch in decoded[:2]:  # warm-up: first calls allocate
            list(handler.process(batch))

        def step(batch):
            if args.stand_in_ms is not None:
                time.sleep(args.stand_in_ms * len(batch.image_ids) / 1000)
            else:
                for _ in handler.process(batch):
                    pass

        def explain(stream):
            for batch in stream:
                step(batch)

        runs = {"decode": lambda: sum(1 for _ in batches(reader, url)),
                "model": lambda: explain(decoded),
                "pipeline": lambda: explain(batches(reader, url)),
                "inline": lambda: explain(batches(inline, url)),
                "beam": lambda: beam_pipeline(url, reader, config, None if args.stand_in_ms is None else step),
                "beam start-up": lambda: beam_pipeline(empty, reader, config, None if args.stand_in_ms is None else step)}
        modes = [m for m in MODES if not (m == "beam" and args.no_beam)] + ([] if args.no_beam else ["beam start-up"])
        model = (f"a stand-in waiting {args.stand_in_ms} ms per image" if args.stand_in_ms is not None else
                 f"methods {','.join(methods) or '(predictions only)'}, CNN width {args.width}")
        print(f"{args.images} JPEGs {size[0]}x{size[1]} -> 224x224, batch {args.batch_size}, {model}; torch threads {torch_threads}, "
              f"decode threads {decode_threads}, prefetch {args.prefetch} batches; {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        times: dict[str, list[float]] = {m: [] for m in modes}
        cores: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.repeats):
            for mode in modes:
                cpu, start = cpu_seconds(), time.perf_counter()
                runs[mode]()
                times[mode].append(time.perf_counter() - start)
                cores[mode].append((cpu_seconds() - cpu) / times[mode][-1])
                print(f"  round {r + 1} {mode:>13}: {times[mode][-1]:6.2f} s  {args.images / times[mode][-1]:7.1f} "
                      f"images/s  cores used {cores[mode][-1]:.2f}  load {os.getloadavg()[0]:.1f}", flush=True)
        if not args.no_beam:  # the stage's own seconds, round by round
            start_up = times.pop("beam start-up")
            times["beam"] = [t - u for t, u in zip(times["beam"], start_up)]
            modes.remove("beam start-up")
            print(f"  Beam's start-up (the job on an empty shard): median {statistics.median(start_up):.2f} s")
        # NaN where the job took no longer than its start-up: too few images to see the stage's own time
        rate = {m: args.images / statistics.median(t) if statistics.median(t) > 0 else float("nan")
                for m, t in times.items()}
        used = {m: statistics.median(cores[m]) for m in modes}
        slower = min(rate["decode"], rate["model"])
        print("\n| mode | images/s | / min(decode, model) | cores used |\n|---|---:|---:|---:|")
        for mode in modes:
            print(f"| {mode} | {rate[mode]:.1f} | {rate[mode] / slower:.2f} | {used[mode]:.2f} |")
        figures = {"images": args.images, "size": size, "batch_size": args.batch_size, "methods": list(methods),
                   "width": args.width, "stand_in_ms": args.stand_in_ms, "torch_threads": torch_threads,
                   "decode_threads": decode_threads, "prefetch": args.prefetch, "seconds": times,
                   "images_per_s": rate, "cores_used": used, "pipeline_over_slower": rate["pipeline"] / slower}
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return figures
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
