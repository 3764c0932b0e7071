"""Run planned cells on Ray and store each row the moment its cell finishes.

Completions are consumed with `ray.wait` in the order they finish, never `ray.get` in submission
order, so one slow cell never stalls the others' rows. A cell that raises comes back as a `failed`
row from `workers.run_cell`; a worker process that dies (killed, OOM-killed, node lost) is resubmitted
by the driver up to `max_retries` times, with the attempt number recorded, and then stored as
`failed` with Ray's reason. The driver is the only writer of the store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray
from ray.util import metrics
from tqdm import tqdm

from workers.cell import CellConfig
from workers.config import ConfigError
from workers.run_cell import identity_columns

from orchestrator.claims import Claims
from orchestrator.grid import PlannedCell
from orchestrator.spec import Resources
from orchestrator.store import ResultsStore

HEARTBEAT_SECONDS = 60.0


@dataclass
class SweepOutcome:
    ok: int = 0
    failed: int = 0
    skipped_claimed: int = 0  # cells another live driver was running
    wall_seconds: float = 0.0
    cell_seconds: float = 0.0  # sum over cells of their own run time
    model_loads: dict[str, int] = field(default_factory=dict)  # worker -> models it loaded

    @property
    def total_model_loads(self) -> int:
        return sum(self.model_loads.values())


def _execute_cell(cell_json: str, threads: int, attempt: int, shard: bool) -> tuple[dict, str, int]:
    """Runs inside a Ray worker: one cell, with torch limited to the cell's CPU share."""
    import torch

    from workers.run_cell import CellRun, model_loads, run_cell

    # Two torch processes with all threads each on 2 cores were ~9x slower (shared/notes/offline-world.md).
    torch.set_num_threads(threads)
    row = run_cell(CellConfig.model_validate_json(cell_json), CellRun(attempt=attempt, shard=shard))
    return row, f"{os.uname().nodename}:{os.getpid()}", model_loads()


def connect(address: str | None, *, dashboard: bool = True) -> str | None:
    """Join `address` (e.g. "auto"), or start a private local Ray with the dashboard on 127.0.0.1.

    Returns the dashboard's URL when there is one.
    """
    if ray.is_initialized():
        return None
    if address:
        context = ray.init(address=address, log_to_driver=False)
    else:
        context = ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)
    return context.dashboard_url or None


def check_fits(cells: list[PlannedCell], resources: Resources) -> None:
    """Refuse cells the cluster can never schedule: Ray would otherwise wait for them forever."""
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


def crashed_row(cell: CellConfig, error: BaseException, attempt: int) -> dict:
    """The row for a cell whose worker died on its last attempt: identity, `failed`, and Ray's reason."""
    now = datetime.now(timezone.utc)
    row = identity_columns(cell, attempt)
    row.update(status="failed", error=f"{type(error).__name__}: {error}"[-4000:], started_at=now, finished_at=now)
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
) -> SweepOutcome:
    outcome = SweepOutcome()
    if not cells:
        return outcome
    started = time.perf_counter()
    url = connect(address, dashboard=dashboard)
    if url and progress:
        print(f"Ray dashboard: http://{url}  (if it asks for a token: `ray get-auth-token`)")
    check_fits(cells, resources)
    claims = Claims(store)
    threads = max(1, int(resources.cpus_per_cell))
    remote = ray.remote(_execute_cell)
    dashboard_metrics = _Metrics(cells[0].config.sweep)
    in_flight: dict[ray.ObjectRef, tuple[PlannedCell, int]] = {}

    def submit(cell: PlannedCell, attempt: int) -> None:
        ref = remote.options(
            name=cell.config.slug,  # what the Ray dashboard shows for the task
            num_cpus=resources.cpus_per_cell,
            num_gpus=cell.gpus,
            max_retries=0,  # retries are ours, so the row can say which attempt it was
        ).remote(cell.config.model_dump_json(), threads, attempt, cell.gpus > 1)
        in_flight[ref] = (cell, attempt)

    for cell in cells:  # grid order keeps a model's cells together, so workers rarely reload
        if claims.acquire(cell.cell_id):
            submit(cell, 1)
        else:
            outcome.skipped_claimed += 1
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // resources.cpus_per_cell))
    bar = tqdm(total=len(in_flight), desc="cells", unit="cell", disable=not progress, dynamic_ncols=True)
    last_heartbeat = time.monotonic()
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=HEARTBEAT_SECONDS)
            if done:  # drain everything else already finished, so the loop costs one turn per batch, not per cell
                first = set(done)
                rest = [ref for ref in in_flight if ref not in first]
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
            if time.monotonic() - last_heartbeat > HEARTBEAT_SECONDS / 2:
                claims.heartbeat()
                last_heartbeat = time.monotonic()
            for ref in done:
                cell, attempt = in_flight.pop(ref)
                try:
                    row, worker, loads = ray.get(ref)
                    outcome.model_loads[worker] = loads
                except ray.exceptions.RayError as err:  # the worker process died, not the cell's code
                    if attempt <= resources.max_retries:
                        submit(cell, attempt + 1)
                        continue
                    row = crashed_row(cell.config, err, attempt)
                store.write(row)
                claims.release(cell.cell_id)
                dashboard_metrics.record(row)
                outcome.cell_seconds += (row.get("train_seconds") or 0) + (row.get("eval_seconds") or 0)
                if row["status"] == "ok":
                    outcome.ok += 1
                else:
                    outcome.failed += 1
                    bar.write(f"failed: {row['slug']}: {str(row['error']).splitlines()[0]}")
                bar.update()
            bar.set_postfix(ok=outcome.ok, failed=outcome.failed, running=min(len(in_flight), capacity))
    finally:
        bar.close()
        claims.release_all()  # cells still running when we were interrupted go back to the pool
    outcome.wall_seconds = time.perf_counter() - started
    return outcome
