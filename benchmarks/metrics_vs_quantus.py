"""ROAD and the localisation metrics: ours vs Quantus 0.6.0, per image, on the same inputs.

    python benchmarks/metrics_vs_quantus.py [--images 32] [--threads 1]

On the first N bundled demo digits, with the demo CNN, seeded random maps (continuous, so no
ties and the two rank pixels identically) and the digit's pixels (input > 0) as the ground-truth
mask, times each metric for the whole batch in one call of ours and one of Quantus's (Quantus's
ROAD loops per image inside), and prints a Markdown table of milliseconds per image and the
ratio. ROAD: Quantus's defaults (50 percentages 1..99, noise 0.01), MoRF only, since Quantus
computes only MoRF; the "both orders" row is ours with LeRF too. Also checks that the results
agree (ROAD with noise 0 on the still-correct flags). Needs quantus (test-only, LGPL):
    pip install --no-deps quantus==0.6.0 && pip install pandas opencv-python-headless cachetools
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from saliency_audit.explainers.metrics.localisation import (
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from saliency_audit.explainers.metrics.road import road  # noqa: E402


def import_quantus():
    """Quantus with a torchvision stand-in while it imports (its zennit import needs one)."""
    resnet = types.ModuleType("torchvision.models.resnet")
    resnet.BasicBlock = type("BasicBlock", (nn.Module,), {})
    resnet.Bottleneck = type("Bottleneck", (nn.Module,), {})
    models = types.ModuleType("torchvision.models")
    models.resnet = resnet
    stand_in = {"torchvision": types.ModuleType("torchvision"), "torchvision.models": models,
                "torchvision.models.resnet": resnet}
    stand_in["torchvision"].models = models
    missing = {k: v for k, v in stand_in.items() if k not in sys.modules}
    try:
        import importlib.util
        if importlib.util.find_spec("torchvision") is None:
            sys.modules.update(missing)
        import quantus
    finally:
        for name in missing:
            if sys.modules.get(name) is missing[name]:
                del sys.modules[name]
    return quantus


def load(n: int):
    from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    demo = ROOT / "pipelines" / "demo_data"
    model = load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(demo / "mnist_cnn.pt")))
    prep = Preprocessing(channels=1)
    records = [r for _, r in zip(range(n), read_shard(str(demo / "mnist-test-sample.tar")))]
    images = torch.from_numpy(np.stack([preprocess(decode(r, prep.max_pixels), prep) for r in records]))
    return model, images, torch.tensor([r.label for r in records])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    quantus = import_quantus()
    model, images, labels = load(args.images)
    n = len(images)
    maps = torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(0))
    masks = images[:, 0] > images[:, 0].amin(dim=(1, 2), keepdim=True)
    x, y, a, s = images.numpy(), labels.numpy(), maps[:, None].numpy(), masks[:, None].float().numpy()
    quiet = dict(disable_warnings=True, display_progressbar=False)
    rows = []

    def q_road(noise):
        percentages = list(range(1, 100, 2))
        scores = [quantus.ROAD(noise=noise, **quiet)(model=model, x_batch=x[i:i + 1], y_batch=y[i:i + 1],
                                                    a_batch=a[i:i + 1], channel_first=True, device="cpu")
                  for i in range(n)]   # per image: Quantus's ROAD returns only the batch mean per percentage
        return np.array([[score[p] for p in percentages] for score in scores], dtype=bool)

    ref, t_q = timed(lambda: q_road(0.01))
    ours, t_o = timed(lambda: road(model, images, maps, labels, orders=("morf",)))
    rows.append(("ROAD MoRF, 50 percentages, noise 0.01", t_o, t_q, "-"))
    both, t_b = timed(lambda: road(model, images, maps, labels))
    rows.append(("ROAD MoRF + LeRF (ours only)", t_b, None, "-"))
    ref0 = q_road(0.0)
    ours0 = road(model, images, maps, labels, orders=("morf",), noise=0.0)
    rows[0] = rows[0][:3] + (f"{(ours0.morf_correct.numpy() == ref0).mean():.4f} flags equal at noise 0",)
    for name, ours_fn, metric in [("pointing game", pointing_game, quantus.PointingGame),
                                  ("relevance mass accuracy", relevance_mass_accuracy, quantus.RelevanceMassAccuracy),
                                  ("relevance rank accuracy", relevance_rank_accuracy, quantus.RelevanceRankAccuracy)]:
        repeats = 20                                          # fast metrics: time several calls
        q_vals, t_q = timed(lambda: [metric(**quiet)(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s,
                                                     channel_first=True) for _ in range(repeats)])
        o_vals, t_o = timed(lambda: [ours_fn(maps, masks) for _ in range(repeats)])
        agree = np.allclose(o_vals[0].values.numpy(), np.asarray(q_vals[0], dtype=float), rtol=1e-5)
        rows.append((name, t_o / repeats, t_q / repeats, "equal" if agree else "DIFFER"))
    print(f"{n} demo digits, 28x28, torch threads {args.threads}\n")
    print("| metric | ours ms/image | Quantus ms/image | Quantus / ours | agreement |")
    print("|---|---:|---:|---:|---|")
    for name, t_o, t_q, agree in rows:
        ratio = f"{t_q / t_o:.1f}x" if t_q is not None else "-"
        quantus_ms = f"{1e3 * t_q / n:.3f}" if t_q is not None else "-"
        print(f"| {name} | {1e3 * t_o / n:.3f} | {quantus_ms} | {ratio} | {agree} |")


if __name__ == "__main__":
    main()
