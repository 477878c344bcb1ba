"""The explainer interface: a batch of images and targets in, a batch of maps (and extras) out."""
from __future__ import annotations

import math

import dataclasses
import inspect
from typing import Any, ClassVar

import torch


@dataclasses.dataclass
class Explanation:
    """What one explainer returns for a batch of B images.

    maps: float tensor [B, H, W], raw values (never normalised), channels summed.
    extras: per-image method outputs, each a tensor or list with first dimension B
        (for example IG's convergence delta); the column types are declared by the
        explainer's ``extras`` class attribute.
    """

    maps: torch.Tensor
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


# Images per forward pass when a method's max_forward_batch is None. CPU caches favour small
# chunks (the demo CNN runs 8.5k images/s in chunks of 32 on 2 cores, 4.2k in chunks of 1024);
# an accelerator wants large ones.
CPU_FORWARD_CHUNK, ACCELERATOR_FORWARD_CHUNK = 32, 1024


def forward_chunk(requested: int | None, device: torch.device | str) -> int:
    """The images per forward pass: ``requested`` when given, else a size that suits ``device``."""
    if requested is not None:
        return requested
    return CPU_FORWARD_CHUNK if torch.device(device).type == "cpu" else ACCELERATOR_FORWARD_CHUNK


CHUNK_BUDGET_BYTES = 16 * 2**20  # input images per forward chunk, at most (perturbation methods, metrics)


def chunk_within_budget(requested: int, image_shape: tuple[int, ...] | torch.Size) -> int:
    """``requested`` images per chunk, fewer where they would exceed CHUNK_BUDGET_BYTES (at least 1)."""
    return max(1, min(requested, CHUNK_BUDGET_BYTES // (4 * math.prod(image_shape))))


def padded_chunks(fn, inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over ``inputs`` in chunks of exactly ``chunk`` rows (the last one padded with copies of
    its last row), concatenated. Kernels pick their blocking from the batch size, so a row's
    result can differ in the last bits with the number of rows beside it; a fixed size makes it
    depend on that row alone, so discrete decisions (argmax, rules, exemplar choice) do not
    change with which other images share the batch."""
    out = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start:start + chunk]
        n = len(part)
        if n < chunk:
            part = torch.cat([part, part[-1:].expand(chunk - n, *part.shape[1:])])
        out.append(fn(part)[:n])
    return torch.cat(out)


def check_chunk(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")


class Explainer:
    """Base class of every registered method.

    Subclasses set ``name`` (the registered short name), ``signed`` (whether the map
    carries a sign), ``passes`` (forward/backward passes per image, for cost and the
    compute floor), ``extras`` (name -> column type: "float32", "int64", "string",
    "float32[]", "int32[]") and implement ``explain``.  Keyword arguments of
    ``__init__`` are the method's options; ``options()`` reports their resolved values
    so a run can record them.
    """

    name: ClassVar[str] = ""
    signed: ClassVar[bool] = True
    extras: ClassVar[dict[str, str]] = {}

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def explain(self, images: torch.Tensor, targets: torch.Tensor,
                seeds: torch.Tensor | None = None) -> Explanation:
        """Explain ``targets`` [B] (class indices) for ``images`` [B,C,H,W].

        ``seeds`` [B] int64 seeds one image each (the pipeline derives them from the
        image id); a stochastic method must make each image's result depend only on
        that image, its target and its seed, never on the rest of the batch, so results
        reproduce on every runner whatever the batching. None means seed 0 for all.
        """
        raise NotImplementedError

    def passes(self) -> dict[str, int]:
        """Passes per image, e.g. {"forward": 50, "backward": 50}."""
        return {"forward": 1, "backward": 1}

    def options(self) -> dict[str, Any]:
        """The method's options with their resolved values, for the manifest."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k not in ("self", "model") and hasattr(self, k)}


def check_batch(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Raise a clear ValueError for inputs that do not follow the interface.

    Returns a detached copy of ``images`` that requires grad, ready for autograd.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B,C,H,W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (images.shape[0],):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a tensor [B] with B={images.shape[0]}, got {shape}")
    return images.detach().clone().requires_grad_(True)
