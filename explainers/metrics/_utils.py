"""Shared helpers of the metrics: input checks, per-image seeded generators, chunked forwards."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from saliency_audit.explainers.core.scores import class_probabilities

_MASK64 = (1 << 64) - 1

# Independent random streams per purpose, so e.g. the tie-break permutation of an image
# never coincides with its random reference order even though both come from seeds[i].
STREAM_TIE_BREAK = 1
STREAM_RANDOM_MAP = 2
STREAM_SALT_AND_PEPPER = 3
STREAM_RANDOMIZATION = 4
STREAM_EXPECTED_GRADIENTS = 5  # saliency_audit.explainers.gradient.expected_gradients: its baselines, alphas and noise
STREAM_RANDOM_LOGIT = 6


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a well-mixed 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """A seed in [0, 2**63) derived from (seed, stream, index); any int64 seed is fine."""
    x = _splitmix64((int(seed) & _MASK64) ^ _splitmix64(stream))
    x = _splitmix64(x ^ _splitmix64((int(index) & _MASK64) + 0x632BE59BD9B4E019))
    return x >> 1


def generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    """A CPU generator for one image and purpose.

    Always on CPU: CPU and CUDA generators give different streams, and results must not
    depend on the device the metric runs on. Callers draw on CPU and move the result.
    """
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, stream, index))


def as_seed_list(seeds: torch.Tensor | Sequence[int] | None, batch: int) -> list[int]:
    """``seeds`` [B] (tensor or sequence of ints) or None (0 for every image) -> list of B ints."""
    if seeds is None:
        return [0] * batch
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.is_floating_point() or seeds.is_complex():
            raise ValueError(f"seeds must be an integer tensor [B], got {seeds.dtype} {tuple(seeds.shape)}")
        seeds = seeds.tolist()
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"seeds must have one entry per image (B={batch}), got {len(seeds)}")
    return seeds


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B,C,H,W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")


def check_maps(maps: torch.Tensor, name: str = "maps", batch: int | None = None,
               size: tuple[int, int] | None = None) -> None:
    """Raise a ValueError unless ``maps`` is a finite float tensor [B,H,W] of the given B, (H,W)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name} must be a tensor [B,H,W], got {shape}")
    if batch is not None and maps.shape[0] != batch:
        raise ValueError(f"{name} has {maps.shape[0]} maps for a batch of {batch} images")
    if size is not None and tuple(maps.shape[1:]) != tuple(size):
        raise ValueError(f"{name} are {tuple(maps.shape[1:])} but the images are {tuple(size)} (H,W)")
    if maps.is_floating_point() and not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{name} contain NaN or infinite values")


def check_inputs(images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor | None) -> None:
    """The common checks of the model-based metrics: images [B,C,H,W], maps [B,H,W], targets [B]."""
    check_images(images)
    check_maps(maps, batch=images.shape[0], size=tuple(images.shape[2:]))
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.shape != (images.shape[0],):
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor [B] with B={images.shape[0]}, got {shape}")
        if targets.is_floating_point():
            raise ValueError(f"targets must hold integer class indices, got {targets.dtype}")


def check_max_forward_batch(max_forward_batch: int) -> None:
    if int(max_forward_batch) < 1:
        raise ValueError(f"max_forward_batch must be >= 1, got {max_forward_batch}")


def forward_in_chunks(model: torch.nn.Module, n_total: int,
                      build: Callable[[torch.Tensor], torch.Tensor],
                      reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      max_forward_batch: int, device: torch.device) -> torch.Tensor:
    """Push ``n_total`` perturbed inputs through ``model`` at most ``max_forward_batch`` at a time.

    build(idx [n]) -> inputs [n,C,H,W]: builds only the inputs of this chunk, so memory is
        bounded by the chunk, not by n_total.
    reduce(logits [n,K], idx [n]) -> values [n]: what to keep per input.
    Returns the values [n_total], in index order, on ``device``. Runs under inference_mode.
    """
    check_max_forward_batch(max_forward_batch)
    out = []
    with torch.inference_mode():
        for start in range(0, n_total, max_forward_batch):
            idx = torch.arange(start, min(start + max_forward_batch, n_total), device=device)
            logits = model(build(idx))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(idx):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the model must return logits [N,K] for N={len(idx)} inputs, got {shape}")
            out.append(reduce(logits, idx))
    if not out:
        return torch.empty(0, device=device)
    return torch.cat(out)


def target_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax probability of ``targets`` [n] under ``logits`` [n,K], in float32 (a single output's:
    its sigmoid, core.scores.class_probabilities)."""
    return class_probabilities(logits.float()).gather(1, targets.view(-1, 1)).squeeze(1)


def gaussian_kernel1d(sigma: float, radius: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Sampled exp(-x^2 / 2 sigma^2) on [-radius, radius], normalised to sum 1."""
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def separable_filter(x: torch.Tensor, kernel: torch.Tensor, padding_mode: str | None) -> torch.Tensor:
    """Filter every channel of ``x`` [N,C,H,W] with the 2-D kernel outer(kernel, kernel).

    padding_mode None gives the "valid" part only ([N,C,H-k+1,W-k+1]); otherwise the input is
    padded with F.pad's mode (e.g. "replicate") and the output has x's size.
    """
    channels, k = x.shape[1], kernel.numel()
    r = k // 2
    if padding_mode is not None:
        x = torch.nn.functional.pad(x, (r, r, r, r), mode=padding_mode)
    weight_h = kernel.view(1, 1, k, 1).expand(channels, 1, k, 1)
    weight_w = kernel.view(1, 1, 1, k).expand(channels, 1, 1, k)
    x = torch.nn.functional.conv2d(x, weight_h, groups=channels)
    return torch.nn.functional.conv2d(x, weight_w, groups=channels)


def minmax_scale(x: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """Scale every array (dims from ``start_dim`` on) to [0,1] on its own; constant arrays -> 0."""
    flat = x.flatten(start_dim)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    return scaled.view_as(x)

