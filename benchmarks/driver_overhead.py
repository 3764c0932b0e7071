"""Comparison 6: how the driver's wall time grows with the number of cells, and its cost per cell.

The cells are as cheap as a cell can be (`base` on the smallest rung, one test example, no
validation, neutral or off-task scoring), so what is left is the driver: claims, Ray submission,
`ray.wait`, the atomic Parquet write, the progress bookkeeping. Ray and its workers are started
and warmed once, outside the timed runs, as in a long sweep.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass

import ray

from benchmarks.common import Check, Result, Row
from orchestrator.driver import run_cells
from orchestrator.grid import PlannedCell, expand
from orchestrator.spec import Resources, SweepSpec
from orchestrator.store import ResultsStore

GOAL_MS = 50.0


@dataclass(frozen=True)
class Settings:
    model: str
    counts: tuple[int, ...]
    workers: int = 2


QUICK = Settings("ladder:test/xs", counts=(20, 60))
FULL = Settings("ladder:test/xs", counts=(100, 300, 1000))


def tiny_cells(model: str, n: int, first_seed: int = 0) -> list[PlannedCell]:
    spec = SweepSpec(
        sweep="overhead", results_dir="unused", models=[{"id": model}], tasks=["facts"], methods={"base": {}},
        budgets=[0], seeds=list(range(first_seed, first_seed + n)),
        eval={"test_size": 1, "validation_size": 0, "neutral_size": 0, "offtask_size": 0, "batch_size": 1},
    )  # fmt: skip
    return expand(spec)


def run(quick: bool) -> Result:
    s = QUICK if quick else FULL
    result = Result("6. Driver overhead: wall time vs number of tiny cells", settings={**asdict(s), "cell": "base, test_size=1, no validation/neutral/off-task"})
    resources = Resources(cpus_per_cell=1, max_retries=0)
    ray.init(num_cpus=s.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as out:  # warm-up: start the workers, load the model
            run_cells(tiny_cells(s.model, 2 * s.workers, first_seed=10**6), ResultsStore(out), resources, progress=False, dashboard=False)
        per_cell = {}
        for n in s.counts:
            with tempfile.TemporaryDirectory() as out:
                outcome = run_cells(tiny_cells(s.model, n), ResultsStore(out), resources, progress=False, dashboard=False)
                stored = len(ResultsStore(out).read())
            overhead = (outcome.wall_seconds - outcome.cell_seconds / s.workers) / n
            per_cell[n] = outcome.wall_seconds / n
            result.checks.append(Check(f"{n} cells: all ok and stored", f"ok {outcome.ok}, failed {outcome.failed}, rows {stored}", outcome.ok == n == stored))
            result.rows.append(Row(
                f"{n} cells", f"wall {outcome.wall_seconds:.2f} s, {1e3 * per_cell[n]:.1f} ms/cell; cell compute {1e3 * outcome.cell_seconds / n:.1f} ms/cell",
                "", f"driver overhead {1e3 * overhead:.1f} ms/cell", f"< {GOAL_MS:.0f} ms/cell, linear",
            ))  # fmt: skip
    finally:
        ray.shutdown()
    small, large = min(per_cell), max(per_cell)
    result.notes.append(
        f"Linearity: wall per cell at {large} cells ÷ at {small} cells = {per_cell[large] / per_cell[small]:.2f} (1.0 is linear). "
        f"Driver overhead per cell = (wall − Σ cell compute ÷ {s.workers} workers) ÷ cells: it includes Ray's per-task cost."
    )
    return result
