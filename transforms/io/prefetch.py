"""An ordered map that works ahead in a thread pool: the reader decodes the next batches while the
step after it (the model, in the same fused Beam stage) runs on this one."""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from saliency_audit.transforms.model.threads import one_intraop_thread

T = TypeVar("T")
R = TypeVar("R")
THREAD_NAME = "saliency-decode"


def prefetched(function: Callable[[T], R], items: Iterable[T], threads: int, ahead: int) -> Iterator[tuple[T, R]]:
    """(item, function(item)) for each item, in item order, with ``function`` run by ``threads``
    pool threads on up to ``ahead`` items beyond the one handed out: while the consumer works on
    one, the next ``ahead`` are computed. Memory is bounded by ``ahead`` items and their results,
    however slow the consumer. ``threads`` or ``ahead`` 0: computed inline, one at a time.

    ``function`` must not raise (the reader's turns every failure into an ErrorRecord); if it
    does, the error is raised here, at its item. Closing the iterator (the consumer failed, or
    stopped) cancels what has not started and lets the pool's threads end; none is waited for,
    and an unclosed iterator's threads end when it is collected."""
    if threads < 1 or ahead < 1:
        for item in items:
            yield item, function(item)
        return
    # the pool's threads keep torch's resizes to themselves, beside the model's threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_NAME, initializer=one_intraop_thread)
    window: collections.deque = collections.deque()
    try:
        for item in items:
            window.append((item, pool.submit(function, item)))
            if len(window) > ahead:
                head, future = window.popleft()
                yield head, future.result()
        while window:
            head, future = window.popleft()
            yield head, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
