"""Speed and faithfulness of the superpixel methods on MNIST digits, printed as a Markdown table.

    python benchmarks/superpixel_methods.py [--images 50] [--anchor-images 20] [--threads 2]

Compares, in one run and on the same digits, model and segmentation:
- our ``lime`` (all images in one call) with the ``lime`` package's LimeImageExplainer given
  the same segmentation (ours, passed as segmentation_fn), fill (0, ABELE's hide_color),
  number of samples, kernel width and per-image seed; the package runs with its default
  batch_size=10 on a few images (timing only) and with batch_size=1000 on all of them;
- RISE deletion AUC (explainers.metrics.deletion_auc: one row per step, zero substrate;
  lower is better) of each map, and of random maps as a reference;
- our ``anchor`` batched over the images vs Ribeiro's reference implementation (the
  ``anchor-exp`` package, ``pip install --no-deps anchor-exp``: its other requirements are
  for text) one image at a time with the same segmentation, fill, threshold, delta, tau and
  batch size, and vs our algorithm called one image at a time; the precision of every anchor
  is re-estimated on the same fresh samples for both;
- our ``lore`` batched.
"model calls" counts masked images evaluated (distinct masks only, for ours), "forward passes"
counts model invocations whatever their batch size: on an accelerator, where a small batch
costs about as much as a large one, the latter sets the time. Not part of the test suite;
wall times on a shared CPU vary, so compare rows of one run.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TAR = ROOT / "pipelines/demo_data/mnist-test-sample.tar"
WEIGHTS = ROOT / "pipelines/demo_data/mnist_cnn.pt"
IDX = Path("/work/shared/data/mnist/t10k-images-idx3-ubyte.gz")


def load_digits(n: int) -> torch.Tensor:
    """n test digits [n,1,28,28] in [0,1], from the demo tar, else from the IDX file."""
    if TAR.exists():
        from PIL import Image
        with tarfile.open(TAR) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".png")), key=lambda m: m.name)
            arrays = [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("L"))
                      for m in members[:n]]
    else:
        with gzip.open(IDX) as f:
            arrays = list(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n])
    return torch.tensor(np.stack(arrays), dtype=torch.float32)[:, None] / 255.0


def load_model() -> torch.nn.Module:
    from pipelines.reference_model import mnist_cnn
    if not WEIGHTS.exists():
        raise SystemExit(f"missing {WEIGHTS}: train it with `saliency-audit train-classifier` first")
    model = mnist_cnn()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


class Counting(torch.nn.Module):
    """The model, counting its invocations (forward passes, whatever their batch size)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.invocations = model, 0

    def forward(self, x):
        self.invocations += 1
        return self.model(x)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def lime_package(model, images, targets, seeds, n_samples, batch_size, segmentation_options):
    """The lime package on each image; returns maps [n,28,28], R^2 [n], model calls."""
    from lime.lime_image import LimeImageExplainer
    from explainers.superpixels import segment
    calls = [0]

    def classifier_fn(batch):  # lime hands (n, H, W, 3) copies of the grey image
        calls[0] += len(batch)
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch[..., :1]).float().permute(0, 3, 1, 2)), 1).numpy()

    maps, r2 = [], []
    for image, target, seed in zip(images[:, 0].numpy().astype(np.float64), targets.tolist(), seeds.tolist()):
        explainer = LimeImageExplainer(kernel_width=0.25, random_state=seed)  # per image: lime#477
        with contextlib.redirect_stderr(io.StringIO()):  # lime 0.2.0 always draws a progress bar
            explanation = explainer.explain_instance(
                image, classifier_fn, labels=(target,), top_labels=None, hide_color=0,
                num_features=100000, num_samples=n_samples, batch_size=batch_size,
                segmentation_fn=lambda rgb, s=seed: segment(np.moveaxis(rgb, -1, 0)[:1], "quickshift",
                                                            segmentation_options, seed=s))
        weights = np.zeros(explanation.segments.max() + 1, dtype=np.float32)
        for feature, weight in explanation.local_exp[target]:
            weights[feature] = weight
        maps.append(weights[explanation.segments])
        r2.append(explanation.score[target] if isinstance(explanation.score, dict) else explanation.score)
    return torch.tensor(np.stack(maps)), np.asarray(r2, dtype=float), calls[0]


def anchor_package(model, images, targets, seeds, segments, fill, options):
    """Ribeiro's anchor-exp on each image with our segments; returns anchors and model calls."""
    from anchor import anchor_base, anchor_image
    calls = [0]

    def classifier_fn(batch):  # anchor-exp hands (n, H, W, 3) copies of the grey image
        calls[0] += len(batch)
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch[..., :1]).float().permute(0, 3, 1, 2)), 1).numpy()

    anchors = []
    for image, seg, seed in zip(images[:, 0].numpy().astype(np.float64), segments, seeds.tolist()):
        np.random.seed(seed)  # anchor-exp draws from numpy's global generator
        explainer = anchor_image.AnchorImage(white=fill, segmentation_fn=lambda _, s=seg: s)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the prediction
            _, sample = explainer.get_sample_fn(np.repeat(image[..., None], 3, axis=2), classifier_fn)
            found = anchor_base.AnchorBaseBeam.anchor_beam(sample, desired_confidence=options["threshold"],
                                                            delta=options["delta"], epsilon=options["tau"],
                                                            batch_size=options["batch_size"],
                                                            min_samples_start=options["min_samples_start"])
        anchors.append([int(f) for f in found["feature"]])
    return anchors, calls[0]


def anchor_precision(model, images, targets, segments, anchors, fill, n=2000):
    """Share of n fresh samples (anchor on, other superpixels on with p=0.5) that keep the class."""
    from explainers._blackbox import BlackBox
    out = []
    for i, anchor in enumerate(anchors):
        rng = np.random.default_rng(i)
        masks = rng.random((n, int(segments[i].max()) + 1)) < 0.5
        masks[:, anchor] = True
        box = BlackBox(model, images[i:i + 1], targets[i:i + 1], [segments[i]], fill, 1024)
        _, labels = box.query(np.zeros(n, dtype=np.int64), masks)
        out.append(float((labels == int(targets[i])).mean()))
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--slow-lime-images", type=int, default=5,
                        help="images for the lime package at its default batch_size=10 (timing only)")
    parser.add_argument("--anchor-images", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from explainers import get_explainer
    from explainers.metrics import deletion_auc, random_maps

    model = Counting(load_model())
    images = load_digits(args.images)
    with torch.inference_mode():
        targets = model(images).argmax(1)
    seeds = torch.arange(len(images), dtype=torch.int64)
    model.invocations = 0
    common = {"fill": 0.0}  # black = MNIST background, as ABELE ran lime (hide_color=0)
    rows = []

    aucs = {}

    def deletion(maps, n):
        return deletion_auc(model, images[:n], maps, targets[:n], seeds=seeds[:n]).double().numpy()

    def add(method, impl, n, seconds, calls, maps=None, quality=""):
        invocations = model.invocations / n  # counted since the last reset, before deletion runs
        if maps is not None:
            aucs[(method, impl)] = deletion(maps, n)
        model.invocations = 0
        rows.append((method, impl, n, seconds / n, n / seconds, calls, invocations,
                     f"{aucs[(method, impl)].mean():.4f}" if maps is not None else "-", quality))

    # lime: ours vs the package
    ours = get_explainer("lime", model, n_samples=args.samples, **common)
    result, seconds = timed(lambda: ours.explain(images, targets, seeds))
    add("lime", "ours, whole batch", len(images), seconds, float(result.extras["model_calls"].float().mean()),
        result.maps, f"R2 {float(result.extras['r2'].mean()):.3f}")
    segmentation_options = None  # ours picks quickshift's options from the size; pass the same ones
    from explainers.superpixels import default_options
    segmentation_options = default_options("quickshift", 28, 28)
    (maps, r2, calls), seconds = timed(lambda: lime_package(model, images, targets, seeds, args.samples, 1000,
                                                            segmentation_options))
    add("lime", "lime package, batch_size=1000", len(images), seconds, calls / len(images), maps,
        f"R2 {r2.mean():.3f}")
    n = min(args.slow_lime_images, len(images))
    (maps, r2, calls), seconds = timed(lambda: lime_package(model, images[:n], targets[:n], seeds[:n],
                                                            args.samples, 10, segmentation_options))
    add("lime", "lime package, default batch_size=10", n, seconds, calls / n, None,
        f"timing only, first {n} images")
    rows.append(("random maps", "reference", len(images), 0.0, 0.0, 0, 0,
                 f"{deletion(random_maps(images[:, 0].shape, seeds), len(images)).mean():.4f}", ""))
    model.invocations = 0

    # anchor: batched vs one image at a time, same algorithm and seeds
    n = min(args.anchor_images, len(images))
    batched = get_explainer("anchor", model, **common)
    result, seconds = timed(lambda: batched.explain(images[:n], targets[:n], seeds[:n]))
    add("anchor", "ours, whole batch", n, seconds, float(result.extras["model_calls"].float().mean()),
        result.maps, f"precision {float(result.extras['precision'].mean()):.3f}")
    single = get_explainer("anchor", model, max_forward_batch=100, **common)
    singles, seconds_single = timed(lambda: [single.explain(images[i:i + 1], targets[i:i + 1], seeds[i:i + 1])
                                             for i in range(n)])
    precision = np.mean([float(r.extras["precision"][0]) for r in singles])
    same = sum(r.extras["anchor"][0].tolist() == result.extras["anchor"][i].tolist() for i, r in enumerate(singles))
    add("anchor", "ours, one image per call, max_forward_batch=100", n, seconds_single,
        np.mean([int(r.extras["model_calls"][0]) for r in singles]), torch.cat([r.maps for r in singles]),
        f"precision {precision:.3f}; same anchor {same}/{n}")
    anchor_speedup = {"ours, one image per call": seconds_single / seconds}
    segments = [s.reshape(28, 28).numpy() for s in result.extras["segments"]]
    ours_anchors = [a.tolist() for a in result.extras["anchor"]]
    fresh = anchor_precision(model, images[:n], targets[:n], segments, ours_anchors, common["fill"])
    rows[-2] = rows[-2][:-1] + (rows[-2][-1] + f"; fresh-sample precision {fresh.mean():.3f}",)
    try:
        options = {k: getattr(batched, k) for k in ("threshold", "delta", "tau", "batch_size", "min_samples_start")}
        (theirs, calls), seconds_ref = timed(lambda: anchor_package(model, images[:n], targets[:n], seeds[:n],
                                                                    segments, common["fill"], options))
        fresh_ref = anchor_precision(model, images[:n], targets[:n], segments, theirs, common["fill"])
        sizes = np.mean([len(a) for a in theirs]), np.mean([len(a) for a in ours_anchors])
        add("anchor", "anchor-exp (Ribeiro's reference), one image per call", n, seconds_ref, calls / n, None,
            f"fresh-sample precision {fresh_ref.mean():.3f}; mean anchor size {sizes[0]:.2f} (ours {sizes[1]:.2f})")
        anchor_speedup["anchor-exp, one image per call"] = seconds_ref / seconds
    except ImportError:
        print("anchor-exp is not installed (pip install --no-deps anchor-exp): no reference anchor row")

    # lore
    lore = get_explainer("lore", model, **common)
    result, seconds = timed(lambda: lore.explain(images[:n], targets[:n], seeds[:n]))
    add("lore", "ours, whole batch", n, seconds, float(result.extras["model_calls"].float().mean()),
        result.maps, f"fidelity {float(result.extras['fidelity'].mean()):.3f}")

    lime_rows = {r[1]: r for r in rows if r[0] == "lime"}
    ours_s = lime_rows["ours, whole batch"][3]
    print(f"\nMNIST CNN (pipelines/demo_data), {args.threads} torch threads, quickshift "
          f"{segmentation_options}, fill 0, {args.samples} lime samples\n")
    print("| method | implementation | images | s / image | images / s | model calls / image "
          "| forward passes / image | deletion AUC (lower is better) | quality |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, impl, n_img, per, rate, calls, passes, dauc, quality in rows:
        print(f"| {method} | {impl} | {n_img} | {per:.4f} | {rate:.1f} | {calls:.0f} | {passes:.2f} | {dauc} "
              f"| {quality} |")
    print()
    for impl, row in lime_rows.items():
        if impl != "ours, whole batch":
            print(f"- lime speedup vs {impl}: {row[3] / ours_s:.1f}x")
    diff = aucs[("lime", "ours, whole batch")] - aucs[("lime", "lime package, batch_size=1000")]
    print(f"- lime deletion AUC, ours minus package, paired over {len(diff)} images: {diff.mean():+.4f} "
          f"(standard error {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}); negative means ours is better")
    for impl, speedup in anchor_speedup.items():
        print(f"- anchor speedup, ours batched vs {impl}: {speedup:.1f}x")


if __name__ == "__main__":
    main()
