"""How far each method's maps move when the model runs at a lower --precision, against float32.

    python benchmarks/precision_agreement.py [--models resnet50,vit_s16] [--images 4] [--precision bf16]
        [--steps 16] [--threads 1] [--device cpu] [--json FILE]

For each model and each gradient, CAM and perturbation method, explains the same 224x224 images
(random crops of skimage's photographs, ImageNet normalisation) twice, with the model's forwards
in float32 and under the run's autocast (saliency_audit.transforms.model.precision.at_precision, as
`saliency-audit run --precision` does), for the float32 model's predicted classes (the targets the
pipeline explains at every precision), and prints per method:

- rank: Spearman rank correlation of each image's two maps (mean and minimum over the images);
- deletion: the RISE deletion AUC (--steps steps, zero substrate) of each map, each computed by the
  model at its own precision as the audit computes it; |difference| mean and the float32 mean;
- intg's completeness gap: sum |sum(map) - (f(x) - f(0))| / sum |f(x) - f(0)| over the images, per precision.

The models are Hugging Face's full-size configurations with random weights (transformers'
ResNetConfig() is ResNet-50; ViT-S/16: hidden 384, 12 layers, 6 heads), nothing trained: a random
ResNet-50's softmax is saturated (its top probability is 1.0) and a random ViT's nearly uniform
(~0.004), so deletion AUCs sit near 1 and near 0 and their differences say less than they would on
trained weights. Methods whose defaults cost more than ~30 s per image at 224 px on one CPU thread
run at reduced settings (REDUCED) or not at all (SKIPPED). --tiny runs the tests' 32 px models
(a smoke test, on seeded noise). Not part of the test suite; its numbers are in docs/performance.md.
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
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

# Every gradient, CAM and perturbation method, with the settings that keep it under ~30 s per image.
METHODS = {
    "sal": {}, "grad": {}, "intg": {"n_steps": 16}, "smoothgrad": {"n_samples": 8},
    "expected_gradients": {"n_samples": 8},
    "gradcam": {}, "gradcampp": {}, "xgradcam": {}, "layercam": {}, "eigencam": {},
    "occlusion": {"window": 56, "stride": 28}, "rise": {"n_masks": 64}, "mask": {"n_iter": 20},
}
REDUCED = {"intg": "n_steps 16 (default 50)", "smoothgrad": "n_samples 8 (default 50)",
           "expected_gradients": "n_samples 8 (default 50)",
           "occlusion": "window 56, stride 28 (default 4, 2: 12,321 forwards per image)",
           "rise": "n_masks 64 (default 4,000)", "mask": "n_iter 20 (default 100)"}
SKIPPED = {"hirescam": "gradcam's default weighting: the same maps",
           "scorecam": "1 + 2,048 forwards per image at ResNet-50's last stage",
           "ablationcam": "1 + 2,048 forwards per image at ResNet-50's last stage",
           "xrai": "2 x 100 integrated-gradient steps and a 224 px segmentation per image"}
TINY_METHODS = {"sal": {}, "intg": {"n_steps": 4}, "gradcam": {}}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_s16")
    parser.add_argument("--methods", default=None, help="comma list (default: every measured method)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=16, help="deletion steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA, --precision fp16 is the usual one)")
    parser.add_argument("--tiny", action="store_true", help="the tests' 32 px models and a few cheap methods")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    methods = TINY_METHODS if args.tiny else METHODS
    chosen = args.methods.split(",") if args.methods else list(methods)
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        parser.error(f"unknown or unmeasured method(s): {', '.join(unknown)}")
    args.method_options = {m: methods[m] for m in chosen}
    return args


def build_model(name: str, tiny: bool) -> torch.nn.Module:
    from saliency_audit.transforms.model.hf import LogitsOnly
    if tiny:
        from hf_models import logits_model
        model = logits_model({"resnet50": "resnet50", "vit_s16": "vit"}[name])
    else:
        import transformers as t
        torch.manual_seed(0)
        if name == "resnet50":
            hf = t.ResNetForImageClassification(t.ResNetConfig())
        elif name == "vit_s16":
            hf = t.ViTForImageClassification(t.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                         intermediate_size=1536, num_labels=1000))
        else:
            raise SystemExit(f"unknown model {name}: resnet50 or vit_s16")
        model = LogitsOnly(hf.eval())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def photographs(n: int) -> torch.Tensor:
    """[n,3,224,224] ImageNet-normalised crops of skimage's photographs."""
    from load import rgb_images
    arrays = np.stack(list(rgb_images(n))).astype(np.float32) / 255
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return (images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def explain(model, name: str, options: dict, precision: str, images, targets, seeds, steps: int) -> dict:
    from saliency_audit.explainers import explainer_class, get_explainer
    from saliency_audit.explainers.metrics.causal import deletion_auc
    from saliency_audit.transforms.model.precision import at_precision
    runs = at_precision(model, precision, images.device) if explainer_class(name).autocast else model
    explainer = get_explainer(name, runs, **options)
    start = time.perf_counter()
    result = explainer.explain(images, targets, seeds)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / len(images)
    if result.maps.dtype != torch.float32:
        raise AssertionError(f"{name} at {precision}: maps are {result.maps.dtype}, not float32")
    with torch.no_grad():
        auc = deletion_auc(runs, images, result.maps, targets, steps=steps, seeds=seeds)
    out = {"maps": result.maps.detach(), "deletion": auc, "s_per_image": seconds}
    if name == "intg":  # (expected_gradients' delta is against random baselines, not f(0))
        with torch.no_grad():
            logits = runs(torch.cat([images, torch.zeros_like(images)])).float()
        score = logits.gather(1, torch.cat([targets, targets])[:, None])[:, 0]
        change = score[:len(images)] - score[len(images):]
        out["completeness_gap"] = (result.extras["convergence_delta"].abs().sum() / change.abs().sum()).item()
    return out


def measure(model, images, methods: dict, precision: str, steps: int) -> list[dict]:
    from saliency_audit.explainers.metrics.sanity import spearman_rank_correlation
    with torch.no_grad():
        targets = model(images).argmax(dim=1)  # the float32 model's classes, as the pipeline's targets
    seeds = torch.arange(len(images), dtype=torch.int64)
    rows = []
    for name, options in methods.items():
        low = explain(model, name, options, precision, images, targets, seeds, steps)
        full = explain(model, name, options, "fp32", images, targets, seeds, steps)
        rank = spearman_rank_correlation(full["maps"], low["maps"])
        # A constant map (all 0 after a CAM's ReLU) has no ranking: its image is left out of the mean and
        # the minimum, and counted: constant at both precisions (they agree), or at one only (they do not).
        ranked = rank[~rank.isnan()]
        flat = [(m["maps"].flatten(1).amax(1) == m["maps"].flatten(1).amin(1)) for m in (full, low)]
        row = {"method": name, "rank_mean": rank.nanmean().item(),
               "rank_min": ranked.min().item() if len(ranked) else float("nan"),
               "constant_both": int((flat[0] & flat[1]).sum()), "constant_one": int((flat[0] ^ flat[1]).sum()),
               "deletion_diff": (low["deletion"] - full["deletion"]).abs().mean().item(),
               "deletion_fp32": full["deletion"].mean().item(),
               "s_fp32": full["s_per_image"], f"s_{precision}": low["s_per_image"]}
        if "completeness_gap" in full:
            row.update(gap_fp32=full["completeness_gap"], gap_low=low["completeness_gap"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], precision: str) -> str:
    lines = [f"| method | rank corr. mean (min) | deletion AUC: \\|{precision} - fp32\\| (fp32 mean) | "
             f"intg completeness gap fp32 / {precision} | s/image fp32 / {precision} |",
             "|---|---|---|---|---|"]
    for r in rows:
        gap = f"{r['gap_fp32']:.1e} / {r['gap_low']:.1e}" if "gap_fp32" in r else ""
        constant = "".join(f", {r[key]} {what}" for key, what in (("constant_both", "constant at both"),
                                                                   ("constant_one", "constant at one precision"))
                           if r.get(key))
        lines.append(f"| {r['method']} | {r['rank_mean']:.3f} ({r['rank_min']:.3f}{constant}) | "
                     f"{r['deletion_diff']:.1e} ({r['deletion_fp32']:.3f}) | {gap} | "
                     f"{r['s_fp32']:.2f} / {r[f's_{precision}']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 32 if args.tiny else 224
    # (--tiny: seeded noise; the photographs' loader imports the whole pipeline, seconds a smoke test need not pay)
    images = (torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1 if args.tiny
              else photographs(args.images))
    figures = {"precision": args.precision, "images": args.images, "size": size, "steps": args.steps,
               "threads": args.threads, "device": args.device, "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        model = build_model(name, args.tiny).to(args.device)
        rows = measure(model, images.to(args.device), args.method_options, args.precision, args.steps)
        figures["models"][name] = rows
        print(f"\n{name}, {args.images} images at {size} px, {args.precision} vs fp32:\n{table(rows, args.precision)}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
