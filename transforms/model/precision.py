"""--precision: the model's forward passes in a lower precision, everything else in float32.

``fp32`` is IEEE float32 everywhere (on CUDA too: cuDNN's convolutions default to TF32, which
this turns off). ``tf32`` lets CUDA's matmuls and convolutions use TensorFloat-32; it is a CUDA
mode only, so on a CPU it runs as fp32 and is recorded as fp32 (the maps are fp32's, bit for bit).
``bf16`` and ``fp16`` run the model's forward under ``torch.autocast`` and hand float32 logits
back, so every method and metric inherits the precision without code of its own: gradients
reach the input in float32, and the methods' own arithmetic (sums over steps, samples, masks,
channels) and the metrics stay float32. A method whose forwards may not run under autocast
(``Explainer.autocast`` False: the relevance methods, whose rules recompute layers on the
model's FX graph) runs fp32 and records fp32. What each precision does to each method's maps,
measured: docs/performance.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def effective_precision(requested: str, device: torch.device | str, autocast: bool = True) -> str:
    """The precision a method's maps are made at: ``requested``, but fp32 for tf32 off CUDA and
    for a method that does not run under autocast. It is what the manifest and the method's
    fingerprint record, so a tf32 run on a CPU keeps an fp32 history's maps. ``device`` "auto"
    (remote workers that choose their own) leaves tf32 as asked."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "tf32":
        return "tf32" if str(device) == "auto" or torch.device(device).type == "cuda" else "fp32"
    if requested in AUTOCAST and not autocast:
        return "fp32"
    return requested


def precision_problem(requested: str, device: torch.device | str, black_box: bool) -> str | None:
    """Why ``requested`` cannot run here, in one line, or None."""
    if requested in AUTOCAST and black_box:
        return (f"--precision {requested} runs the model's forwards under torch.autocast, which an ONNX file or an "
                f"endpoint does not; use fp32")
    kind = torch.device(device).type
    if requested in AUTOCAST and not torch.amp.is_autocast_available(kind):
        return f"--precision {requested}: torch has no autocast on {kind}"
    return None


def set_matmul_precision(precision: str, device: torch.device | str) -> None:
    """CUDA's float32 matmuls and convolutions: IEEE for fp32, TensorFloat-32 for tf32 (process-wide
    settings; one run per process). Nothing to set off CUDA, or for bf16/fp16 (autocast decides)."""
    if torch.device(device).type != "cuda" or precision in AUTOCAST:
        return
    mode = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def at_precision(model: nn.Module, precision: str, device: torch.device | str) -> nn.Module:
    """``model`` itself for fp32 and tf32; for bf16 and fp16 a twin whose forward runs the model's
    under autocast and answers float32.

    The twin is a shallow copy: it shares every submodule, parameter, buffer and hook with
    ``model``, so a method that hooks a layer by name (the CAMs' ``layer=``, their default layer's
    search) finds the same names, and hooks on the root (the model-call counter) still fire;
    only its own ``forward`` differs, and ``model`` is left as it was."""
    dtype = AUTOCAST.get(precision)
    if dtype is None:
        return model
    kind = torch.device(device).type
    inner = model.forward
    twin = copy.copy(model)

    def forward(*args, **kwargs):
        with torch.autocast(kind, dtype=dtype):
            out = inner(*args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    twin.forward = forward
    return twin
