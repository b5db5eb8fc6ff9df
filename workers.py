"""One way to spread simulation work over processes: ``map_ordered``.

Collection (episodes) and evaluation (tasks) both need the same thing: build some per-process
state once (a simulator, the models), then run many items through it, and get the results back
in item order whatever the number of processes. Every item's randomness comes from the item
itself (its seed), so results do not depend on how items are spread.

Processes are spawned, not forked: each builds its own MuJoCo simulation, and forking a process
that holds one is unsafe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from typing import Callable, Iterable, Iterator

# the state ``setup`` built in this worker process (one per process, set by ``_init``)
_STATE: dict = {}


def _init(setup: Callable, setup_args: tuple, work: Callable, threads: int) -> None:
    import signal

    import torch

    # Ctrl-C reaches every process of the terminal's group: the parent handles it (it stops the
    # pool and keeps what was finished), so a worker must not die mid-item on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    from cli import quiet_simulator_logs

    quiet_simulator_logs()
    torch.set_num_threads(threads)
    _STATE.update(state=setup(*setup_args), work=work)


def _run(item):
    return _STATE["work"](_STATE["state"], item)


def close_state(state) -> None:
    closer = getattr(state, "close", None)
    if callable(closer):
        closer()


def map_ordered(setup: Callable, setup_args: tuple, work: Callable, items: Iterable, workers: int = 1,
                threads: int = 1) -> Iterator:
    """Yield ``work(state, item)`` for every item, in item order, where ``state = setup(*setup_args)``
    is built once per process: in this process when ``workers`` <= 1, else in ``workers`` spawned
    processes (at most one per item), each with ``threads`` torch threads. ``setup`` and ``work``
    must be module-level functions (spawned processes import them). The state is closed
    (``state.close()``) when this process's loop ends."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        state = setup(*setup_args)
        try:
            for item in items:
                yield work(state, item)
        finally:
            close_state(state)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(items)), initializer=_init,
                  initargs=(setup, setup_args, work, threads)) as pool:
        yield from pool.imap(_run, items, chunksize=1)
