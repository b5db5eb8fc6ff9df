"""One way to spread simulation work: ``map_ordered``, on local processes or on a Ray cluster.

Collection (episodes) and evaluation (trials) both need the same thing: build some per-worker
state once (a simulator, the models), run many items through it, and get the results back in
item order whatever the number of workers. Every item's randomness comes from the item itself
(its seed), so results do not depend on how items are spread: ``--workers N`` and
``--backend ray`` give the same episodes and trial outcomes.

Local processes are spawned, not forked: each builds its own MuJoCo simulation, and forking a
process that holds one is unsafe. On Ray, items go out in shards (``shard_size`` consecutive
items per task), each building its state once; ``ray`` is imported only when chosen.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from cli import arg, require

BACKENDS = ("processes", "ray")

# the state ``setup`` built in this worker process (one per process, set by ``_init``)
_STATE: dict = {}


@dataclass
class WorkersArgs:
    """The flags of the scripts that spread simulation work."""

    workers: int = arg(1, "processes sharing the work (local), or Ray tasks running at once (a local Ray instance)")
    backend: str = arg("processes", "processes: local worker processes; ray: a Ray cluster (--ray_address) or a "
                                    "local Ray instance", choices=list(BACKENDS))
    ray_address: str | None = arg(None, "address of a running Ray cluster (e.g. ray://head:10001); default: start "
                                        "a local one", metavar="ADDRESS")

    def check_workers(self) -> None:
        require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        require(self.backend in BACKENDS, f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        require(self.ray_address is None or self.backend == "ray", "--ray_address needs --backend ray")


def _quiet_worker(threads: int) -> None:
    import signal

    import torch

    from cli import quiet_simulator_logs

    # Ctrl-C reaches every process of the terminal's group: the parent handles it (it stops the
    # pool and keeps what was finished), so a worker must not die mid-item on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    quiet_simulator_logs()
    torch.set_num_threads(threads)


def _init(setup: Callable, setup_args: tuple, work: Callable, threads: int) -> None:
    _quiet_worker(threads)
    _STATE.update(state=setup(*setup_args), work=work)


def _run(item):
    return _STATE["work"](_STATE["state"], item)


def close_state(state) -> None:
    closer = getattr(state, "close", None)
    if callable(closer):
        closer()


def run_shard(setup: Callable, setup_args: tuple, work: Callable, items: list, threads: int) -> list:
    """One shard: the state built once, every item through it, the state closed."""
    _quiet_worker(threads)
    state = setup(*setup_args)
    try:
        return [work(state, item) for item in items]
    finally:
        close_state(state)


def map_ordered(setup: Callable, setup_args: tuple, work: Callable, items: Iterable, workers: int = 1,
                threads: int = 1, backend: str = "processes", ray_address: str | None = None,
                shard_size: int = 1) -> Iterator:
    """Yield ``work(state, item)`` for every item, in item order, where ``state = setup(*setup_args)``
    is built once per worker: in this process when ``workers`` <= 1 (processes backend), else in
    ``workers`` spawned processes (at most one per item), each with ``threads`` torch threads; on
    Ray, once per shard of ``shard_size`` consecutive items. ``setup`` and ``work`` must be
    module-level functions (other processes import them). The state is closed
    (``state.close()``) when its loop ends."""
    items = list(items)
    if backend == "ray":
        yield from _map_ray(setup, setup_args, work, items, workers, threads, ray_address, shard_size)
        return
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


def _map_ray(setup, setup_args, work, items, workers, threads, ray_address, shard_size) -> Iterator:
    import ray

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:  # a local instance: at most ``workers`` shards at once, as many as local processes
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_shard)
    shards = [items[i:i + shard_size] for i in range(0, len(items), max(1, shard_size))]
    refs = [remote.remote(setup, setup_args, work, shard, threads) for shard in shards]
    try:
        for ref in refs:  # in shard order: the results come back in item order
            yield from ray.get(ref)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
