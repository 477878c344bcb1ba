"""Torch threads per worker process (--torch-threads): the cores a process may use (affinity, the
cgroup CPU quota), divided among the SDK worker processes of a machine, or a Dask worker's own;
and the reader's decode pool, which runs beside torch and so takes its threads from the same
cores (ThreadBudget.split)."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

import torch


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    """Torch threads per worker process (--torch-threads), which also size the methods' own
    thread pools. ``threads`` None (auto): the cores this process may use divided by
    ``processes``, the SDK worker processes the runner starts per machine (0: one per core);
    inside a Dask worker, the threads that worker was given. Resolved on the worker, whose
    cores may differ from the launcher's. ``small_images`` (set by the plan from preflight's sample
    image, ``is_small_image``): auto is one torch thread, whatever the cores (SMALL_IMAGE_VALUES)."""

    threads: int | None = None
    processes: int = 1
    small_images: bool = False

    def resolve(self, cores: int | None = None) -> int:
        if self.threads is not None:
            return self.threads
        if self.small_images:
            return 1
        dask = _dask_worker_threads()
        if dask is not None:
            return dask
        if not self.processes:
            return 1
        return max(1, (cores or available_cores()) // self.processes)

    def split(self, device_type: str = "cpu", cores: int | None = None) -> tuple[int, int]:
        """(torch threads, decode threads) of this worker process. The reader's decode pool
        (transforms.read) decodes the next batches while the model runs on this one, so its
        threads are counted against the process's cores, never added on top of torch's (an
        OpenMP team that loses a core to another thread waits for it at every barrier).

        auto: the process's threads (``resolve``) less the pool's share of them, one thread in
        DECODE_SHARE[device]: on a CPU worker one in 8, so below 8 there is no pool and images
        are decoded between batches, as before (torch keeps every core: decoding a 224 px image
        costs a few ms, a fraction of an explain step's work); on a GPU worker half, since the
        model runs on the device and the CPU's work is mostly decoding. An explicit
        --torch-threads N keeps N for torch; the pool gets the process's cores that N leaves, up
        to the same share but at least 1 where one is left (``--torch-threads 1`` on 2 cores: one
        torch thread and one decode thread). auto on small images is split as ``--torch-threads 1``."""
        process = ThreadBudget(None, self.processes).resolve(cores)
        share = process // DECODE_SHARE.get(device_type, DECODE_SHARE["cpu"])
        if self.threads is None and not self.small_images:
            return max(1, process - share), share
        torch_threads = self.resolve(cores)
        return torch_threads, min(max(0, process - torch_threads), max(1, share))


# Values in one preprocessed image (channels x height x width) up to which auto gives torch one
# thread per process: CIFAR's 3x32x32 and below. On 28x28 digits a batch's operations are too small
# for torch to gain from splitting them: a second thread bought nothing on a quiet 2-core machine
# and cost 66% more CPU (docs/reliability.md), and where another process holds a core its spinning
# OpenMP team made the same run 5 to 10 times slower. Decided from the images, not from a timing,
# so that auto resolves alike on every run of the same audit on the same machine (torch's results
# depend on its thread count).
SMALL_IMAGE_VALUES = 3 * 32 * 32


def is_small_image(shape) -> bool:
    """Whether a preprocessed image of ``shape`` ([C, H, W], or [1, C, H, W]) is small enough for one
    torch thread under auto (SMALL_IMAGE_VALUES)."""
    values = 1
    for size in shape[-3:]:
        values *= int(size)
    return values <= SMALL_IMAGE_VALUES


# A worker's threads per decode thread, by device type (ThreadBudget.split).
DECODE_SHARE = {"cpu": 8, "cuda": 2}


def device_type(device: str) -> str:
    """"cpu" or "cuda" for a --device value ("auto": cuda where this machine has it), without
    checking that the device exists (the model's loading says that)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def available_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The cores this process may run on, not the machine's: its CPU affinity (a cpuset), capped
    by the container's CPU quota (a Kubernetes CPU limit is a CFS quota, invisible to affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup)
    return max(1, min(cores, quota)) if quota else cores


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota in whole cores (rounded up), from cgroup v2's cpu.max ("400000 100000") or
    v1's cfs_quota_us / cfs_period_us; None when there is none ("max", -1) or no cgroup."""
    def read(name: str) -> str | None:
        try:
            with open(os.path.join(root, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    v2 = read("cpu.max")
    fields = v2.split() if v2 else [read("cpu/cpu.cfs_quota_us") or "", read("cpu/cpu.cfs_period_us") or ""]
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (IndexError, ValueError):  # "max", missing files
        return None
    return -(-quota // period) if quota > 0 and period > 0 else None


def _dask_worker_threads() -> int | None:
    """The thread count of the Dask worker running this code, if any (only looked for where
    dask.distributed is already loaded, so other runners never import it)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker
        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):  # not inside a Dask worker
        return None


def apply_threads(threads: int) -> None:
    """Size torch's pools for this worker process. The inter-op pool can only be sized before its
    first use (in-process runners have used it already), so it is left as it is then."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass


def one_intraop_thread() -> bool:
    """Keep the torch operations of the calling thread (a decode pool thread: preprocessing
    resizes with torch) on that thread, so each decode thread does not start a team of torch's
    threads beside the model's. torch.set_num_threads is process-wide (it would slow the model
    too); the OpenMP runtime's own setting is per thread. True where it took (torch's parallel
    backend is OpenMP); elsewhere torch's own count applies and the pool may oversubscribe."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count on its first use: ours must come after
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except Exception:  # noqa: BLE001 - no OpenMP runtime loaded (a native or TBB build), no ctypes: never fail the pool
        return False
    return torch.get_num_threads() == 1
