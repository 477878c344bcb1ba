"""Per-method speed with --compile (torch.compile of the model) against eager, on this machine.

    python benchmarks/compile_speed.py [--models tiny_resnet50,resnet50] [--images 4] [--repeats 2]
        [--threads 1] [--json FILE]

For each model and each method that runs on the compiled model (Explainer.compiles: the gradient,
perturbation and black-box methods; the CAMs and relevance methods hook layers and stay eager),
times explaining the same batch with the eager model and with the compiled one, as the pipeline
hands it to the methods (saliency_audit.transforms.model.compiled.CompiledModel, inductor): the first
compiled call (compilation of every new input shape included; the model is shared, so a shape
another method compiled before is not compiled again) and the fastest of --repeats calls after it.
Models: tiny_resnet50 (the tests' 32 px ResNet-50-shaped network, random weights) and resnet50
(transformers' ResNetConfig(), 224 px, random weights). Method settings are cut to keep a 224 px
image under a few seconds (METHODS). Not part of the test suite; its numbers are in
docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

METHODS = {"sal": {}, "grad": {}, "intg": {"n_steps": 8}, "smoothgrad": {"n_samples": 8},
           "occlusion": {"window": 56, "stride": 28}, "rise": {"n_masks": 32}}
SIZES = {"tiny_resnet50": 32, "resnet50": 224}
TINY_OPTIONS = {"occlusion": {"window": 8, "stride": 4}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_resnet50,resnet50")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default=None, help="torch.compile backend (default: the pipeline's, inductor)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in SIZES:
            parser.error(f"unknown model {name}: {', '.join(SIZES)}")
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unmeasured method(s): {', '.join(unknown)}")
    return args


def build_model(name: str) -> torch.nn.Module:
    if name == "tiny_resnet50":
        from hf_models import logits_model
        model = logits_model("resnet50")
    else:
        import transformers as t

        from saliency_audit.transforms.model.hf import LogitsOnly
        torch.manual_seed(0)
        model = LogitsOnly(t.ResNetForImageClassification(t.ResNetConfig()).eval())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model, size: int, methods: list[str], n: int, repeats: int, tiny: bool) -> list[dict]:
    from saliency_audit.explainers import explainer_class, get_explainer
    from saliency_audit.explainers.metrics.sanity import spearman_rank_correlation
    from saliency_audit.transforms.model.compiled import CompiledModel
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    seeds = torch.arange(n)
    compiled = CompiledModel(model)
    rows = []
    for name in methods:
        if not explainer_class(name).compiles:
            continue
        options = {**METHODS[name], **(TINY_OPTIONS.get(name, {}) if tiny else {})}
        eager, fast = get_explainer(name, model, **options), get_explainer(name, compiled, **options)
        eager.explain(images, targets, seeds)  # warm-up
        eager_s = min(timed(lambda: eager.explain(images, targets, seeds)) for _ in range(repeats))
        first_s = timed(lambda: fast.explain(images, targets, seeds))
        fast_s = min(timed(lambda: fast.explain(images, targets, seeds)) for _ in range(repeats))
        ours, theirs = eager.explain(images, targets, seeds).maps, fast.explain(images, targets, seeds).maps
        same = torch.allclose(ours, theirs, rtol=1e-3, atol=1e-5)
        rank = spearman_rank_correlation(ours, theirs)
        row = {"method": name, "options": options, "eager_s_per_image": eager_s / n,
               "compiled_s_per_image": fast_s / n, "speedup": eager_s / fast_s, "first_compiled_call_s": first_s,
               "maps_close": bool(same), "rank_min": rank.min().item(),
               "max_difference": ((ours - theirs).abs().max() / ours.abs().max()).item(), "fell_back": compiled.failure}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend:
        from saliency_audit.transforms.model import compiled
        compiled.BACKEND = args.backend
    figures = {"images": args.images, "threads": args.threads, "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        rows = measure(build_model(name), SIZES[name], args.methods.split(","), args.images, args.repeats,
                       name.startswith("tiny"))
        figures["models"][name] = rows
        print(f"\n{name} at {SIZES[name]} px, batch of {args.images}, {args.threads} thread(s):")
        print("| method | eager s/image | compiled s/image | speedup | first compiled call s | "
              "rank corr. with eager (least) | max \\|difference\\| / max \\|map\\| |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['eager_s_per_image']:.4f} | {r['compiled_s_per_image']:.4f} | "
                  f"{r['speedup']:.2f} | {r['first_compiled_call_s']:.0f} | {r['rank_min']:.5f} | "
                  f"{r['max_difference']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
