"""An ordered map that works ahead in a thread pool: the reader decodes the next batches while the
step after it (the model, in the same fused Beam stage) runs on this one."""
from __future__ import annotations

import collections
import itertools
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

    Items go to the pool in groups of ``ahead // (2 * threads)``, so that every thread has two
    groups in flight: a task per item cost as much as decoding a 28x28 PNG (on 10,000 digits the
    pool took 22.1 CPU-seconds where decoding inline took 19.5-21.4, for the same wall time).

    ``function`` must not raise (the reader's turns every failure into an ErrorRecord); if it
    does, the error is raised here, at its item, after the items before it. Closing the iterator
    (the consumer failed, or stopped) cancels what has not started and lets the pool's threads
    end; none is waited for, and an unclosed iterator's threads end when it is collected."""
    if threads < 1 or ahead < 1:
        for item in items:
            yield item, function(item)
        return
    size = max(1, ahead // (2 * threads))
    # the pool's threads keep torch's resizes to themselves, beside the model's threads
    pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_NAME, initializer=one_intraop_thread)
    window: collections.deque = collections.deque()  # (item, its group's future, its place in the group)
    items = iter(items)
    try:
        while True:
            while len(window) > ahead + 1 - size:  # room for a group: then ``ahead`` beyond the next one out
                yield _result(window.popleft())
            group = list(itertools.islice(items, size))
            if not group:
                break
            future = pool.submit(_each, function, group)
            window.extend((item, future, i) for i, item in enumerate(group))
        while window:
            yield _result(window.popleft())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _each(function, group: list) -> list[tuple[bool, object]]:
    """(succeeded, result or exception) per item: an item that raises costs only itself here."""
    out = []
    for item in group:
        try:
            out.append((True, function(item)))
        except Exception as e:  # noqa: BLE001 - raised again at its item, in order
            out.append((False, e))
    return out


def _result(entry):
    item, future, i = entry
    results = future.result()
    ok, value = results[i]
    results[i] = None  # handed out: the group's list must not hold it past the consumer (the memory bound)
    if not ok:
        raise value
    return item, value
