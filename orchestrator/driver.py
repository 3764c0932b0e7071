"""Run planned cells on Ray and store each row the moment its cell finishes.

Completions are consumed with `ray.wait` in the order they finish, never `ray.get` in submission
order, so one slow cell never stalls the others' rows. A cell that raises comes back as a `failed`
row from `workers.run_cell`; a worker process that dies is retried by Ray (`max_retries`) and then
stored as `failed` with Ray's reason. The driver is the only writer of the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import ray
from tqdm import tqdm

from workers.cell import CellConfig
from workers.run_cell import identity_columns

from orchestrator.grid import PlannedCell
from orchestrator.spec import Resources
from orchestrator.store import ResultsStore


@dataclass
class SweepOutcome:
    ok: int = 0
    failed: int = 0
    wall_seconds: float = 0.0


def _execute_cell(cell_json: str, threads: int) -> dict:
    """Runs inside a Ray worker: one cell, with torch limited to the cell's CPU share."""
    import torch

    from workers.run_cell import run_cell

    # Two torch processes with all threads each on 2 cores were ~9x slower (shared/notes/offline-world.md).
    torch.set_num_threads(threads)
    return run_cell(CellConfig.model_validate_json(cell_json))


def connect(address: str | None, *, dashboard: bool = True) -> None:
    """Join `address` (e.g. "auto"), or start a private local Ray with the dashboard on 127.0.0.1."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=False)


def crashed_row(cell: CellConfig, error: BaseException, attempts: int) -> dict:
    """The row for a cell whose worker died on every attempt: its identity, `failed`, and Ray's reason."""
    now = datetime.now(timezone.utc)
    row = identity_columns(cell, attempts)
    row.update(status="failed", error=f"{type(error).__name__}: {error}"[-4000:], started_at=now, finished_at=now)
    return row


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
    connect(address, dashboard=dashboard)
    threads = max(1, int(resources.cpus_per_cell))
    remote = ray.remote(_execute_cell)
    in_flight = {}
    for cell in cells:
        ref = remote.options(
            name=cell.config.slug,  # what the Ray dashboard shows for the task
            num_cpus=resources.cpus_per_cell,
            num_gpus=cell.gpus,
            max_retries=resources.max_retries,
        ).remote(cell.config.model_dump_json(), threads)
        in_flight[ref] = cell
    capacity = max(1, int(ray.cluster_resources().get("CPU", 1) // resources.cpus_per_cell))
    bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            cell = in_flight.pop(done[0])
            try:
                row = ray.get(done[0])
            except ray.exceptions.RayError as err:  # the worker died (killed, OOM-killed, node lost) every attempt
                row = crashed_row(cell.config, err, resources.max_retries + 1)
            store.write(row)
            if row["status"] == "ok":
                outcome.ok += 1
            else:
                outcome.failed += 1
                bar.write(f"failed: {row['slug']}: {str(row['error']).splitlines()[0]}")
            bar.set_postfix(ok=outcome.ok, failed=outcome.failed, running=min(len(in_flight), capacity))
            bar.update()
    finally:
        bar.close()
    outcome.wall_seconds = time.perf_counter() - started
    return outcome

