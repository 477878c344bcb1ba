"""The explainer interface: a batch of images and targets in, a batch of maps (and extras) out."""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar

import torch

from saliency_audit.explainers.core.options import Option


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


# Input bytes per forward chunk, at most (perturbation methods, metrics): memory follows one chunk.
# On a CPU a smaller budget also keeps a chunk's activations nearer the caches: ResNet-50 at 224 px on
# one thread ran 8.2-8.7 images/s forward in chunks of 4 to 8 and 5.6 in chunks of 32 (ViT-S/16: 8.5-9.4
# against 7.9-8.2), so 4 MiB there (6 images at 224 px; digits keep their 32 and metrics their 256).
CHUNK_BUDGET_BYTES, CPU_CHUNK_BUDGET_BYTES = 16 * 2**20, 4 * 2**20


def chunk_within_budget(requested: int, image_shape: tuple[int, ...] | torch.Size,
                        device: torch.device | str | None = None) -> int:
    """``requested`` images per chunk, fewer where they would exceed the budget of ``device``'s kind
    (CPU_CHUNK_BUDGET_BYTES on a CPU, else CHUNK_BUDGET_BYTES), at least 1."""
    cpu = device is not None and torch.device(device).type == "cpu"
    budget = CPU_CHUNK_BUDGET_BYTES if cpu else CHUNK_BUDGET_BYTES
    return max(1, min(requested, budget // (4 * math.prod(image_shape))))


# Batch independence. A kernel picks its blocking, and so its rounding, from the batch size and
# the rows beside a row, so the same image's logits differ in the last bits (~1e-7) alone and in
# a batch. Two ways keep a discrete decision from following that noise:
# - owner_chunks: an image's rows never share a forward pass with another image's, so every value
#   it sees, continuous or not, is bit-identical alone or in any batch (abele, whose genetic
#   search and tree turn continuous values into decisions);
# - stable_argmax: batched logits, and the few rows whose top-2 gap is within a tolerance far above
#   that noise are recomputed alone (the predicted class, the superpixel methods' labels).
DECISION_RTOL = 1e-4  # of max(1, max |logit|): ~1e3 times float32 batch noise on the demo CNN


def owner_chunks(fn, inputs: torch.Tensor, owners, chunk: int) -> torch.Tensor:
    """``fn`` over ``inputs`` [N, ...] in chunks of at most ``chunk`` rows that all belong to one
    owner (``owners`` [N], e.g. the image a latent code explores), each owner's rows in their
    order; results in the order of ``inputs``. A row's result depends only on its owner's rows
    in this call, never on the other owners', so a search that asks only for its own rows gets
    the same bits alone or in any batch. Costs at most one partial chunk per owner and call."""
    owners = torch.as_tensor(owners, dtype=torch.long)
    if not len(inputs):
        return fn(inputs)
    index = torch.arange(len(owners))
    parts, order = [], []
    for owner in torch.unique(owners).tolist():
        rows = index[owners == owner]
        for start in range(0, len(rows), chunk):
            take = rows[start:start + chunk]
            parts.append(fn(inputs[take.to(inputs.device)]))
            order.append(take)
    out = torch.cat(parts)
    return out[torch.argsort(torch.cat(order)).to(out.device)]


def alone(fn, inputs: torch.Tensor) -> torch.Tensor:
    """``fn`` over each row of ``inputs`` as a batch of one, concatenated."""
    return owner_chunks(fn, inputs, torch.arange(len(inputs)), 1)


def decision_tolerance(dtype: torch.dtype) -> float | None:
    """Relative top-2 gap below which a decision is recomputed alone: DECISION_RTOL for float32
    and wider logits; None (no recomputing) for 16-bit logits, whose rounding (~1e-3) would flag
    most rows and send every masked image of lime, anchor and lore through the model alone: the
    batch-independence promise is for float32 models."""
    if dtype.is_floating_point and torch.finfo(dtype).bits <= 16:
        return None
    return DECISION_RTOL


def near_ties(logits: torch.Tensor, rtol: float = DECISION_RTOL) -> torch.Tensor:
    """Rows [N] bool whose top-2 logit gap is within rtol * max(1, max |logit|): their argmax could
    follow the batch's rounding noise. Rows with a non-finite logit count as ties (recomputed)."""
    if logits.shape[1] < 2:
        return torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
    top = logits.topk(2, dim=1).values
    scale = logits.abs().amax(dim=1).clamp_min(1)
    return ~((top[:, 0] - top[:, 1]) > rtol * scale)


def stable_argmax(logits: torch.Tensor, recompute, rtol: float | None = DECISION_RTOL) -> tuple[torch.Tensor, int]:
    """argmax [N] of batched ``logits`` [N,K] that equals each row's argmax computed alone, as long
    as the batch's noise per logit stays under rtol/2 of the scale: if the batched gap exceeds
    rtol * scale, noise that small cannot reorder the top two, and rows within it are recomputed
    by ``recompute(rows [n] long) -> logits [n,K]``, which must compute each row alone (see
    :func:`alone`). Returns (classes, number of rows recomputed)."""
    classes = logits.argmax(dim=1)
    if rtol is None:
        return classes, 0
    ties = torch.nonzero(near_ties(logits, rtol)).reshape(-1)
    if len(ties):
        classes[ties] = recompute(ties).to(classes.device).argmax(dim=1)
    return classes, len(ties)


class UnsupportedModel(ValueError):
    """The method cannot explain this model at all, whatever the image: its rules do not cover
    the model's operations, or it cannot see them. Raised before any work, with ``reason`` (why,
    and what to use instead, in one line); a run refuses the method at preflight with
    "method NAME cannot explain this model: REASON" instead of failing on every image."""

    def __init__(self, method: str, reason: str):
        self.method, self.reason = method, " ".join(reason.split())
        super().__init__(f"{method} cannot explain this model: {self.reason}")


def check_chunk(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")


class Explainer:
    """Base class of every registered method.

    Subclasses set ``name`` (the registered short name), ``signed`` (whether the map
    carries a sign), ``passes`` (forward/backward passes per image, for cost and the
    compute floor), ``extras`` (name -> column type: "float32", "int64", "string",
    "float32[]", "int32[]"), ``needs_gradients`` (False when forward passes are all it
    takes), ``assets`` (files it needs, as run options) and implement ``explain``.  Keyword arguments of
    ``__init__`` are the method's options; ``options()`` reports their resolved values
    so a run can record them.
    """

    name: ClassVar[str] = ""
    signed: ClassVar[bool] = True
    extras: ClassVar[dict[str, str]] = {}
    # False for a method that needs only the model's answers (a black box: an ONNX file, an endpoint).
    needs_gradients: ClassVar[bool] = True
    # True for a control map (random, sobel): not an explanation, the level an explanation must beat.
    control: ClassVar[bool] = False
    # Files the method needs, as run options (abele's autoencoder, --aae): each names a parameter of
    # __init__ that the run fills from its option when --method-options leaves it out; one the
    # method cannot do without (no default) and the run lacks is refused before any work.
    assets: ClassVar[tuple[Option, ...]] = ()
    # Whether the method's model forwards may run under the run's autocast (--precision bf16/fp16).
    # False for a method that recomputes the model's layers by its own rules (relevance): it runs
    # float32 whatever the run's precision, and says so in the manifest.
    autocast: ClassVar[bool] = True
    # The reduced precisions at which the method's maps were measured to keep float32's ranking
    # (Spearman rank correlation at least 0.98 on every image, ResNet-50 and ViT-S/16 at 224 px:
    # docs/performance.md, benchmarks/precision_agreement.py). At any other the run warns that its
    # maps only approximate float32's.
    agrees_at: ClassVar[tuple[str, ...]] = ()
    # Whether the method may run on the torch.compile'd model (--compile). False for one that hooks
    # the model's layers: a compiled graph fuses them, so a hooked activation and its gradient are
    # not there to take.
    compiles: ClassVar[bool] = True
    # True for a method that reads attention matrices (rollout, attention_grad): a model without global
    # attention (a CNN, Swin's windows) is refused on its first explain, so runs over every method on
    # a CNN (the demo, the golden outputs) leave it out.
    needs_attention: ClassVar[bool] = False
    # Plain words for an auditor, shown by the report next to a flag this method raises by its
    # nature rather than by a defect, keyed by the flag: "cascading" (maps alike once the model is
    # randomised), "random_logit" (alike for another class), "constant" (maps that point nowhere).
    # An instance may set its own where an option changes the nature (sal's absolute). The run
    # records them in the manifest.
    caveats: ClassVar[dict[str, str]] = {}

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
