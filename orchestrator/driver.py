"""Run planned cells on Ray and store each row the moment its cell finishes.

Cells run on long-lived worker actors (orchestrator/pool.py) that keep base models loaded; waiting
cells are grouped by model and a free worker takes the next cell of a model it holds, so a model
loads about once per worker; within a model the longest cells go first (`cellcost.longest_first`),
so a sweep ends on short cells. Completions are consumed with `ray.wait` in the order they finish,
never `ray.get` in submission order, so one slow cell never stalls the others' rows. A cell that
raises comes back as a `failed` row from `workers.run_cell`; a worker that dies (killed, OOM-killed,
node lost) is replaced and its cell run again, up to `max_retries` times with the attempt number
recorded, then stored as `failed` with Ray's reason. Cells go only to workers that have started, so
workers asked for on an autoscaling cluster (`resources.max_workers`) hold no cell while they wait
for a node. The driver is the only writer of the store; a row the store refuses is written again after
a wait (an object store's hiccup), and one it keeps refusing stops the run once the rows finished beside
it are stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Callable, Iterator, Sequence, TypeVar

import psutil
import ray
from ray.util import metrics
from tqdm import tqdm

from workers.cell import CellConfig
from workers.config import ConfigError
from workers.run_cell import identity_columns

from orchestrator.address import check_listening, unreachable
from orchestrator.cellcost import longest_first
from orchestrator.claims import Claims
from orchestrator.errors import ROWS_LOST_NOTE, ClusterShrankError, StoreWriteError, WorkersNotStartingError, counted
from orchestrator.grid import PlannedCell
from orchestrator.pool import POOL, CellResult, Shape, Worker, live_nodes, next_model, node_capacity
from orchestrator.spec import Resources
from orchestrator.store import ResultsStore

HEARTBEAT_SECONDS = 60.0
START_POLL_SECONDS = 5.0  # how often a driver waiting on workers to start looks again (a node lost, the timeout)
START_FAILURES = 3  # workers of a shape in a row that die while starting, none of it running: the shape is given up
# a shape whose workers have not started this long takes the room of idle workers no waiting cell can use (their
# models go with them): longer than a worker's imports, which an adaptive loop's next batch would otherwise pay in reloads
MAKE_WAY_SECONDS = 30.0
ANNOUNCE_WAIT_SECONDS = 60.0  # a worker not started by then waits for a node or is still being set up: say so once
STORE_RETRY_SECONDS = (1.0, 4.0)  # the waits before a row's (or claim's) second and third write: an object store's hiccup passes
T = TypeVar("T")


@dataclass
class SweepOutcome:
    ok: int = 0
    failed: int = 0
    kept_ok: int = 0  # of the failed: reruns of cells with a stored ok row, which was kept
    skipped_claimed: int = 0  # cells another live driver was running
    wall_seconds: float = 0.0
    cell_seconds: float = 0.0  # sum over cells of their own run time
    model_loads: dict[str, int] = field(default_factory=dict)  # worker -> models it loaded during this run
    loads: Counter[tuple[str, str]] = field(default_factory=Counter)  # (worker, model id) -> loads: reloads show here
    workers_lost: int = 0  # died or stopped (a timeout) mid-cell: their model loads are not in model_loads

    @property
    def total_model_loads(self) -> int:
        return sum(self.model_loads.values())


def starved(shape: Shape, queued: int, pending: int, started: bool, running: set[Shape]) -> bool:
    """Whether `shape`'s start clock runs: cells of it wait on workers asked for, none of which has
    started, and no worker of another shape is running a cell. While one is, a node may be full of
    them (the fractions of a GPU left that this shape cannot use): their cells ending makes room."""
    return bool(queued and pending and not started and not running - {shape})


def connect(address: str | None, *, dashboard: bool = True) -> str | None:
    """Join `address` (e.g. "auto"), or start a local Ray with the dashboard on 127.0.0.1 (where RAY_ADDRESS is set,
    or `ray start` left a cluster running on this machine, `ray.init` joins that instead, as Ray does).

    Returns the dashboard's URL when there is one.
    """
    if ray.is_initialized():
        return None
    # ray.init puts its own SIGTERM handler in (sys.exit, after a C++ stack dump on stderr): the caller's
    # stays, so that `timeout`, Slurm or Kubernetes stopping a run ends it as Ctrl-C does (cli.main), and an
    # ignored SIGTERM stays ignored. The default would end the process before Ray's shutdown: Ray's stays then.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    sigterm = None if sigterm in (signal.SIG_DFL, None) else sigterm
    try:
        if address:
            check_listening(address)
            try:
                context = ray.init(address=address, log_to_driver=False)
            except ConnectionError as err:
                raise unreachable(address, err) from err
        else:
            with _on_loopback_only(), _stopped_if_interrupted(), _without_token_notice():
                context = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)
    except SystemExit as stop:  # a SIGTERM while Ray's handler was in: the caller's handles it, as it would have
        if stop.code != signal.SIGTERM or not callable(sigterm):
            raise
        sigterm(signal.SIGTERM, None)
        raise
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
    return context.dashboard_url or None


MULTI_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for a node IP other than 127.0.0.1


@contextmanager
def _on_loopback_only() -> Iterator[None]:
    """Make the local cluster started inside listen on 127.0.0.1 alone: GCS, raylet, workers, agents and their
    metrics ports (three of which answer /metrics without the token) listened on every interface, `dashboard_host`
    moving the dashboard alone. Each binds loopback exactly when the node IP is 127.0.0.1, which Ray picks only with
    its multi-node mode off (`services.get_node_ip_address`; `_node_ip_address="127.0.0.1"` is resolved to the
    machine's address): `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray reads into `ray_constants` when imported —
    before this module runs, so the constant is set too; the processes Ray starts inherit the variable. Both are put
    back after (a later `ray start` this process runs refuses to join a cluster with the variable at 0), and left alone
    where the user set the variable to 1. No other machine can join such a cluster: one a run starts is its own."""
    from ray._private import ray_constants

    before = os.environ.get(MULTI_NODE_ENV)
    if (before or "0").lower() not in ("0", "false"):
        yield
        return
    flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[MULTI_NODE_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if before is None:
            os.environ.pop(MULTI_NODE_ENV, None)
        else:
            os.environ[MULTI_NODE_ENV] = before


# Ray's logger for its token set-up (ray/_private/authentication/authentication_token_setup.py)
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


class _TokenNotice(logging.Filter):
    """Drops Ray's warning that a new local cluster uses token authentication, "set RAY_AUTH_MODE=disabled to
    opt out": printed on every run, it invited turning off the authentication a private Ray should keep (the
    dashboard line says where its token is). A warning that authentication is off still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


@contextmanager
def _without_token_notice() -> Iterator[None]:
    logger, notice = logging.getLogger(_TOKEN_LOGGER), _TokenNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _held_until_stored(say: Callable[[str], None]) -> Iterator[None]:
    """Ctrl-C or SIGTERM while a batch of finished rows is being stored waits until they are, then stops the run
    as it would have: a row the store refuses is written again after seconds of waiting, and an interrupt in that
    wait lost the row where the command's last line says every finished row is stored. A second one stops at once,
    its KeyboardInterrupt noted with ROWS_LOST_NOTE.

    A held signal is re-delivered (`signal.raise_signal`) to the handler it found, whatever that is: the CLI's,
    Python's KeyboardInterrupt, SIGTERM's default end; an ignored one stays ignored. Where the block raises (the
    store refused a row for good: StoreWriteError) the run stops with that error, which says what was lost, and
    the signal is dropped. Only the main thread can set handlers: elsewhere (a notebook's background thread)
    nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    broken_off = False  # by a second signal
    previous = {signum: signal.getsignal(signum) for signum in HELD_SIGNALS}
    swapped: list[int] = []

    def restore() -> None:
        while swapped:
            signum = swapped.pop()
            signal.signal(signum, previous[signum])

    def hold(signum: int, frame: object) -> None:
        nonlocal broken_off
        if received:  # a second one: the caller means it
            say("stopping now: the finished rows not yet stored are lost (their cells run again on a rerun)")
            broken_off = True
            received.clear()  # re-delivered here, not again on the way out
            restore()
            signal.raise_signal(signum)
            return
        received.append(signum)
        say("storing the rows already finished first (again to stop at once)")

    try:
        for signum, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):  # None: a handler set outside Python, left alone
                signal.signal(signum, hold)
                swapped.append(signum)
        yield
    except KeyboardInterrupt as stop:
        restore()
        if broken_off:
            stop.add_note(ROWS_LOST_NOTE)
        raise
    except BaseException:
        restore()
        raise
    restore()
    if received:
        signal.raise_signal(received[0])


RAY_STOP_SECONDS = 5.0  # how long to wait for the killed processes of an interrupted Ray start to be gone


@contextmanager
def _stopped_if_interrupted() -> Iterator[None]:
    """A private Ray whose start is broken off (Ctrl-C, SIGTERM, an error) is stopped, processes and all.

    ray.init records its node only once the node is up, so Ctrl-C in the seconds it takes to start one
    left the GCS, raylet and agents running, orphaned, with nothing in ray.shutdown() that knew of them.
    The processes of Ray's that this one started meanwhile, with their children, are stopped here instead.
    """
    me = psutil.Process()
    before = {child.pid for child in me.children()}
    try:
        yield
    except BaseException:
        try:
            ray.shutdown()  # the node, if ray.init got as far as recording it
        finally:
            _stop_trees([child for child in me.children() if child.pid not in before and _is_rays(child)])
        raise


def _is_rays(process: psutil.Process) -> bool:
    """One of the processes ray.init starts: Ray's binaries and scripts, all inside its package."""
    try:
        return f"{os.sep}ray{os.sep}" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _stop_trees(roots: list[psutil.Process]) -> None:
    """Kill `roots` and every process under them. Each is frozen (SIGSTOP) before its children are listed, so
    that none starts another unseen, then all are killed: a start broken off has nothing to save, and a raylet
    sent SIGTERM went on to start its agents (queued before it) and left them orphaned. The kills run
    whatever happens while freezing, so that no process is left stopped."""
    frozen, pending = [], list(roots)
    try:
        while pending:
            process = pending.pop()
            with contextlib.suppress(psutil.Error):
                process.suspend()
                frozen.append(process)
                pending.extend(process.children())
    finally:
        for process in frozen:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(frozen, timeout=RAY_STOP_SECONDS)  # reaps this process's own children


def check_fits(cells: list[PlannedCell], resources: Resources) -> None:
    """Refuse cells the cluster can never schedule: Ray would otherwise wait for them forever.

    With `resources.max_workers` the cluster may grow (an autoscaler adds nodes for the workers asked
    for), so nothing is refused here: `resources.start_timeout_s` ends a wait for a node that never comes.
    """
    if resources.max_workers is not None:
        return
    available = ray.cluster_resources()
    gpus, cpus = available.get("GPU", 0.0), available.get("CPU", 0.0)
    needs = max(cell.gpus for cell in cells)
    if needs > gpus:
        slugs = [c.config.slug for c in cells if c.gpus > gpus][:3]
        raise ConfigError(
            f"models.*.gpus_per_cell asks for {needs:g} GPUs per cell but the cluster has {gpus:g} "
            f"(e.g. {', '.join(slugs)}); lower gpus_per_cell, or set it to 0 to run on CPUs"
        )
    if resources.cpus_per_cell > cpus:
        raise ConfigError(f"resources.cpus_per_cell is {resources.cpus_per_cell:g} but the cluster has {cpus:g} CPUs")
    nodes = live_nodes()
    for per_cell in sorted({cell.gpus for cell in cells}):
        if node_capacity(Shape(resources.cpus_per_cell, per_cell, resources.model_cache_bytes), nodes) == 0:
            raise ConfigError(
                f"no node of the cluster has room for one cell: {resources.cpus_per_cell:g} CPUs and {per_cell:g} GPUs "
                "(resources.cpus_per_cell, models.*.gpus_per_cell) must fit on a single node"
            )


class OtherCodeError(RuntimeError):
    """A worker computed another id for its cell than the driver planned: it runs other code (edited on disk during
    the run, a `git pull`, another steerscale on a node). Its row, stored under the planned id by nothing, landed
    under an id no plan held: an adaptive run chose the cell again and again and overshot --max-cells."""


def crashed_row(cell: CellConfig, error: BaseException, attempt: int, handed_out: datetime) -> dict:
    """The failed row the driver writes for a cell: its worker died on its last attempt or was stopped past its timeout
    (Ray's reason), it ran other code (`OtherCodeError`), or its row could not be stored as it was; identity, `failed`
    and the error; it ran from when it was handed to the worker (`handed_out`) until now."""
    row = identity_columns(cell, attempt)
    # built on the driver: its device (a CPU head node's "cpu" for a GPU cell) says nothing of the worker's
    row.update(status="failed", error=f"{type(error).__name__}: {error}"[-4000:], started_at=handed_out,
               finished_at=datetime.now(timezone.utc), device=None)  # fmt: skip
    return row


class _Metrics:
    """Custom metrics in the Ray dashboard (Prometheus): cells done/failed, cell seconds, tokens/s."""

    def __init__(self, sweep: str) -> None:
        tags = ("sweep", "model", "method")
        self.sweep = sweep
        self.done = metrics.Counter("steerscale_cells_done", "cells stored ok", tag_keys=tags)
        self.failed = metrics.Counter("steerscale_cells_failed", "cells stored failed", tag_keys=tags)
        self.seconds = metrics.Histogram(
            "steerscale_cell_seconds", "wall time of one cell", boundaries=[1, 5, 15, 60, 300, 1800], tag_keys=tags
        )
        self.tokens = metrics.Gauge("steerscale_train_tokens_per_second", "post-training tokens/s", tag_keys=tags)

    def record(self, row: dict) -> None:
        tags = {"sweep": self.sweep, "model": str(row.get("model")), "method": str(row.get("method"))}
        (self.done if row["status"] == "ok" else self.failed).inc(1, tags=tags)
        seconds = (row.get("train_seconds") or 0) + (row.get("eval_seconds") or 0)
        if seconds:
            self.seconds.observe(seconds, tags=tags)
        if row.get("train_tokens") and row.get("train_seconds"):
            self.tokens.set(row["train_tokens"] / row["train_seconds"], tags=tags)


def run_cells(
    cells: list[PlannedCell],
    store: ResultsStore,
    resources: Resources,
    *,
    address: str | None = None,
    progress: bool = True,
    dashboard: bool = True,
    planned_at: float | None = None,
) -> SweepOutcome:
    """Run `cells` on the pool's worker actors and store each row as it finishes.

    `planned_at` is when the caller read the store to choose `cells` (default: now): a cell another
    driver stored after that is not run again, so its row is never overwritten by a rerun.
    Callable again and again in one process (an adaptive loop submitting batch after batch): the
    workers, and the models they hold, carry over from one call to the next.
    """
    if not cells:
        return SweepOutcome()
    started = time.perf_counter()
    planned_at = time.time() if planned_at is None else planned_at
    url = connect(address, dashboard=dashboard)
    if url and progress:
        print(f"Ray dashboard: http://{url}  (if it asks for a token: `ray get-auth-token`)")
    check_fits(cells, resources)
    POOL.attach()
    POOL.forget_dead()
    sweep = _Sweep(resources, Claims(store), _RowWriter(store, tqdm.write), _Metrics(cells[0].config.sweep), planned_at)
    for cell in longest_first(cells):
        sweep.enqueue(cell, 1)
    sweep.run(len(cells), progress)
    sweep.outcome.wall_seconds = time.perf_counter() - started
    return sweep.outcome


class _RowWriter:
    """Writes finished cells' rows: again after a wait while the store refuses (an object store's hiccup passes), never
    a failure over a stored ok row, and a row of other code under its own id; the rows the store refused for good are
    kept in `unstored` (the run stops once the others it has are stored: `raise_unstored`)."""

    def __init__(self, store: ResultsStore, say: Callable[[str], None]) -> None:
        self.store, self.say = store, say
        self.unstored: list[tuple[PlannedCell, OSError]] = []

    def retried(self, attempt: Callable[[], T], what: str, waits: Sequence[float]) -> T | OSError:
        """`attempt()`, again after each of `waits` while the store refuses it; the last refusal where it refused every try."""
        waits = list(waits)
        while True:
            try:
                return attempt()
            except OSError as err:
                if not waits:
                    return err
                wait = waits.pop(0)
                self.say(f"warning: could not {what} ({err}); trying again in {wait:g} s")
                time.sleep(wait)

    def _write(self, row: dict) -> bool:
        """Store `row` unless it is a failure over a stored ok row (`--force`, or another driver that finished the
        cell first: reported, but a flaky node must not erase good data); whether that ok row was kept."""
        kept = row["status"] != "ok" and self.store.holds_ok_row(row["cell_id"])
        if not kept:
            self.store.write(row)
        return kept

    def _waits(self) -> Sequence[float]:
        """Once one row has been refused for good, the others get one try each: a store that is gone must not hold the
        run for seconds a row."""
        return () if self.unstored else STORE_RETRY_SECONDS

    def _written(self, cell: PlannedCell, row: dict) -> bool | None:
        """`_write`, retried; None where the store refused every try (the cell goes to `unstored`)."""
        kept = self.retried(lambda: self._write(row), f"store {row['slug']}", self._waits())
        if isinstance(kept, OSError):
            self.unstored.append((cell, kept))
            return None
        return kept

    def _other_code_row(self, cell: PlannedCell, other: dict) -> dict:
        """The planned cell's failed row for `other`, a row its worker stored under another id (`OtherCodeError`);
        `other` itself is stored as it is where it can be (by `_write`: a failed one not over an ok row), so a run
        planned with the worker's code finds its compute."""

        def keep() -> str:
            if self._write(other):
                return "a failed row, not stored over the ok row under its id"
            return "stored under its own id, which a run planned with that code finds done"

        try:  # a row of other code may not fit this driver's schema: that must not stop the run
            kept = self.retried(keep, f"store {other.get('slug')}", self._waits()) if other.get("cell_id") else "without an id"
        except Exception as err:  # noqa: BLE001 - reported in the failed row
            kept = err
        said = f"not stored ({kept})" if isinstance(kept, Exception) else kept
        row = crashed_row(cell.config, OtherCodeError(
            f"the worker computed this cell's id as {other.get('cell_id')}, not the planned {cell.cell_id}: it runs other code "
            f"than this driver (edited on disk during the run, or another steerscale on that node); its row is {said} — rerun "
            "once the driver and every worker run the same code"), other.get("attempt") or 1, other.get("started_at") or datetime.now(timezone.utc))  # fmt: skip
        row["cell_id"] = cell.cell_id  # the plan's, which this driver's code gives the cell
        return row

    def stored(self, cell: PlannedCell, row: dict) -> tuple[dict, bool] | None:
        """Store a finished cell's row: the row stored and whether a stored ok row was kept over it; None where the store
        refused it (`unstored`). One that does not fit the results schema becomes a failed row; one under another id
        than planned (`OtherCodeError`) is stored as it is, its compute kept for a rerun with that code, and the
        planned cell gets a failed row that says so."""
        if row.get("cell_id") != cell.cell_id:
            row = self._other_code_row(cell, row)
        try:
            kept = self._written(cell, row)
        except Exception as err:  # noqa: BLE001 - not the store's refusal: the row itself (a worker's bug); the sweep goes on
            started_at = row.get("started_at") or datetime.now(timezone.utc)
            row = crashed_row(cell.config, err, row.get("attempt") or 1, started_at)
            row.update(cell_id=cell.cell_id, error=f"the cell's row could not be stored: {row['error']}")  # the plan's id
            kept = self._written(cell, row)
        return None if kept is None else (row, kept)

    def raise_unstored(self) -> None:
        if self.unstored:
            (cell, err), more = self.unstored[0], len(self.unstored) - 1
            others = f" (and {more} other rows)" if more else ""
            raise StoreWriteError(
                f"could not store the row of {cell.config.slug}{others} after {len(STORE_RETRY_SECONDS) + 1} tries: {err}; "
                "every other finished row is stored — rerun the same command once the store takes writes to run "
                f"{'them' if more else 'it'} again"
            )


class _Sweep:
    """One `run_cells` call: the cells waiting for a worker, those in flight, and what became of them."""

    def __init__(self, resources: Resources, claims: Claims, rows: _RowWriter, dashboard_metrics: _Metrics, planned_at: float) -> None:
        self.resources, self.claims, self.rows, self.dashboard_metrics = resources, claims, rows, dashboard_metrics
        self.planned_at = planned_at
        self.bar: tqdm  # the progress bar, for as long as `run` runs
        self.outcome = SweepOutcome()
        # cells waiting for a worker, by the worker shape they need, then by model: a worker takes its own model's next
        self.queues: dict[Shape, dict[str, deque[tuple[PlannedCell, int]]]] = {}
        # each cell in flight: its worker, the cell, its attempt, and when it went to the worker (a crashed row's start)
        self.in_flight: dict[ray.ObjectRef, tuple[Worker, PlannedCell, int, datetime]] = {}
        self.deadlines: dict[ray.ObjectRef, float] = {}  # with resources.cell_timeout_s: when each cell in flight is stopped
        self.unclaimed: tuple[PlannedCell, OSError, int] | None = None  # a cell whose claim the store refused, and the cells left then
        self.start_failures: Counter[Shape] = Counter()  # workers of a shape that died starting since one last started
        self.given_up: list[tuple[str, int]] = []  # shapes none of whose workers would start: the last error, the cells not run
        self.starved_since: dict[Shape, float] = {}  # shapes whose cells wait on workers asked for, none started
        self.announced: set[Shape] = set()
        self.last_heartbeat: float  # when the claims were last refreshed, from `run` on

    # -- the loop

    def run(self, cells: int, progress: bool) -> None:
        """Hand the `cells` queued to workers and store their rows as they finish, until none is left; on the way out
        (done, stopped or interrupted) stop what still runs and release this run's claims."""
        # Into a log file (not a terminal) every redraw is kept, thousands per sweep: there, one every half minute.
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=cells, desc="cells", unit="cell", disable=not progress, dynamic_ncols=True,
                        mininterval=0.1 if terminal else 30, maxinterval=10 if terminal else 30)  # tqdm's monitor redraws past maxinterval
        self.last_heartbeat = time.monotonic()
        try:
            self.dispatch()
            while self.in_flight or (POOL.pending() and self.waiting()):  # workers still importing stay for the next call
                starting = {worker.ready_ref: worker for worker in POOL.pending()}
                refs = [*self.in_flight, *starting]
                timeout = START_POLL_SECONDS if starting else HEARTBEAT_SECONDS
                if self.deadlines:
                    timeout = max(0.0, min(timeout, min(self.deadlines.values()) - time.monotonic()))
                done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                if done:  # drain everything else already finished, so the loop costs one turn per batch, not per cell
                    first = set(done)
                    rest = [ref for ref in refs if ref not in first]
                    done += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
                with _held_until_stored(self.bar.write):  # Ctrl-C from here waits for the batch's rows to be stored
                    self.refresh_claims()
                    self.collect([ref for ref in done if ref not in starting])  # rows first: a start failure stops the run
                    self.stop_overdue()
                    self.rows.raise_unstored()  # after every row of the batch: one the store refuses must not lose the others
                for ref in [ref for ref in done if ref in starting]:
                    self.mark_started(starting[ref], ref)
                self.check_waits()
                self.dispatch()
                self.show_counts(refresh=terminal)  # in a log, with the next update instead
            unplaced = sum(len(q) for by_model in self.queues.values() for q in by_model.values())
            if unplaced:  # check_fits passed, so the cluster shrank (a node or the local raylet died); never return as if they had run
                raise ClusterShrankError(
                    f"{unplaced} cells found no worker: the cluster has no room for their resources any more "
                    "(did a Ray node die?); every finished row is stored — rerun the same command to run the rest"
                )
            self.raise_given_up()
            self.raise_unclaimed()
        except BaseException:
            for worker in POOL.pending():  # the run stopped: nothing will give them cells
                POOL.retire(worker)
            raise
        finally:
            self.bar.close()
            for worker, *_ in self.in_flight.values():  # interrupted: stop what still runs, it is no longer claimed
                POOL.retire(worker)
            for shape in {worker.shape for worker in POOL.pending()}:  # no cell waits for a node any more
                POOL.drop_unplaceable(shape)
            try:
                self.claims.release_all()  # cells still running or waiting when we were interrupted go back to the pool
            except OSError as err:  # a store that refuses writes refuses this too: the error that stopped the run is the one to see
                print(f"warning: could not release this run's claims ({err}); a later run takes them over (at once on this "
                      f"host, after {self.claims.ttl_seconds / 60:g} minutes elsewhere)", file=sys.stderr)  # fmt: skip

    # -- cells waiting, and handing them out

    def enqueue(self, cell: PlannedCell, attempt: int) -> None:
        shape = Shape(self.resources.cpus_per_cell, cell.gpus, self.resources.model_cache_bytes)
        self.queues.setdefault(shape, {}).setdefault(cell.config.model.model_dump_json(), deque()).append((cell, attempt))

    def queued(self, shape: Shape) -> int:
        return sum(map(len, self.queues.get(shape, {}).values()))

    def waiting(self) -> set[Shape]:
        """The shapes some cell waits for a worker of."""
        return {shape for shape in self.queues if self.queued(shape)}

    def claim(self, cell: PlannedCell) -> bool | None:
        """`claims.acquire`, retried (`_RowWriter.retried`); None where the store refused every try: then no new cell
        starts (a retry, whose claim is held, still does) and the run stops once the cells running are stored
        (`raise_unclaimed`). It raised out of the run, and the cells running were stopped and lost."""
        acquire = partial(self.claims.acquire, cell.cell_id, planned_at=self.planned_at)
        claimed = self.rows.retried(acquire, f"claim {cell.config.slug}", STORE_RETRY_SECONDS)
        if not isinstance(claimed, OSError):
            return claimed
        left = 1
        for by_model in self.queues.values():
            for waiting_cells in by_model.values():
                retries = [(c, attempt) for c, attempt in waiting_cells if attempt > 1]  # they hold their claims: they run
                left += len(waiting_cells) - len(retries)
                waiting_cells.clear()
                waiting_cells.extend(retries)
        self.unclaimed = (cell, claimed, left)
        self.bar.total -= left
        return None

    def submit(self, worker: Worker, model: str) -> bool:
        """Hand `worker` the next cell of `model` this driver can claim; False when none is left."""
        queue = self.queues[worker.shape][model]
        while queue:
            cell, attempt = queue.popleft()
            claimed = self.claim(cell) if attempt == 1 else True  # a retry keeps its claim
            if claimed is None:
                return False
            if not claimed:
                self.outcome.skipped_claimed += 1  # another driver runs it, or has stored it since we read the store
                self.bar.total -= 1
                continue
            ref = worker.actor.run.options(name=cell.config.slug).remote(cell.config.model_dump_json(), attempt)  # the dashboard's task name
            worker.running = model
            self.in_flight[ref] = (worker, cell, attempt, datetime.now(timezone.utc))
            if self.resources.cell_timeout_s is not None:
                self.deadlines[ref] = time.monotonic() + self.resources.cell_timeout_s
            return True
        return False

    def dispatch(self) -> None:
        """Give every idle worker a cell, then ask for workers while more cells wait than workers are starting."""
        for shape, by_model in self.queues.items():
            for worker in POOL.idle(shape):
                others = [w for w in POOL.workers if w is not worker]
                while any(by_model.values()) and not self.submit(worker, next_model(worker, by_model, others)):
                    pass  # every cell of that model was another driver's: try the next model
            while self.queued(shape) > len(POOL.pending(shape)) and POOL.has_room(shape, self.resources.max_workers):
                POOL.start(shape)
        for shape in {worker.shape for worker in POOL.pending()}:
            # workers waiting for a node beyond the cells left for them (theirs went to workers that
            # started first): withdraw that demand; without max_workers nothing adds a node for them
            POOL.drop_unplaceable(shape, keep=0 if self.resources.max_workers is None else self.queued(shape))
        needed = self.waiting()
        # cells the cluster had no room for; or whose workers were asked for but cannot be placed: the GPUs' free
        # fractions, split by idle workers of other shapes, are each too small for one (0.6 + 0.6 on two GPUs, then 0.5)
        now = time.monotonic()
        short = {shape for shape in needed
                 if self.queued(shape) > len(POOL.pending(shape)) or now - self.starved_since.get(shape, now) > MAKE_WAY_SECONDS}  # fmt: skip
        spare = [w for w in POOL.idle() if w.shape not in needed]  # resources no waiting cell can use
        if short and spare:
            for worker in spare:
                POOL.retire(worker)
            self.dispatch()

    # -- workers starting

    def started_any(self, shape: Shape) -> bool:
        return any(w.started for w in POOL.workers if w.shape == shape)

    def mark_started(self, worker: Worker, ref: ray.ObjectRef) -> None:
        """A worker's start resolved: it takes cells from now on, or it died starting. Three of a
        shape in a row, with no worker of that shape running, give that shape up (a broken environment)."""
        if worker not in POOL.workers:  # retired while its start was in flight (`give_up`, earlier in this batch)
            return
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            POOL.retire(worker)
            self.start_failures[worker.shape] += 1
            if self.start_failures[worker.shape] >= START_FAILURES and not self.started_any(worker.shape):
                self.give_up(worker.shape, str(err)[-2000:])
        else:
            worker.started = True
            self.start_failures[worker.shape] = 0

    def give_up(self, shape: Shape, error: str) -> None:
        """No cell of `shape` waits for a worker any more; the run stops with `error` once the cells of other shapes
        (those reserving another number of GPUs: another model's gpus_per_cell), running or queued, have run and been
        stored. It stopped at once before, their cells cut off, hours of them perhaps."""
        left = self.queued(shape)
        for waiting_cells in self.queues.pop(shape, {}).values():
            for cell, attempt in waiting_cells:
                if attempt > 1:  # a retry holds its claim: another driver may run it now
                    with contextlib.suppress(OSError):  # then release_all tries again, at the end
                        self.claims.release(cell.cell_id)
        for worker in POOL.pending(shape):
            POOL.retire(worker)
        self.bar.total -= left
        self.given_up.append((error, left))
        others = sum(self.queued(other) for other in self.queues) + len(self.in_flight)
        if others:  # else the run stops now, with the error itself
            self.bar.write(f"{START_FAILURES} workers with {shape.cpus:g} CPUs and {shape.gpus:g} GPUs in a row died while starting "
                           f"({error.strip().splitlines()[-1] if error.strip() else 'no error text'}): {counted(left, 'cell')} of theirs not run; "
                           f"the other {counted(others, 'cell')} ({len(self.in_flight)} running) go on, then the run stops with this error")  # fmt: skip

    def check_waits(self) -> None:
        """Time each shape whose cells wait on workers asked for, none of which has started: say so
        once after a minute, stop past `start_timeout_s`."""
        now = time.monotonic()
        running = {worker.shape for worker in POOL.workers if worker.running is not None}
        timeout = self.resources.start_timeout_s
        for shape in list(self.queues):
            if not starved(shape, self.queued(shape), len(POOL.pending(shape)), self.started_any(shape), running):
                self.starved_since.pop(shape, None)
                continue
            waited = now - self.starved_since.setdefault(shape, now)
            what = f"{shape.cpus:g} CPUs and {shape.gpus:g} GPUs"
            if waited > timeout:
                raise WorkersNotStartingError(
                    f"no worker with {what} started within resources.start_timeout_s ({timeout:g} s): "
                    "no node could take one (other jobs holding the cluster, an autoscaler without such a node type, or at its "
                    f"maximum?); {POOL.usage()}; every finished row is stored — rerun the same command when the cluster has room"
                )
            if waited > ANNOUNCE_WAIT_SECONDS and shape not in self.announced:
                self.announced.add(shape)
                self.bar.write(f"waiting for workers with {what} to start: no live node has room yet (other jobs hold it, or an "
                               "autoscaler adds a node), or they are still being set up (a runtime env's pip install, first imports); "
                               f"{POOL.usage()}; resources.start_timeout_s {timeout:g} s")  # fmt: skip

    # -- cells finishing

    def collect(self, finished: list[ray.ObjectRef]) -> None:
        """Store the rows of the cells in `finished`; a cell whose worker died runs again while it has retries left."""
        for ref in finished:
            worker, cell, attempt, since = self.in_flight.pop(ref)
            self.deadlines.pop(ref, None)
            worker.running = None
            try:
                result: CellResult = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died (killed, OOM-killed, node lost), not the cell's code
                POOL.retire(worker)
                self.outcome.workers_lost += 1
                POOL.forget_dead()  # idle workers on the same lost node
                if attempt <= self.resources.max_retries:
                    self.enqueue(cell, attempt + 1)
                    continue
                row = crashed_row(cell.config, err, attempt, since)
            else:
                row, worker.held = result.row, list(result.held)
                self.outcome.model_loads[result.worker] = self.outcome.model_loads.get(result.worker, 0) + result.loaded
                self.outcome.loads[(result.worker, cell.config.model.id)] += result.loaded
                if result.broken:
                    self.bar.write(f"{result.worker}: CUDA unusable after {cell.config.slug} "
                                   f"({str(row['error']).splitlines()[0]}); the worker is replaced")  # fmt: skip
                    POOL.retire(worker)
                    if attempt <= self.resources.max_retries:
                        self.enqueue(cell, attempt + 1)
                        continue
            self.store_row(cell, row)

    def stop_overdue(self) -> None:
        """Store the cells past resources.cell_timeout_s as failed, stopping their workers. One that finished since the
        loop's wait (while the batch's rows were stored) is collected instead: its row is there, not a timeout."""
        now = time.monotonic()
        overdue = [ref for ref, due in self.deadlines.items() if due <= now]
        if overdue:
            self.collect(ray.wait(overdue, num_returns=len(overdue), timeout=0)[0])
        for ref in [ref for ref in overdue if ref in self.deadlines]:
            worker, cell, attempt, since = self.in_flight.pop(ref)
            del self.deadlines[ref]
            POOL.retire(worker)
            self.outcome.workers_lost += 1
            error = TimeoutError(f"the cell ran past resources.cell_timeout_s ({self.resources.cell_timeout_s:g} s); its worker was stopped")
            self.store_row(cell, crashed_row(cell.config, error, attempt, since))

    def store_row(self, cell: PlannedCell, row: dict) -> None:
        """Store a finished cell's row (`_RowWriter.stored`), release its claim and count it."""
        stored = self.rows.stored(cell, row)
        if stored is None:
            return
        row, kept = stored
        try:
            self.claims.release(cell.cell_id)
        except OSError as err:  # the row is stored: a claim left behind goes stale, and its cell is not run again
            self.bar.write(f"warning: could not release the claim of {row['slug']} ({err})")
        self.dashboard_metrics.record(row)
        self.outcome.cell_seconds += (row.get("train_seconds") or 0) + (row.get("eval_seconds") or 0)
        if row["status"] == "ok":
            self.outcome.ok += 1
        else:
            self.outcome.failed += 1
            self.outcome.kept_ok += kept
            self.bar.write(f"failed: {row['slug']}: {str(row['error']).splitlines()[0]}" + (" (its stored ok row is kept)" if kept else ""))
        self.show_counts(refresh=False)  # the bar's count and its ok/failed move together
        self.bar.update()

    def refresh_claims(self) -> None:
        """Refresh this run's claims every HEARTBEAT_SECONDS / 2, so no other driver takes them over."""
        if time.monotonic() - self.last_heartbeat <= HEARTBEAT_SECONDS / 2:
            return
        try:
            lost = self.claims.heartbeat()
            if lost:
                self.bar.write(f"warning: another driver took over {len(lost)} of this run's claims, judging this one gone "
                               f"(none refreshed for {self.claims.ttl_seconds / 60:g} minutes: a paused machine?), so both run "
                               "those cells; the later ok row of each is kept")  # fmt: skip
        except OSError as err:  # a store hiccup: the next one, in HEARTBEAT_SECONDS / 2, tries again
            self.bar.write(f"warning: could not refresh the claims ({err}); another driver takes a claim over only "
                           f"after {self.claims.ttl_seconds / 60:g} minutes without one")  # fmt: skip
        self.last_heartbeat = time.monotonic()

    # -- how the run ends

    def show_counts(self, refresh: bool = True) -> None:
        self.bar.set_postfix(ok=self.outcome.ok, failed=self.outcome.failed, running=POOL.busy(), starting=len(POOL.pending()), refresh=refresh)

    def raise_given_up(self) -> None:
        if self.given_up:
            raise WorkersNotStartingError(
                f"{START_FAILURES} workers in a row died while starting; the last: {self.given_up[-1][0]}\n"
                f"{counted(sum(left for _, left in self.given_up), 'cell')} not run; every finished row is stored — fix the cause and rerun "
                "the same command to run the rest"
            )

    def raise_unclaimed(self) -> None:
        if self.unclaimed is not None:
            cell, err, left = self.unclaimed
            raise StoreWriteError(
                f"could not claim {cell.config.slug} after {len(STORE_RETRY_SECONDS) + 1} tries: {err}; "
                f"{counted(left, 'cell')} not started; every finished row is stored — rerun the same command "
                "once the store takes writes to run the rest"
            )


def shutdown_workers() -> None:
    """Stop the worker actors (and free the models they hold) before this process is done with Ray."""
    POOL.shutdown()
