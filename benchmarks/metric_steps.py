"""How many deletion/insertion steps are enough at 224 px: the AUC error of coarse curves against
a fine one, on photographs.

    python benchmarks/metric_steps.py [--images 8] [--methods sal,grad,gradcam,sobel,random]
                                      [--reference 224] [--threads 1] [--json out.json]

Each photograph bundled with scikit-image (astronaut, chelsea, coffee, ...; camera, the grey one, as three equal channels) is centre-cropped,
resized to 224x224 and normalised with ImageNet's mean and std. The model is a ResNet-18-shaped
Hugging Face ResNet at a quarter of its width (basic blocks 2-2-2-2, 16-128 channels, 10 classes)
with random weights (seed 0): nothing is downloaded, a forward pass costs about a tenth of
ResNet-50's, and its softmax is far from flat, so the curves move. Each method explains the predicted class;
every map gets the RISE deletion and insertion curves at ``--reference`` steps (default 224: one
image row per step, RISE's own setting) with the run's default substrate (zero). A curve of s
steps, s a divisor of the reference, is a subset of the reference curve's points (step k of s
changes the first k*HW/s pixels, the same pixels as step k*R/s of R), so one fine curve per map
gives every coarse AUC exactly; the script checks one coarse curve against a direct computation.

Printed per step count s: its cost (2 x (s+1) forward passes per map), the mean and largest
absolute AUC error against the reference, and rank agreement between methods: the share of
(image, method pair) orderings that the coarse AUCs keep, and whether the methods' order by
mean AUC over the images is the reference's. Takes about 10 minutes on one free CPU thread.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "hubble_deep_field", "camera")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 224


def photographs(n: int) -> torch.Tensor:
    """[n,3,224,224] normalised photographs."""
    import skimage.data
    import skimage.transform

    out = []
    for name in PHOTOS[:n]:
        image = getattr(skimage.data, name)().astype(np.float64) / 255
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]  # camera: grey
        side = min(image.shape[:2])
        top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
        image = skimage.transform.resize(image[top:top + side, left:left + side], (SIZE, SIZE), anti_aliasing=True)
        out.append((image - MEAN) / STD)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().contiguous()


def model() -> torch.nn.Module:
    import transformers

    from saliency_audit.transforms.model.hf import LogitsOnly

    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_labels=10, layer_type="basic", depths=[2, 2, 2, 2],
                                       hidden_sizes=[16, 32, 64, 128], embedding_size=16)
    return LogitsOnly(transformers.ResNetForImageClassification(config)).eval()


def divisors(n: int) -> list[int]:
    return [s for s in range(2, n) if n % s == 0]


def main(argv: list[str] | None = None) -> None:
    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.metrics import auc, deletion_curve, insertion_curve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--methods", default="sal,grad,gradcam,sobel,random")
    parser.add_argument("--reference", type=int, default=SIZE)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, images = model(), photographs(args.images)
    with torch.inference_mode():
        probabilities = torch.softmax(net(images), dim=1)
    targets = probabilities.argmax(dim=1)
    seeds = torch.arange(len(images))
    methods = args.methods.split(",")
    start = time.perf_counter()
    curves = {}  # (method, mode) -> [N, R+1]
    for name in methods:
        maps = get_explainer(name, net).explain(images, targets, seeds).maps.detach()
        for mode, curve in (("deletion", deletion_curve), ("insertion", insertion_curve)):
            curves[name, mode] = curve(net, images, maps, targets, steps=args.reference, seeds=seeds)
        if name == methods[0]:  # a coarse curve is the fine one's subset: check it once, directly
            direct = deletion_curve(net, images, maps, targets, steps=16, seeds=seeds)
            subset = curves[name, "deletion"][:, ::args.reference // 16]
            assert torch.allclose(direct, subset, atol=1e-5), float((direct - subset).abs().max())
    seconds = time.perf_counter() - start
    reference = {key: auc(curve).numpy() for key, curve in curves.items()}
    print(f"{len(images)} photographs at {SIZE} px, methods {', '.join(methods)}; target probability on the intact "
          f"images {probabilities.max(dim=1).values.mean():.2f} on average; reference {args.reference} steps; "
          f"{seconds / 60:.1f} min")
    print("| steps | forward passes per map | mode | mean abs AUC error | max abs AUC error | pairs ordered as the "
          "reference | methods' order by mean AUC |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for steps in divisors(args.reference):
        for mode in ("deletion", "insertion"):
            coarse = {name: auc(curves[name, mode][:, ::args.reference // steps]).numpy() for name in methods}
            error = np.abs(np.stack([coarse[name] - reference[name, mode] for name in methods]))
            kept = total = 0
            for a, b in itertools.combinations(methods, 2):
                fine = np.sign(reference[a, mode] - reference[b, mode])
                kept += int((np.sign(coarse[a] - coarse[b]) == fine).sum())
                total += len(fine)
            order = sorted(methods, key=lambda name: coarse[name].mean())
            same = order == sorted(methods, key=lambda name: reference[name, mode].mean())
            row = {"steps": steps, "passes": 2 * (steps + 1), "mode": mode, "mean_error": float(error.mean()),
                   "max_error": float(error.max()), "pairs_kept": kept / total, "same_order": same}
            table.append(row)
            print(f"| {steps} | {row['passes']} | {mode} | {row['mean_error']:.4f} | {row['max_error']:.4f} | "
                  f"{100 * row['pairs_kept']:.0f}% | {'same' if same else ' < '.join(order)} |")
    print("reference mean AUCs: " + "; ".join(
        f"{name} {reference[name, 'deletion'].mean():.3f} / {reference[name, 'insertion'].mean():.3f}"
        for name in methods) + " (deletion / insertion)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": table, "reference": {f"{k[0]}:{k[1]}": v.tolist() for k, v in reference.items()}}, f,
                      indent=1)


if __name__ == "__main__":
    main()
