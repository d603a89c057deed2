"""Ordered, bounded map over a thread pool: the decode stage of extract and predict.

Decoding runs in threads, not processes: libjpeg-turbo (through simplejpeg or PIL) and torch's resize release
the GIL, and a thread hands its (C, S, S) uint8 tensor to the forward pass without the inter-process copy a
DataLoader worker needs (that copy alone halved a 14-worker DataLoader against 14 plain threads, issue #22).

    for result in ordered_map(load, paths, workers=8, window=512): ...   # results in input order

Memory bound: at most `window` results exist at once (finished or in flight), so a million paths cost
`window` tensors, never a million futures.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | str | None) -> int:
    """'auto' / None -> one decode thread per available core; an int >= 0 as given (0 = decode inline)."""
    if workers in (None, "auto"):
        return available_cores()
    try:
        n = int(workers)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        from features.errors import UserError
        raise UserError(f"--workers {workers}: expected auto or a number >= 0 (0 decodes in the main thread)")
    return n


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int, window: int,
                initializer: Callable[[], None] | None = None) -> Iterator[R]:
    """fn(item) for every item, in order, computed by `workers` threads at most `window` items ahead of the
    consumer. workers == 0 runs fn inline. Closing the generator (Ctrl-C, an error downstream) cancels the
    work not yet started and waits only for the items already being decoded."""
    if workers == 0:
        yield from map(fn, items)
        return
    it = iter(items)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgsent-decode", initializer=initializer)
    pending: deque[Future] = deque()
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, window):
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
