"""Independent fits spread over the machine's cores, in the order they were asked for.

Each group's fit is a few tenths of a second to seconds of numpy on arrays too small for BLAS
threads to help, and a study has hundreds of groups, so the groups — not the operations inside
one — are what to spread. Worker processes are spawned, not forked: the caller may hold threads
(a Ray driver's, a progress bar's), which a forked child would inherit mid-state. Each worker runs
one BLAS thread: the pool already fills the cores, and OpenBLAS spreading tiny problems over busy
cores made them ~30x slower (see the Makefile).
Written on the standard library's process pool rather than Ray because `analysis` runs wherever
the Parquet files are, with no cluster (DESIGN.md: it imports neither workers nor orchestrator).
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Callable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
DEFAULT_MAX_WORKERS = 8  # past this, a study's few hundred groups gain less than the processes cost to start


def default_workers() -> int:
    """Every core this process may run on (its CPU affinity where the OS reports one), up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, DEFAULT_MAX_WORKERS)


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """Processes for `parallel_map`, shared by every stage of one analysis (each spawned process
    imports numpy, scipy and pandas again, about a second); None, run here, for `workers` ≤ 1.

    On an error or Ctrl-C the groups not yet started are cancelled and the workers stopped (SIGTERM:
    a fit running is not waited for). Ctrl-C reaches the parent alone: a terminal sends it to every
    process of the foreground group, and each worker printed its own KeyboardInterrupt traceback over
    the caller's one-line message.
    """
    if workers <= 1:
        yield None
        return
    saved = {name: os.environ.get(name) for name in BLAS_THREADS}
    os.environ.update({name: "1" for name in BLAS_THREADS})  # read by each worker as it starts
    context = _SpawnLeavingInterruptsToParent()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    failed = False
    try:
        yield pool
    except BaseException:
        failed = True
        raise
    finally:
        if failed:  # the pool would wait for the fits running; a worker Ctrl-C caught starting is not even in its list
            for process in context.started:
                if process.is_alive():
                    process.terminate()
        pool.shutdown(wait=True, cancel_futures=failed)  # once: a second call would no longer join the pool's manager thread
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _ProcessLeavingInterruptsToParent(SpawnProcess):
    """A spawned process that starts with SIGINT blocked: the mask survives the exec, so the child
    never sees it, from its first import on (an initializer runs only after the imports, and Ctrl-C
    came in during them). The parent still gets its own: at once in another thread, or as the mask
    is restored — which can raise KeyboardInterrupt before the pool has recorded this process, so
    `worker_pool` stops what its context started, not what the pool lists."""

    def start(self) -> None:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


class _SpawnLeavingInterruptsToParent(SpawnContext):
    """One pool's spawn context: its processes leave Ctrl-C to the parent, and it keeps them (`started`)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[_ProcessLeavingInterruptsToParent] = []

    def Process(  # noqa: N802: the name multiprocessing calls
        self, *, target: Callable[..., object], args: tuple
    ) -> _ProcessLeavingInterruptsToParent:
        process = _ProcessLeavingInterruptsToParent(target=target, args=args)
        self.started.append(process)
        return process


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
