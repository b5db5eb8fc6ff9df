"""Wall-clock timing shared by the measuring scripts (bench_tokenizer.py, train_draft.py)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median, not the mean: on a shared machine a few calls are slowed by other work.
    """
    return interleaved_median_seconds([fn], repeats, warmup)[0]


def interleaved_median_seconds(fns: list, repeats: int, warmup: int = 3, block: int = 1) -> list[float]:
    """Median wall time of each of ``fns`` over ``repeats`` timed calls, called in turn (f0,
    f1, ..., f0, f1, ...).

    For a ratio of two costs on a shared machine: each round times every function under the
    same load, where timing one function's calls and then the other's lets a change of load
    between the two runs skew the ratio. ``block`` > 1: each turn is one untimed call and then
    ``block`` timed ones (rounds of blocks until ``repeats`` are timed), so that a function is
    timed with its data in cache, as when it is called again and again, not just after the
    others have evicted it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    while len(times[0]) < repeats:
        n = min(block, repeats - len(times[0]))
        for fn, t in zip(fns, times):
            if block > 1:
                fn()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
