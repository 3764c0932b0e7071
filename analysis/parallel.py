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
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, workers: int, desc: str) -> list[R]:
    """`[fn(item) for item in items]` on up to `workers` processes, with a progress bar on a terminal.

    `fn` must be a module-level function and items and results picklable. With `workers` ≤ 1 (or
    one item) everything runs here, in this process: what a library call gets unless it asks.
    """
    bar = tqdm(total=len(items), desc=desc, unit="group", disable=None, leave=False)
    try:
        if workers <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context) as pool:
            futures = [pool.submit(fn, item) for item in items]
            for _ in as_completed(futures):
                bar.update()
            return [future.result() for future in futures]
    finally:
        bar.close()
