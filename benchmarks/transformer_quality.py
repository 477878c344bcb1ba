"""Every method at its defaults on three briefly trained architectures, a CNN, a ViT and a ConvNeXt:
a Markdown table of faithfulness, planted-feature hits and the sanity check.

    python benchmarks/transformer_quality.py [--archs cnn,vit,convnext] [--methods all] [--images 64]
                                             [--planted-images 32] [--sanity-images 8] [--threads 1]
                                             [--json FILE]

The three models are `saliency_audit.pipelines.training.reference_model`'s MnistCNN, mnist_vit and
mnist_convnext, each trained by `train_classifier` with its architecture's recipe on the
5,000-digit MNIST subset (3 epochs, batches of 32, no augmentation: the budget of the test suite's
models, tests/explainers/test_transformer_quality.py). Per method and architecture:

- deletion / random: mean RISE deletion AUC over the first ``--images`` test digits (target: the
  predicted class; 16 steps, zero substrate, the run's defaults) as a fraction of a random map's
  (lower is better, 1.0 = random); the share of constant (e.g. all-zero) maps;
- planted: the share of ``--planted-images`` noise images with a 4x4 patch on which the map finds
  the patch (tests/planted.py's on_patch: its maximum or half its positive mass on the patch), for
  the same architecture trained to tell images with the patch from those without;
- sanity: the mean signed rank correlation between the maps of the trained model and of the model
  with every layer re-initialised (Adebayo et al.'s cascading randomisation, to the end) on the
  first ``--sanity-images`` digits; above 0.5 the run's sanity check flags the method.

A method an architecture refuses (it raises UnsupportedModel: attention methods on a ConvNeXt, the
graph-rule methods on attention) is shown as "refused". abele runs with the bundled autoencoder.
Needs ../shared/data/mnist. Wall times vary on shared machines; the defaults take about half an hour
on one core.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/planted.py: the planted-feature protocol

from planted import on_patch, planted  # noqa: E402

from saliency_audit.explainers import get_explainer, list_methods  # noqa: E402
from saliency_audit.explainers.core.base import UnsupportedModel  # noqa: E402
from saliency_audit.explainers.metrics import (  # noqa: E402
    cascading_randomization,
    deletion_auc,
    random_maps,
    sanity_rank_correlation,
)
from saliency_audit.pipelines.training.classifier import evaluate, train_classifier  # noqa: E402
from saliency_audit.pipelines.training.mnist import load_mnist_split, to_model_input  # noqa: E402

MNIST = ROOT.parent / "shared" / "data" / "mnist"
AAE = ROOT / "pipelines" / "demo_data" / "mnist_aae.pt"
ARCHITECTURES = ("cnn", "vit", "convnext")
TRAINING = {"epochs": 3, "batch_size": 32, "max_shift": 0, "progress": False}
PLANTED_TRAINING = 2000  # noise images; the patch is learnt long before the digits are
DELETION = {"steps": 16, "substrate": "zero"}  # the run's defaults (--metric-steps, --metric-substrate)
SANITY_THRESHOLD = 0.5  # the run's --sanity-threshold


def mnist(n_test: int = 1000) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The 5,000-digit training subset and the first ``n_test`` test digits, as model input."""
    train = load_mnist_split(MNIST / "train5k-images-idx3-ubyte.gz", MNIST / "train5k-labels-idx1-ubyte.gz")
    test = load_mnist_split(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    return (to_model_input(train[0]), train[1]), (to_model_input(test[0][:n_test]), test[1][:n_test])


def train_digits(architecture: str, images: np.ndarray, labels: np.ndarray) -> torch.nn.Module:
    return train_classifier(images, labels, architecture=architecture, **TRAINING)


def train_planted(architecture: str, n_images: int) -> tuple[torch.nn.Module, float, torch.Tensor, torch.Tensor]:
    """The architecture trained on tests/planted.py's task; its accuracy on 200 new images, and
    ``n_images`` of them that carry the patch, with the patches' corners."""
    x, y, _ = planted(PLANTED_TRAINING, seed=0)
    model = train_classifier(x.numpy(), y.numpy(), architecture=architecture, **TRAINING)
    x, y, corners = planted(max(200, 4 * n_images), seed=1)
    accuracy = evaluate(model, x[:200].numpy(), y[:200].numpy())
    return model, accuracy, x[y == 1][:n_images], corners[y == 1][:n_images]


def method_options(name: str) -> dict:
    return {"aae": str(AAE)} if name == "abele" else {}


def explain(name: str, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The method's maps at its defaults, [B,H,W] float32; UnsupportedModel where it refuses the model."""
    seeds = torch.arange(len(images))
    return get_explainer(name, model, **method_options(name)).explain(images, targets, seeds).maps.detach().float()


def random_reference(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean deletion AUC of random maps on these images: the level every method's maps are set against."""
    seeds = torch.arange(len(images))
    return float(deletion_auc(model, images, random_maps((len(images), *images.shape[2:]), seeds), targets,
                              seeds=seeds, **DELETION).mean())


def deletion_ratio(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor,
                   reference: float | None = None) -> float:
    """Mean deletion AUC of the maps as a fraction of random maps' (``reference``; 1.0 = random)."""
    mine = deletion_auc(model, images, maps, targets, seeds=torch.arange(len(images)), **DELETION).mean()
    return float(mine) / (random_reference(model, images, targets) if reference is None else reference)


def constant_share(maps: torch.Tensor) -> float:
    flat = maps.flatten(1)
    return float((flat.amax(1) == flat.amin(1)).float().mean())


def fully_randomised(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """The model with every layer re-initialised, as the sanity check's last step has it."""
    *_, (_, randomised) = cascading_randomization(model, seed=0, example_input=images[:1])
    return randomised.eval()


def sanity_correlation(name: str, trained_maps: torch.Tensor, randomised: torch.nn.Module, images: torch.Tensor,
                       targets: torch.Tensor) -> float:
    """Mean signed Spearman correlation of the trained and the fully randomised model's maps, as the
    run's check has it (sanity_rank_correlation: 0 where only the randomised map is constant, NaN,
    left out, where the trained one is)."""
    rho = sanity_rank_correlation(trained_maps, explain(name, randomised, images, targets))
    return float(np.nanmean(rho.numpy())) if torch.isfinite(rho).any() else float("nan")


def measure(architecture: str, methods: list[str], digits, n_images: int, n_planted: int, n_sanity: int) -> dict:
    """Per method: deletion / random on the first ``n_images`` test digits, constant share, planted
    hit rate, sanity correlation and seconds, or {"refused": reason}; and the models' accuracies
    (on every test digit given)."""
    (train_x, train_y), (test_x, test_y) = digits
    start = time.perf_counter()
    model = train_digits(architecture, train_x, train_y)
    info = {"train_s": time.perf_counter() - start, "accuracy": evaluate(model, test_x, test_y)}
    x = torch.from_numpy(test_x[:n_images])
    with torch.no_grad():
        targets = model(x).argmax(1)
    reference = random_reference(model, x, targets)
    randomised = fully_randomised(model, x[:n_sanity])
    planted_model, info["planted_accuracy"], planted_x, corners = train_planted(architecture, n_planted)
    rows = {}
    for name in methods:
        start = time.perf_counter()
        try:
            maps = explain(name, model, x, targets)
        except UnsupportedModel as e:
            rows[name] = {"refused": e.reason}
            continue
        row = {"seconds": time.perf_counter() - start, "deletion_ratio": deletion_ratio(model, x, maps, targets, reference),
               "constant": constant_share(maps)}
        row["sanity"] = sanity_correlation(name, maps[:n_sanity], randomised, x[:n_sanity], targets[:n_sanity])
        found = explain(name, planted_model, planted_x, torch.ones(len(planted_x), dtype=torch.long))
        row["planted"] = on_patch(found, corners)
        rows[name] = row
        print(json.dumps({"architecture": architecture, "method": name, **row}), file=sys.stderr, flush=True)
    return {"info": info, "methods": rows}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if "refused" in row:
        return "refused"
    flags = "".join(mark for mark, bad in ((" (const)", row["constant"] > 0.05),
                                           (" (flagged)", row["sanity"] > SANITY_THRESHOLD)) if bad)
    return f"{row['deletion_ratio']:.2f} / {row['planted']:.0%} / {row['sanity']:.2f}{flags}"


def table(results: dict[str, dict], methods: list[str]) -> list[str]:
    architectures = list(results)
    lines = ["| method | " + " | ".join(architectures) + " |", "|---|" + "---:|" * len(architectures)]
    for name in methods:
        lines.append(f"| `{name}` | " + " | ".join(cell(results[a]["methods"].get(name)) for a in architectures) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--methods", default="all")
    parser.add_argument("--images", type=int, default=64, help="test digits for deletion / random")
    parser.add_argument("--planted-images", type=int, default=32)
    parser.add_argument("--sanity-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architecture(s) {', '.join(unknown)}; use {', '.join(ARCHITECTURES)}")
    methods = list_methods() if args.methods == "all" else args.methods.split(",")
    torch.set_num_threads(args.threads)
    digits = mnist(max(1000, args.images))
    results = {a: measure(a, methods, digits, args.images, args.planted_images, args.sanity_images) for a in archs}
    print(f"\n{args.images} test digits, {args.planted_images} planted images, sanity check on "
          f"{args.sanity_images} digits; cells: deletion / random, planted hit rate, sanity rank correlation\n")
    for a in archs:
        info = results[a]["info"]
        print(f"- {a}: {info['accuracy']:.1%} of the first {max(1000, args.images)} test digits "
              f"({info['train_s']:.0f} s of training), "
              f"planted-feature accuracy {info['planted_accuracy']:.1%}")
    print()
    print("\n".join(table(results, methods)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
