"""Independent fits spread over the machine's cores, in the order they were asked for.

Each group's fit is a few tenths of a second to seconds of numpy on arrays too small for BLAS
threads to help, and a study has hundreds of groups, so the groups — not the operations inside
one — are what to spread. Worker processes are spawned, not forked: the caller may hold threads
(an adaptive sweep's Ray driver, a progress bar), which a forked child would inherit mid-state.
Written on the standard library's process pool rather than Ray because `analysis` runs wherever
the Parquet files are, with no cluster (DESIGN.md: it imports neither workers nor orchestrator).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Processes for `parallel_map`, shared by every stage of one analysis (each spawned process
    imports numpy, scipy and pandas again, about a second); None, run here, for `workers` ≤ 1."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, pool: Executor | None, desc: str) -> list[R]:
    """`[fn(item) for item in items]`, on `pool` if there is one, with a progress bar on a terminal.

    `fn` must be a module-level function and items and results picklable (a process pool sends them).
    """
    bar = tqdm(total=len(items), desc=desc, unit="group", disable=None, leave=False)
    try:
        if pool is None:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        futures = [pool.submit(fn, item) for item in items]
        for _ in as_completed(futures):
            bar.update()
        return [future.result() for future in futures]
    finally:
        bar.close()
