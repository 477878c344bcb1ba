"""Speed and faithfulness of the superpixel methods on MNIST digits, printed as a Markdown table.

    python benchmarks/superpixel_methods.py [--images 200] [--anchor-images 20] [--threads 2] [--lime-only]

Compares, in one run and on the same digits and model (the demo CNN, trained on the 5,000-digit
subset by pipelines/training/demo_data.py):
- lime, default against default: our ``lime`` with its defaults vs the ``lime`` package's
  LimeImageExplainer with its own (quickshift kernel_size=4, max_dist=200, ratio=0.2;
  hide_color=None, i.e. each superpixel's mean; 1000 samples; kernel width 0.25);
- lime, tuned against tuned: the package as ABELE ran it (quickshift kernel_size=1, black
  hiding, hide_color=0) vs our lime with our best settings (its defaults), and our lime with
  its previous defaults (quickshift, superpixel-mean fill, probability) for reference;
  the package runs with batch_size=1000 (its default of 10 only costs time);
- RISE deletion AUC (saliency_audit.explainers.metrics.deletion_auc: zero substrate, --steps steps; lower is
  better) of each map, as a fraction of random maps' AUC (1.0 = random), and paired
  differences with standard errors;
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
    from saliency_audit.pipelines.training.reference_model import mnist_cnn
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


def lime_package(model, images, targets, seeds, n_samples, batch_size, kernel_size=None, hide_color=None):
    """The lime package on each image; returns maps [n,28,28], R^2 [n], model calls.

    kernel_size None: the package's own segmentation (quickshift kernel_size=4, max_dist=200,
    ratio=0.2); else quickshift with that kernel size and the same max_dist and ratio, seeded
    per image as the package seeds its own. hide_color None: each superpixel's mean.
    """
    from lime.lime_image import LimeImageExplainer
    from lime.wrappers.scikit_image import SegmentationAlgorithm
    calls = [0]

    def classifier_fn(batch):  # lime hands (n, H, W, 3) copies of the grey image
        calls[0] += len(batch)
        with torch.inference_mode():
            return torch.softmax(model(torch.from_numpy(batch[..., :1]).float().permute(0, 3, 1, 2)), 1).numpy()

    maps, r2 = [], []
    for image, target, seed in zip(images[:, 0].numpy().astype(np.float64), targets.tolist(), seeds.tolist()):
        explainer = LimeImageExplainer(random_state=seed)  # per image: lime#477
        segmentation = None if kernel_size is None else SegmentationAlgorithm(
            "quickshift", kernel_size=kernel_size, max_dist=200, ratio=0.2, random_seed=seed)
        with contextlib.redirect_stderr(io.StringIO()):  # lime 0.2.0 always draws a progress bar
            explanation = explainer.explain_instance(
                image, classifier_fn, labels=(target,), top_labels=None, hide_color=hide_color,
                num_features=100000, num_samples=n_samples, batch_size=batch_size,
                segmentation_fn=segmentation, random_seed=seed)
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
    from saliency_audit.explainers.blackbox.search import BlackBox
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
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--anchor-images", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=28, help="deletion steps (28: one row of a digit each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lime-only", action="store_true", help="skip anchor and lore")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.metrics import deletion_auc, random_maps

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
        return deletion_auc(model, images[:n], maps, targets[:n], steps=args.steps,
                            seeds=seeds[:n]).double().numpy()

    random_auc = deletion(random_maps(images[:, 0].shape, seeds), len(images))

    def add(method, impl, n, seconds, calls, maps=None, quality=""):
        invocations = model.invocations / n  # counted since the last reset, before deletion runs
        if maps is not None:
            aucs[(method, impl)] = deletion(maps, n)
        model.invocations = 0
        rows.append((method, impl, n, seconds / n, n / seconds, calls, invocations,
                     f"{aucs[(method, impl)].mean():.4f} ({aucs[(method, impl)].mean() / random_auc[:n].mean():.3f})"
                     if maps is not None else "-", quality))

    def ours_lime(impl, **options):
        explainer = get_explainer("lime", model, n_samples=args.samples, **options)
        result, seconds = timed(lambda: explainer.explain(images, targets, seeds))
        segments = np.mean([int(s.max()) + 1 for s in result.extras["segments"]])
        add("lime", impl, len(images), seconds, float(result.extras["model_calls"].float().mean()), result.maps,
            f"R2 {float(result.extras['r2'].mean()):.3f}; {segments:.1f} superpixels")

    def package_lime(impl, **options):
        (maps, r2, calls), seconds = timed(lambda: lime_package(model, images, targets, seeds, args.samples,
                                                                1000, **options))
        add("lime", impl, len(images), seconds, calls / len(images), maps, f"R2 {r2.mean():.3f}")

    # lime: default vs default, tuned vs tuned
    ours_lime(OURS_DEFAULT)
    package_lime(PACKAGE_DEFAULT)
    package_lime(PACKAGE_ABELE, kernel_size=1, hide_color=0)
    ours_lime("ours, previous defaults (quickshift, superpixel-mean fill, probability)",
              segmentation="quickshift", fill="mean", score="probability")
    rows.append(("random maps", "reference", len(images), 0.0, 0.0, 0, 0, f"{random_auc.mean():.4f} (1.000)", ""))
    model.invocations = 0
    if args.lime_only:
        return report(rows, aucs, args, {})

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

    report(rows, aucs, args, anchor_speedup)


OURS_DEFAULT = "ours, defaults (= our best: slic 100, fill 0, log-odds)"
PACKAGE_DEFAULT = "lime package, defaults (quickshift kernel 4, superpixel-mean hiding)"
PACKAGE_ABELE = "lime package as ABELE ran it (quickshift kernel 1, black hiding)"


def report(rows, aucs, args, anchor_speedup) -> None:
    print(f"\nMNIST CNN (pipelines/demo_data), first {args.images} test digits, {args.threads} torch threads, "
          f"{args.samples} lime samples, deletion AUC with a zero substrate over {args.steps} steps\n")
    print("| method | implementation | images | s / image | images / s | model calls / image "
          "| forward passes / image | deletion AUC, lower is better (/ random) | quality |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, impl, n_img, per, rate, calls, passes, dauc, quality in rows:
        print(f"| {method} | {impl} | {n_img} | {per:.4f} | {rate:.1f} | {calls:.0f} | {passes:.2f} | {dauc} "
              f"| {quality} |")
    print()
    seconds = {r[1]: r[3] for r in rows if r[0] == "lime"}
    for label, ours, theirs in (("default vs default", OURS_DEFAULT, PACKAGE_DEFAULT),
                                ("tuned vs tuned", OURS_DEFAULT, PACKAGE_ABELE)):
        diff = aucs[("lime", ours)] - aucs[("lime", theirs)]
        print(f"- lime {label}: deletion AUC ours minus package, paired over {len(diff)} images: "
              f"{diff.mean():+.4f} (standard error {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}; negative: ours "
              f"is better); ours {seconds[theirs] / seconds[ours]:.1f}x faster")
    for impl, speedup in anchor_speedup.items():
        print(f"- anchor speedup, ours batched vs {impl}: {speedup:.1f}x")


if __name__ == "__main__":
    main()
