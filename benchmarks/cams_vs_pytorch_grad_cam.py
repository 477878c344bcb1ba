"""The CAM family: ours vs pytorch-grad-cam 1.5.7, per image, on the same model, layer and images.

    python benchmarks/cams_vs_pytorch_grad_cam.py [--images 64] [--threads 1] [--batch-size 32]

On the first N bundled demo digits and the demo CNN (its default layer, relu2: 64 channels at
14x14), each method runs over the images in batches of --batch-size, ours and pytorch-grad-cam's
side by side in one run (alternating, best of three rounds), and the table gives milliseconds per
image, the ratio, and the largest difference of the min-max scaled maps (pytorch-grad-cam scales
every map to [0, 1]; ours stay raw). pytorch-grad-cam is a test-only dependency:
    pip install --no-deps grad-cam==1.5.7 ttach opencv-python-headless
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from saliency_audit.explainers import get_explainer  # noqa: E402

CLASSES = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "eigencam": "EigenCAM"}


def import_grad_cam():
    """pytorch_grad_cam with torchvision stand-ins while it imports (it imports names it never
    calls for these methods; torchvision has no CPU wheel here)."""
    def stand_in(name):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: (_ for _ in ()).throw(AttributeError(attr)) if attr.startswith("__") \
            else type(attr, (), {})
        return module
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    fake = {} if importlib.util.find_spec("torchvision") else {n: stand_in(n) for n in names}
    sys.modules.update(fake)
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    finally:
        for name in fake:
            sys.modules.pop(name, None)
    return pytorch_grad_cam, ClassifierOutputTarget


def load(n: int):
    from saliency_audit.transforms.io.preprocess import Preprocessing, decode, preprocess
    from saliency_audit.transforms.io.readers import read_shard
    from saliency_audit.transforms.model.load import ModelSpec, load_model
    demo = ROOT / "pipelines" / "demo_data"
    # the loader freezes the weights; pytorch-grad-cam backpropagates to them (ours to the input)
    model = load_model(ModelSpec("saliency_audit.pipelines.training.reference_model:mnist_cnn", str(demo / "mnist_cnn.pt"))).requires_grad_(True)
    prep = Preprocessing(channels=1)
    records = [r for _, r in zip(range(n), read_shard(str(demo / "mnist-test-sample.tar")))]
    return model, torch.from_numpy(np.stack([preprocess(decode(r, prep.max_pixels), prep) for r in records]))


class LogProbability:
    def __init__(self, category: int):
        self.category = category

    def __call__(self, output):
        return torch.log_softmax(output, dim=-1)[..., self.category]


def min_max(maps: np.ndarray) -> np.ndarray:
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lib, Target = import_grad_cam()
    model, images = load(args.images)
    with torch.no_grad():
        targets = model(images).argmax(1)
    batches = [(images[i:i + args.batch_size], targets[i:i + args.batch_size])
               for i in range(0, len(images), args.batch_size)]
    layer = model.relu2 if hasattr(model, "relu2") else None
    print(f"{len(images)} demo digits, batches of {args.batch_size}, {args.threads} torch thread(s), layer relu2\n")
    print("| method | ours ms / image | pytorch-grad-cam ms / image | theirs / ours | max difference (min-max scaled) |")
    print("|---|---:|---:|---:|---:|")
    for name, cls in CLASSES.items():
        # gradcam's default weighting is HiResCAM's (elementwise); pytorch-grad-cam's GradCAM is "mean"
        ours_explainer = get_explainer(name, model, layer="relu2", **({"weighting": "mean"} if name == "gradcam" else {}))
        # its ScoreCAM weighs channels by a softmax over channels of the target: of log p that is
        # p / sum(p), our weights up to a factor per image
        target = LogProbability if name == "scorecam" else Target
        theirs_cam = getattr(lib, cls)(model, [layer])
        if hasattr(theirs_cam, "batch_size"):
            theirs_cam.batch_size = args.batch_size  # ScoreCAM/AblationCAM: masked images per forward
        best = {"ours": float("inf"), "theirs": float("inf")}
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = np.concatenate([ours_explainer.explain(x, t).maps.detach().numpy() for x, t in batches])
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            start = time.perf_counter()
            theirs = np.concatenate([theirs_cam(input_tensor=x, targets=[target(int(c)) for c in t])
                                     for x, t in batches])
            best["theirs"] = min(best["theirs"], time.perf_counter() - start)
        # eigencam: its sign is whatever its SVD returned (ours: the larger extreme positive), so
        # its maps can be the other half of the projection; tests/explainers/test_cam_family.py compares both
        difference = float(np.abs(min_max(ours) - theirs).max())
        ms = {k: 1000 * v / len(images) for k, v in best.items()}
        print(f"| `{name}` | {ms['ours']:.2f} | {ms['theirs']:.2f} | {ms['theirs'] / ms['ours']:.1f}x "
              f"| {difference:.1e} |")


if __name__ == "__main__":
    main()
