"""Does every method run, or refuse in one line, on architectures the test suite does not build?

Each architecture below is built small with random weights, saved, and loaded back through the
product's own loaders: a Hugging Face folder (save_pretrained + preprocessor_config.json) through
``hf:FOLDER``, a timm architecture through ``timm:NAME --weights FILE.safetensors``. Every method
but the heavy ones then explains 2 photos (skimage's astronaut and cat, preprocessed as the model
says). Random weights: the maps' quality is not judged, only how each method ends:

- ok, or refused (UnsupportedModel: its one-line reason);
- CRASH (exception type, message, the innermost frame in our code), TIMEOUT (over --limit s);
- NaN, constant (an image's map is one value), wrong shape (not [2, H, W]);

and where it looked: a CAM's ``layer_used``/``layer_reshape``, the token row an attention method
reads (``captured["row"]``). Each architecture also records ``logit_spread``, max |logits(photo 1)
- logits(photo 2)| / max |logits|: near 0, the random model hardly reads its input, and a constant
map there is the model's, not the method's.

    python benchmarks/architecture_sweep.py [--source hf,timm] [--archs beit,resnet18] [--methods gradcam,lrp]
                                            [--limit 60] [--defaults] [--json FILE] [--md FILE]

Writes --json (every row) and --md (a summary per architecture and the rows that are not ok; the
tables of docs/architectures.md). One torch thread; the default set takes about 6 minutes. timm is
imported under the tests' torchvision stand-in (tests/conftest.py): nothing here needs torchvision.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"rise", "abele", "anchor", "lore", "xrai"}  # minutes per image, or (abele) an autoencoder to train
CLASSES = 10
# The sweep asks whether each method's code runs on the architecture, not how well it converges:
# fewer iterations and samples than the defaults (--defaults runs those), a fifth of the time
FEWER = {"mask": {"n_iter": 20}, "lime": {"n_samples": 200}, "intg": {"n_steps": 16},
         "expected_gradients": {"n_samples": 16}, "smoothgrad": {"n_samples": 10}}
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


class Arch(NamedTuple):
    label: str
    source: str  # "hf": transformers' {name}ForImageClassification / {name}Config; "timm": a timm model name
    name: str
    options: dict  # the config's (hf) or create_model's (timm) keyword arguments
    size: int  # input side in pixels: as small as the architecture takes, for time


_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_labels": CLASSES}
_TWO_STAGES = {"depths": [1, 1], "num_labels": CLASSES}
ARCHS = [
    Arch("beit", "hf", "Beit", {**_VIT, "intermediate_size": 64, "use_relative_position_bias": True}, 32),
    Arch("data2vec", "hf", "Data2VecVision", {**_VIT, "intermediate_size": 64, "use_relative_position_bias": True}, 32),
    Arch("dinov2", "hf", "Dinov2", {**_VIT, "mlp_ratio": 2}, 32),
    Arch("dinov2reg", "hf", "Dinov2WithRegisters", {**_VIT, "mlp_ratio": 2, "num_register_tokens": 4}, 32),
    Arch("swinv2", "hf", "Swinv2", {**_TWO_STAGES, "image_size": 32, "patch_size": 2, "embed_dim": 16,
                                    "num_heads": [1, 2], "window_size": 4}, 32),
    Arch("convnextv2", "hf", "ConvNextV2", {**_TWO_STAGES, "num_stages": 2, "hidden_sizes": [8, 16]}, 32),
    # hidden_dim = round_filters(1280) at this width: the top batch norm's channels
    Arch("efficientnet", "hf", "EfficientNet", {"image_size": 32, "width_coefficient": 0.25, "depth_coefficient": 0.25,
                                                "hidden_dim": 320, "num_labels": CLASSES}, 32),
    Arch("mobilenetv1", "hf", "MobileNetV1", {"image_size": 32, "depth_multiplier": 0.25, "num_labels": CLASSES}, 32),
    Arch("mobilenetv2", "hf", "MobileNetV2", {"image_size": 32, "depth_multiplier": 0.25, "num_labels": CLASSES}, 32),
    Arch("mobilevit", "hf", "MobileViT", {"image_size": 64, "hidden_sizes": [16, 24, 32], "num_attention_heads": 2,
                                          "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "num_labels": CLASSES}, 64),
    Arch("mobilevitv2", "hf", "MobileViTV2", {"image_size": 64, "width_multiplier": 0.25, "num_labels": CLASSES}, 64),
    Arch("regnet", "hf", "RegNet", {**_TWO_STAGES, "embedding_size": 8, "hidden_sizes": [8, 16], "groups_width": 8},
         32),
    Arch("bit", "hf", "Bit", {**_TWO_STAGES, "embedding_size": 8, "hidden_sizes": [16, 32], "num_groups": 4}, 32),
    # 64 px: the first stage ends in its subsampling attention (4x4 -> 2x2 tokens)
    Arch("levit", "hf", "Levit", {"image_size": 64, "hidden_sizes": [16, 24, 32], "num_attention_heads": [1, 2, 2],
                                  "depths": [1, 1, 1], "key_dim": [8, 8, 8], "num_labels": CLASSES}, 64),
    # stage 0 attends to keys reduced 2x (sequence reduction): attention that is not tokens x tokens
    Arch("pvt", "hf", "Pvt", {**_TWO_STAGES, "image_size": 32, "num_encoder_blocks": 2, "hidden_sizes": [16, 32],
                              "sequence_reduction_ratios": [2, 1], "patch_sizes": [4, 2], "strides": [4, 2],
                              "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}, 32),
    Arch("pvtv2", "hf", "PvtV2", {**_TWO_STAGES, "image_size": 32, "num_encoder_blocks": 2, "hidden_sizes": [16, 32],
                                  "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2],
                                  "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}, 32),
    # depth[i] >= i + 1: CvtStage indexes its drop-path list by the stage number. At 128 px the last
    # stage's keys and values (stride 2, 4x4) are coarser than its tokens (8x8), as at 224 px
    Arch("cvt", "hf", "Cvt", {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3],
                              "num_labels": CLASSES}, 128),
    Arch("poolformer", "hf", "PoolFormer", {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
                                            "num_labels": CLASSES}, 64),
    Arch("focalnet", "hf", "FocalNet", {**_TWO_STAGES, "image_size": 32, "patch_size": 4, "embed_dim": 16,
                                        "focal_levels": [2, 2], "focal_windows": [3, 3], "hidden_sizes": [32, 64]}, 32),
    # Hiera's tokens are in raster order only after its last query pooling: at 64 px (2x2 there) a
    # CAM steps back into the unrolled stages, at 128 px (4x4) it does not
    *(Arch(f"hiera{side}", "hf", "Hiera", {"image_size": [side, side], "embed_dim": 16, "depths": [1, 1, 1, 1],
                                           "num_heads": [1, 1, 2, 2], "num_labels": CLASSES}, side)
      for side in (64, 128)),
    Arch("swiftformer", "hf", "SwiftFormer", {"image_size": 64, "depths": [1, 1, 1, 1], "embed_dims": [8, 16, 24, 32],
                                              "num_labels": CLASSES}, 64),
    Arch("resnet18", "timm", "resnet18", {}, 64),
    Arch("vit_tiny", "timm", "vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, 64),
    # the eval head averages the class and distillation tokens' heads
    Arch("deit_tiny_dist", "timm", "deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, 64),
    Arch("vit_reg4_dinov2", "timm", "vit_small_patch14_reg4_dinov2", {"img_size": 56, "depth": 2}, 56),
    # no class token: 4 registers, then the patches, which the head averages
    Arch("vit_reg4_gap", "timm", "vit_little_patch16_reg4_gap_256", {"img_size": 64, "depth": 2}, 64),
    Arch("eva02_tiny", "timm", "eva02_tiny_patch14_224", {"img_size": 56, "depth": 2}, 56),
    Arch("beit_base", "timm", "beit_base_patch16_224", {"img_size": 64, "depth": 2, "embed_dim": 192, "num_heads": 3},
         64),
    Arch("swin_tiny", "timm", "swin_tiny_patch4_window7_224", {"img_size": 112, "depths": (1, 1, 1, 1),
                                                               "embed_dim": 24, "num_heads": (1, 2, 3, 6)}, 112),
    Arch("convnext_atto", "timm", "convnext_atto", {}, 64),
    # 112 px: squeeze-excitation's 1x1 convolutions on pooled features beside a 4x4 final grid
    Arch("efficientnet_b0", "timm", "efficientnet_b0", {}, 112),
    Arch("mobilenetv3_small", "timm", "mobilenetv3_small_100", {}, 112),
    Arch("regnety_002", "timm", "regnety_002", {}, 64),
    Arch("levit_128s", "timm", "levit_128s", {"img_size": 128}, 128),
    Arch("coatnet_nano", "timm", "coatnet_nano_rw_224", {"img_size": 64}, 64),
    Arch("maxvit_pico", "timm", "maxvit_pico_rw_256", {"img_size": 64}, 64),
    Arch("caformer_s18", "timm", "caformer_s18", {}, 64),  # its depths and widths are fixed by its name
    Arch("poolformer_s12", "timm", "poolformer_s12", {}, 64),
    Arch("fastvit_sa12", "timm", "fastvit_sa12", {}, 64),
]


# Out of the default set (--archs names them): at 64 px each takes 1 to 3 minutes on one thread, and
# HF PoolFormer and timm CoAtNet already cover their structure
SLOW = {"caformer_s18", "maxvit_pico", "poolformer_s12"}


class Timeout(Exception):
    pass


def import_timm():
    """timm, imported under the tests' torchvision stand-in (timm imports torchvision names that
    nothing here calls; torchvision has no CPU wheel here)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from conftest import torchvision_stand_in
    with torchvision_stand_in():
        import timm
        import timm.data
        import timm.layers
    return timm


@torch.no_grad()
def reinit(model: torch.nn.Module):
    """Fan-in-scaled random weights everywhere: several inits leave a tiny random model degenerate
    (zero-initialised heads and layer scales; MobileViT's logits exactly 0), and a constant map there
    says nothing about the method."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, p[0].numel() ** -0.5)
        elif name.endswith("bias"):
            p.normal_(0, 0.02)
        else:  # norms' scales, layer scales
            p.normal_(1, 0.1)


def save(arch: Arch, folder: str):
    """The random model, saved where its loader reads it; returns the ModelSpec that loads it."""
    from safetensors.torch import save_file

    from saliency_audit.transforms.model.load import ModelSpec
    torch.manual_seed(0)
    if arch.source == "hf":
        import transformers
        transformers.utils.logging.disable_progress_bar()  # save_pretrained's, on every architecture
        config = getattr(transformers, f"{arch.name}Config")(**arch.options)
        model = getattr(transformers, f"{arch.name}ForImageClassification")(config)
        reinit(model)
        model.save_pretrained(folder)
        processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
                     "size": {"height": arch.size, "width": arch.size}, "rescale_factor": 1 / 255,
                     "do_normalize": True, "image_mean": IMAGENET["mean"], "image_std": IMAGENET["std"]}
        Path(folder, "preprocessor_config.json").write_text(json.dumps(processor))
        return ModelSpec(f"hf:{folder}")
    model = import_timm().create_model(arch.name, pretrained=False, num_classes=CLASSES, **arch.options)
    reinit(model)
    weights = f"{folder}/weights.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, weights)
    return ModelSpec(f"timm:{arch.name}", weights, model_options=dict(arch.options))  # classes read from the head


def photos(size: int, preprocessing: dict) -> torch.Tensor:
    """Two skimage photos at size x size, normalised with the model's mean and std (ImageNet's where
    it names none)."""
    from skimage import data
    from skimage.transform import resize
    images = [resize(getattr(data, n)()[..., :3], (size, size), anti_aliasing=True) for n in ("astronaut", "chelsea")]
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(preprocessing.get(k) or IMAGENET[k], dtype=torch.float32)[:, None, None]
                 for k in ("mean", "std"))
    return (x - mean) / std


def our_frame(tb) -> str:
    """The innermost frame in the product (not torch, transformers or timm, not this script): where
    a crash is ours to fix."""
    frames = [f for f in traceback.extract_tb(tb) if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
              and "/benchmarks/" not in f.filename]
    return f"{os.path.relpath(frames[-1].filename, ROOT)}:{frames[-1].lineno}" if frames else "-"


def outcome(maps: torch.Tensor, images: torch.Tensor) -> tuple[str, str]:
    """(status, detail) of maps that came back."""
    if tuple(maps.shape) != (len(images), *images.shape[2:]):
        return "wrong shape", str(tuple(maps.shape))
    if not torch.isfinite(maps).all():
        return "NaN", f"{int((~torch.isfinite(maps)).sum())} non-finite values"
    flat = maps.flatten(1).float()
    constant = (flat.amax(1) == flat.amin(1)).tolist()
    if any(constant):
        return "constant", f"image(s) {[i for i, c in enumerate(constant) if c]} all {flat[:, 0].tolist()}"
    return "ok", ""


def explain(method: str, model, images, targets, limit: int, options: dict) -> dict:
    """One method on both images: its status, and where it looked."""
    from saliency_audit.explainers import get_explainer
    from saliency_audit.explainers.core.base import UnsupportedModel

    def alarm(*_):
        raise Timeout(f"over {limit} s")
    row, explainer, start = {"method": method}, None, time.perf_counter()
    signal.signal(signal.SIGALRM, alarm)  # the main thread's only way to stop a slow torch loop
    signal.alarm(limit)
    try:
        explainer = get_explainer(method, model, **options)
        maps = explainer.explain(images, targets, torch.arange(len(images))).maps.detach()
        row["status"], row["detail"] = outcome(maps, images)
    except UnsupportedModel as e:
        row["status"], row["detail"] = "refused", e.reason
    except Timeout as e:
        row["status"], row["detail"] = "TIMEOUT", str(e)
    except Exception as e:  # noqa: BLE001 - a sweep records every failure
        row["status"], row["detail"] = "CRASH", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        row["where"] = our_frame(e.__traceback__)
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - start, 2)
    for key in ("layer_used", "layer_reshape"):
        if getattr(explainer, key, None):
            row[key] = getattr(explainer, key)
    if isinstance(getattr(explainer, "captured", None), dict) and "row" in explainer.captured:
        row["row"] = str(explainer.captured["row"])
    return row


def sweep(arch: Arch, methods: list[str], limit: int, options: dict) -> dict:
    from saliency_audit.transforms.model.load import load_model, model_preprocessing
    result = {"arch": arch.label, "source": arch.source, "name": arch.name, "size": arch.size, "rows": []}
    with tempfile.TemporaryDirectory(prefix=f"sweep-{arch.label}-") as folder:
        try:
            spec = save(arch, folder)
            model = load_model(spec)
            images = photos(arch.size, model_preprocessing(spec, set())[0])
        except Exception as e:  # noqa: BLE001 - an architecture that cannot be built or loaded is a row too
            result["load"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]} at {our_frame(e.__traceback__)}"
            return result
    with torch.no_grad():
        logits = model(images).float()
    result["load"] = "ok"
    result["logit_spread"] = float((logits[0] - logits[1]).abs().max() / logits.abs().max().clamp_min(1e-30))
    for method in methods:
        row = explain(method, model, images, logits.argmax(1), limit, options.get(method, {}))
        print(f"{arch.source:4s} {arch.label:18s} {method:18s} {row['status']:8s} {row['seconds']:6.2f}s "
              f"{row.get('layer_used') or row.get('row') or ''} {row['detail'][:100]} {row.get('where', '')}",
              flush=True)
        result["rows"].append(row)
    return result


def kind(reason: str) -> str:
    """A refusal's first clause: the kind of refusal, without the modules and counts that follow."""
    return re.split(r"[;(]", reason)[0].strip(" ,")


def markdown(results: list[dict]) -> str:
    """The summary per architecture; the rows that are neither ok nor refused; the refusals, grouped
    by kind and by the methods refused together (the JSON has each one's full reason)."""
    lines = ["| source | architecture | px | ok | refused | other | CAM layer (gradcam) | logit spread |",
             "|---|---|---|---|---|---|---|---|"]
    refusals, others = defaultdict(list), []
    for r in results:
        name = f"{r['source']}:{r['arch']}"
        if r["load"] != "ok":
            lines.append(f"| {r['source']} | {r['arch']} | {r['size']} | - | - | - | load failed: {r['load']} | |")
            continue
        counts = Counter(row["status"] if row["status"] in ("ok", "refused") else "other" for row in r["rows"])
        cam = next((row for row in r["rows"] if row["method"] == "gradcam"), {})
        layer = f"`{cam['layer_used']}` ({cam.get('layer_reshape') or 'BCHW'})" if cam.get("layer_used") else "-"
        lines.append(f"| {r['source']} | {r['arch']} | {r['size']} | {counts['ok']} | {counts['refused']} | "
                     f"{counts['other']} | {layer} | {r['logit_spread']:.2g} |")
        kinds = defaultdict(list)
        for row in r["rows"]:
            if row["status"] == "refused":
                kinds[kind(row["detail"])].append(row["method"])
            elif row["status"] != "ok":
                detail = f"{row['detail']} {row.get('where', '')}".strip().replace("|", "/")
                others.append(f"| {name} | {row['method']} | {row['status']} | {detail} | {r['logit_spread']:.2g} |")
        for why, methods in kinds.items():
            refusals[why, ", ".join(methods)].append(name)
    lines += ["", "| architecture | method | status | detail | logit spread |", "|---|---|---|---|---|", *others,
              "", "| refused because | methods | architectures |", "|---|---|---|"]
    lines += [f"| {why} | {methods} | {', '.join(archs)} |" for (why, methods), archs in refusals.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    from saliency_audit.explainers import list_methods
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="hf,timm", help="hf, timm or both")
    parser.add_argument("--archs", help="labels from ARCHS (default: all of --source but SLOW)")
    parser.add_argument("--methods", default=",".join(m for m in list_methods() if m not in HEAVY))
    parser.add_argument("--limit", type=int, default=60, help="seconds per (architecture, method)")
    parser.add_argument("--defaults", action="store_true", help="every method at its default iterations and samples")
    parser.add_argument("--json", help="every row, as JSON")
    parser.add_argument("--md", help="the summary and not-ok tables, as Markdown")
    args = parser.parse_args(argv)
    sources, labels = args.source.split(","), args.archs and args.archs.split(",")
    archs = [a for a in ARCHS if a.source in sources and (a.label in labels if labels else a.label not in SLOW)]
    if labels and not archs:
        parser.error(f"no architecture {labels} in --source {args.source}")
    torch.set_num_threads(1)
    results = []
    for arch in archs:
        results.append(sweep(arch, args.methods.split(","), args.limit, {} if args.defaults else FEWER))
        if args.json:  # after each architecture: a long run that stops keeps what it did
            Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        Path(args.md).write_text(markdown(results))
    return results


if __name__ == "__main__":
    main()
