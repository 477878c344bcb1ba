"""Torch threads per worker process (--torch-threads): the cores a process may use (affinity, the
cgroup CPU quota), divided among the SDK worker processes of a machine, or a Dask worker's own."""
from __future__ import annotations

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
    cores may differ from the launcher's."""

    threads: int | None = None
    processes: int = 1

    def resolve(self, cores: int | None = None) -> int:
        if self.threads is not None:
            return self.threads
        dask = _dask_worker_threads()
        if dask is not None:
            return dask
        if not self.processes:
            return 1
        return max(1, (cores or available_cores()) // self.processes)


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
