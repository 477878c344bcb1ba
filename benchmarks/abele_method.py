"""abele on MNIST digits: seconds per image, tree fidelity, and deletion AUC beside lime and the
gradient methods, printed as a Markdown table.

    python benchmarks/abele_method.py [--images 20] [--neighbours 1000] [--threads 2]

Same digits (the first bundled test digits), model (pipelines/demo_data/mnist_cnn.pt), seeds
and metric for every method: RISE deletion AUC (saliency_audit.explainers.metrics.deletion_auc: one image row
per step, zero substrate, pixels ranked by the signed map; lower is better). abele runs at the
reference defaults with the bundled AAE (pipelines/demo_data/mnist_aae.pt), all images in one
call; it is also scored with ABELE's own "relevancy" ranking (1 - |map| / 127.5, highest
first). Wall times on a shared CPU vary: compare rows of one run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from superpixel_methods import ROOT, load_digits, load_model  # noqa: E402

AAE = ROOT / "pipelines/demo_data/mnist_aae.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--neighbours", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aae", default=str(AAE))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.metrics import deletion_auc, random_maps

    model = load_model()
    images = load_digits(args.images)
    with torch.no_grad():  # not inference_mode: the gradient methods reuse targets under autograd
        targets = model(images).argmax(1)
    seeds = torch.arange(len(images), dtype=torch.int64)
    rows = []

    def add(name, maps, seconds, note=""):
        auc = deletion_auc(model, images, maps, targets, seeds=seeds).double()
        rows.append((name, seconds / len(images), float(auc.mean()), float(auc.std() / len(auc) ** 0.5), note))

    abele = get_explainer("abele", model, aae=args.aae, neighbours=args.neighbours)
    start = time.perf_counter()
    result = abele.explain(images, targets, seeds)
    seconds = time.perf_counter() - start
    extras = result.extras
    note = (f"fidelity {float(extras['fidelity'].mean()):.3f}, neighbours {float(extras['neighbours'].float().mean()):.0f}, "
            f"model calls {float(extras['model_calls'].float().mean()):.0f}, "
            f"map exemplars {float(extras['map_exemplars'].float().mean()):.0f}, "
            f"non-neutral pixels {float((result.maps != 0).float().mean()):.1%}")
    add("abele (signed map)", result.maps, seconds, note)
    add("abele (ABELE's relevancy, 1 - |map|/127.5)", 1 - result.maps.abs() / 127.5, seconds, "same run")
    for name, options in (("lime", {"fill": 0.0}), ("sal", {}), ("grad", {}), ("intg", {})):
        explainer = get_explainer(name, model, **options)
        start = time.perf_counter()
        maps = explainer.explain(images, targets, seeds).maps
        add(name, maps, time.perf_counter() - start)
    add("random maps", random_maps(images[:, 0].shape, seeds), 0.0, "reference")

    print(f"\n{len(images)} MNIST test digits, bundled CNN and AAE, {args.threads} torch threads, "
          f"abele with {args.neighbours} neighbours\n")
    print("| method | s / image | deletion AUC (lower is better) | +- s.e. | notes |")
    print("|---|---:|---:|---:|---|")
    for name, per, auc, se, note in rows:
        print(f"| {name} | {per:.3f} | {auc:.4f} | {se:.4f} | {note} |")


if __name__ == "__main__":
    main()
