"""Deletion faithfulness of signed and unsigned gradient maps, and of Grad-CAM's layer and weighting.

    python benchmarks/signed_vs_unsigned.py [--images 100] [--keras-epochs 2] [--threads 1]

On the first N MNIST test digits (t10k), for two models: the bundled demo CNN and the issue's
Keras-style CNN (three conv+ReLU+pool blocks, dropout, two dense layers; built and trained as
in tests/explainers/test_gradcam_plain_cnn.py on the 5,000-digit training subset), prints per method the
RISE deletion AUC (zero substrate, one row per step; lower is better) as a fraction of a random
map's (1.0 = random), the all-zero maps, and for gradient maps the share of each map's top 20%
pixels where deleting the pixel would raise the target (gradient x input < 0: evidence against
the class, which an unsigned map ranks as high as evidence for it). Targets are the predicted
classes. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared/data/mnist"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (label, method, options): the unsigned maps beside their signed variants, and Grad-CAM's choices
ROWS = [
    ("sal (|gradient|, default)", "sal", {}),
    ("sal absolute=False (gradient)", "sal", {"absolute": False}),
    ("smoothgrad absolute=True", "smoothgrad", {"absolute": True}),
    ("smoothgrad absolute=False", "smoothgrad", {"absolute": False}),
    ("grad (gradient x input)", "grad", {}),
    ("gradcam (default)", "gradcam", {}),
    ("gradcam weighting=mean", "gradcam", {"weighting": "mean"}),
    ("gradcam mean, last Conv2d (old default)", "gradcam", {"weighting": "mean", "layer": "LAST_CONV"}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--keras-epochs", type=int, default=2)
    parser.add_argument("--keras-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def models(args) -> dict[str, torch.nn.Module]:
    from test_gradcam_plain_cnn import trained_keras_style_cnn

    from saliency_audit.pipelines.training.reference_model import mnist_cnn
    demo = mnist_cnn()
    demo.load_state_dict(torch.load(ROOT / "pipelines/demo_data/mnist_cnn.pt", weights_only=True))
    return {"demo CNN": demo.eval(),
            f"Keras-style CNN, {args.keras_epochs} epochs, seed {args.keras_seed}":
                trained_keras_style_cnn(MNIST, epochs=args.keras_epochs, seed=args.keras_seed)}


def against_share(model, images, maps, targets) -> float:
    """Mean share of each map's top 20% pixels whose deletion would raise the target logit."""
    from saliency_audit.explainers import get_explainer
    grad_x_input = get_explainer("grad", model).explain(images, targets).maps
    k = max(1, maps[0].numel() // 5)
    top = maps.flatten(1).topk(k, dim=1).indices
    return float((grad_x_input.flatten(1).gather(1, top) < 0).float().mean())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.metrics import deletion_auc, random_maps
    from saliency_audit.pipelines.training.mnist import load_mnist_split, to_model_input
    images, _ = load_mnist_split(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    x = torch.from_numpy(to_model_input(images[:args.images]))
    seeds = torch.arange(len(x))
    for title, model in models(args).items():
        with torch.no_grad():
            targets = model(x).argmax(1)
        reference = float(deletion_auc(model, x, random_maps((len(x), 28, 28), seeds), targets, seeds=seeds).mean())
        print(f"\n{title}: {len(x)} test digits, random map's deletion AUC {reference:.3f}\n")
        print("| method | deletion / random | all-zero maps | top 20% against the class | s |")
        print("|---|---:|---:|---:|---:|")
        for label, method, options in ROWS:
            if options.get("layer") == "LAST_CONV":
                convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
                options = {**options, "layer": convs[-1]}
            start = time.perf_counter()
            maps = get_explainer(method, model, **options).explain(x, targets, seeds).maps
            seconds = time.perf_counter() - start
            ratio = float(deletion_auc(model, x, maps, targets, seeds=seeds).mean()) / reference
            zero = int((maps.flatten(1).abs().amax(1) == 0).sum())
            against = f"{against_share(model, x, maps, targets):.2f}" if method != "gradcam" else "-"
            print(f"| {label} | {ratio:.3f} | {zero} | {against} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
