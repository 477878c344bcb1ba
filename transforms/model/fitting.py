"""Batches that fit the device's memory: each method explains a batch in chunks of its own size,
an out-of-memory error halves the chunk and retries it (down to one image, then that image alone
is an error row), and ``--batch-size auto`` finds each method's size at preflight.

Methods expand a batch very differently (intg's steps, smoothgrad's samples, the perturbation
methods' masked copies), so one reader batch size cannot suit them all: the reader cuts batches
of the largest method's size and every method explains them in chunks of its own.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

# --batch-size auto: the largest batch tried, and the reader's batch size when no method fits more.
AUTO_MAX_BATCH = 256
# On a CPU auto is a fixed choice, not a probe: CPU memory is rarely what limits a batch (each
# method's expanded forwards are chunked already, chunk_within_budget), throughput is flat beyond
# 8-32 images (saliency_audit.explainers.core.base.CPU_FORWARD_CHUNK), no allocator reports a peak
# to probe against, and a probe of intg at 224 px would take minutes. Out of memory still halves it.
CPU_AUTO_BATCH = 32
# On CUDA: the share of the device's memory a probe's peak may reach (the rest for the allocator's
# fragmentation and the batch's metrics), and the probe time after which doubling stops (a batch
# that takes this long keeps the device busy; doubling scorecam's 2048 forwards per image to 256
# images would take minutes).
MEMORY_FRACTION, PROBE_SECONDS = 0.8, 10.0


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or a CPU allocator's refusal."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "not enough memory" in text)


def release_memory(device: torch.device | str) -> None:
    """Return what an out-of-memory failure left cached to the device, before the retry."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass
class Fitted:
    """A batch explained in chunks: per image explained (position, Explanation, its index in it,
    ms per image), per image that failed alone (position, the error), and the chunk size that
    worked last (smaller than asked when memory ran out)."""

    outcomes: list[tuple[int, Any, int, float]]
    failures: list[tuple[int, BaseException]]
    size: int


def explain_fitting(explain: Callable[[int, int], Any], n: int, size: int,
                    retry: Callable[[BaseException], bool] | None = None,
                    device: torch.device | str = "cpu") -> Fitted:
    """``explain(lo, hi)`` (the Explanation of positions lo..hi-1) over positions 0..n-1 in chunks of
    ``size``. A chunk that runs out of memory is retried in halves, and the halved size holds for
    the chunks after it; a chunk that fails otherwise is explained one image at a time,
    so one bad image costs itself only; an image that fails alone is a failure. ``retry(error)``:
    True when something changed that may make the same chunk succeed (a compiled model fell back to
    eager), so it is rerun first."""
    fitted = Fitted([], [], max(1, size))

    def run(lo: int, hi: int) -> None:
        start = time.perf_counter()
        try:
            result = explain(lo, hi)
        except Exception as e:
            if retry is not None and retry(e):
                return run(lo, hi)
            if hi - lo == 1:
                fitted.failures.append((lo, e))
                return
            if is_out_of_memory(e):
                release_memory(device)
                fitted.size = min(fitted.size, (hi - lo) // 2)
                run_all(lo, hi)
                return
            for i in range(lo, hi):  # isolate the failing image(s)
                run(i, i + 1)
            return
        ms = 1000 * (time.perf_counter() - start) / (hi - lo)
        fitted.outcomes.extend((lo + k, result, k, ms) for k in range(hi - lo))

    def run_all(lo: int, hi: int) -> None:  # in chunks of the size that fits, which may shrink on the way
        while lo < hi:
            end = min(hi, lo + fitted.size)
            run(lo, end)
            lo = end

    run_all(0, n)
    fitted.outcomes.sort(key=lambda outcome: outcome[0])
    return fitted


def largest_fitting(run: Callable[[int], None], device: torch.device | str, limit: int = AUTO_MAX_BATCH,
                    peak: Callable[[], int] | None = None, budget: int | None = None,
                    seconds: float = PROBE_SECONDS) -> int:
    """The batch ``--batch-size auto`` gives a method, by ``run(n)`` (explain n copies of an image).

    With a memory gauge (``peak()``: the bytes the last run peaked at; ``budget``: what it may reach;
    on CUDA by default, torch.cuda.max_memory_allocated against MEMORY_FRACTION of the device) it
    doubles from 1 while a run fits the budget, raises no out-of-memory error and takes under
    ``seconds``, up to ``limit``. Without one (a CPU) it is CPU_AUTO_BATCH, at most ``limit``, and
    runs nothing. At least 1: an image that does not fit alone is that image's error."""
    device = torch.device(device)
    reset = None
    if peak is None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        budget = int(MEMORY_FRACTION * torch.cuda.get_device_properties(index).total_memory)

        def peak() -> int:
            return torch.cuda.max_memory_allocated(index)

        def reset() -> None:
            torch.cuda.synchronize(index)
            torch.cuda.reset_peak_memory_stats(index)
    if peak is None:
        return min(CPU_AUTO_BATCH, limit)
    best, n = 1, 1
    while n <= limit:
        if reset is not None:
            reset()
        start = time.perf_counter()
        try:
            run(n)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            break
        if peak() > budget:
            break
        best = n
        if time.perf_counter() - start > seconds:
            break
        n *= 2
    release_memory(device)
    return best
