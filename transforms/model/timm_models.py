"""timm architectures (``--model timm:NAME``, ``--weights FILE``, ``--model-options`` for
timm.create_model's keyword arguments): built with pretrained=False, so nothing is downloaded,
the weights read by load.read_state_dict (safetensors, or a torch file with weights_only=True),
fused attention switched off so that attention weights exist as tensors, and the preprocessing
from timm's pretrained config of the architecture (``preprocessing``)."""
from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from saliency_audit.transforms.io.preprocess import INTERPOLATIONS, Preprocessing
from saliency_audit.transforms.model.hf import MAX_SIDE
from saliency_audit.transforms.model.load import EAGER_WHY, ModelLoadError, load_weights

# create_model's arguments that fetch or read weights: --weights is the one way in
FORBIDDEN = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _timm(name: str, options: dict[str, Any]):
    """timm, once NAME and the options are known to be usable."""
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ModelLoadError(f"--model timm:{name[:100]!r}: a timm model name is letters, digits, '_', '-' and '.'")
    given = sorted(set(options) & set(FORBIDDEN))
    if given:
        raise ModelLoadError(f"--model-options {', '.join(given)}: timm models take their weights from --weights "
                             "only (nothing is downloaded or read besides it)")
    try:
        import timm
        import timm.data
    except ImportError as e:  # timm, or the torchvision it imports
        raise ModelLoadError(f"--model timm:{name} needs timm and the torchvision it imports ({e.name or e} is "
                             "missing): pip install timm") from None
    if not timm.is_model(name):
        raise ModelLoadError(f"--model timm:{name}: timm has no such model (timm.list_models() lists them)")
    return timm


def _pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(name)
    except RuntimeError as e:  # a tag the architecture does not have
        raise ModelLoadError(f"--model timm:{name}: {e}") from None


def create(name: str, options: dict[str, Any], state: dict[str, torch.Tensor] | None, weights: str | None
           ) -> nn.Module:
    """The architecture with ``state`` loaded (its class count read from the classifier's weights
    unless --model-options gives num_classes), fused attention off."""
    timm = _timm(name, options)
    kwargs = dict(options)
    if state is not None and "num_classes" not in kwargs:
        cfg = _pretrained_cfg(name)
        heads = (cfg.classifier if cfg is not None else None) or "head"
        for head in (heads,) if isinstance(heads, str) else heads:
            weight = state.get(f"{head}.weight")
            if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
                kwargs["num_classes"] = int(weight.shape[0])
                break
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - an option the architecture does not take, a bad value
        raise ModelLoadError(f"timm.create_model({name!r}, **{kwargs}) failed: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None
    if state is not None:
        load_weights(model, state, weights, f"timm:{name}")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # eager: the attention weights exist as tensors
    return model


def attention_entry(model: nn.Module) -> dict[str, Any]:
    """What the manifest says of the attention: eager in every attention module, and what timm
    builds them with unasked (fused scaled_dot_product_attention unless TIMM_FUSED_ATTN=0)."""
    modules = sum(hasattr(m, "fused_attn") for m in model.modules())
    if not modules:
        return {"implementation": "none: no attention modules"}
    from timm.layers import use_fused_attn
    return {"implementation": "eager", "default": "fused" if use_fused_attn() else "eager", "modules": modules,
            "why": EAGER_WHY}


def preprocessing(name: str, options: dict[str, Any], overridden: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Preprocessing fields from timm.data.resolve_data_config on the architecture's pretrained
    config (its img_size and in_chans from --model-options), as timm's eval transform applies
    them: the shorter side to floor(size / crop_pct), a centre crop (torchvision's, rounding the
    margin), its interpolation, mean and std. ``overridden`` ("geometry", "mean", "std",
    "channels"): left unread, the run's flags give them."""
    timm = _timm(name, options)
    cfg = _pretrained_cfg(name)
    args = {k: options[k] for k in ("img_size", "in_chans") if options.get(k) is not None}
    if isinstance(args.get("img_size"), (list, tuple)):
        args["input_size"] = (args.get("in_chans", 3), *args.pop("img_size"))
    try:
        data = timm.data.resolve_data_config(args=args, pretrained_cfg=cfg.to_dict() if cfg is not None else {})
        channels, height, width = (int(v) for v in data["input_size"])
        crop_pct, mode, interpolation = float(data["crop_pct"]), data["crop_mode"], data["interpolation"]
    except (AssertionError, TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"--model timm:{name}: cannot resolve its data config from --model-options "
                             f"{args}: {type(e).__name__} {e}"[:300]) from None
    out: dict[str, Any] = {}
    if "channels" not in overridden:
        out["channels"] = channels
    if "geometry" not in overridden:
        if interpolation not in INTERPOLATIONS:
            raise ModelLoadError(f"--model timm:{name}: interpolation {interpolation!r} is not supported (one of "
                                 f"{', '.join(INTERPOLATIONS)}): give --resize")
        if not 0 < crop_pct <= 1:
            raise ModelLoadError(f"--model timm:{name}: crop_pct {crop_pct} is not in (0, 1]")
        scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
        if max(scaled) > MAX_SIDE:  # img_size 100000 would make every image a 100 GB tensor: refused up front
            raise ModelLoadError(f"--model timm:{name}: input size {height}x{width} (resized to {max(scaled)} px "
                                 f"before the crop) is over {MAX_SIDE} pixels a side")
        if mode == "squash":
            out["resize"] = scaled
        elif mode == "center" and height == width:
            out["resize_shortest"] = scaled[0]
        else:  # ResizeKeepRatio and borders: no Preprocessing equivalent
            raise ModelLoadError(f"--model timm:{name}: crop_mode {mode!r} at input size {height}x{width} is not "
                                 "supported (center on a square, or squash): give --resize")
        out.update(crop=(height, width), crop_offset="round", interpolation=interpolation)
    for key in ("mean", "std"):
        if key not in overridden:
            out[key] = tuple(float(v) for v in data[key])
    try:
        Preprocessing(**out)
    except ValueError as e:
        raise ModelLoadError(f"--model timm:{name}: its data config does not make a preprocessing: {e}") from None
    source = f"timm pretrained_cfg of {name}" + (" and --model-options" if args else "")
    return out, dict.fromkeys(out, source)
