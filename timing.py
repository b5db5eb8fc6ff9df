"""Wall-clock timing shared by the measuring scripts (bench_tokenizer.py, train_draft.py)."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median, not the mean: on a shared machine a few calls are slowed by other work.
    """
    return interleaved_median_seconds([fn], repeats, warmup)[0]


def interleaved_median_seconds(fns: list, repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each of ``fns``, called in turn (f0, f1, ..., f0, f1, ...).

    For a ratio of two costs on a shared machine: each round times every function under the
    same load, where timing one function's calls and then the other's lets a change of load
    between the two runs skew the ratio.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]
