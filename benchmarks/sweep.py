"""Comparison 4: one small sweep four ways — steerscale's driver, a Ray Tune grid search calling the
same worker code (with actors reused, and with Tune's defaults), and a plain loop that loads the
model for every cell.

Every side runs the same planned cells through `workers.run_cell.run_cell`, so their rows must agree
(scores equal, NLLs within float noise); what differs is scheduling and model reuse. Each Ray side
starts its own local Ray first and times the sweep from submission to the last row, with Ray up (as
on a cluster, where Ray is already running); the Ray start-up is reported on its own line. Worker
start-up (a process importing torch and transformers) is inside the sweep time: every sweep pays it.
The full run uses rungs of the default ladder, whose cells take seconds as a real cell would; the
quick run the test ladder, whose cells take milliseconds, so there start-up dominates efficiency.
The full run then repeats the first run with LoRA cells 4x as long (`LONGER`), which shows how much
of the efficiency lost is that fixed start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import ray
import torch
from ray import tune

from benchmarks.common import Check, Result, Row
from orchestrator.driver import run_cells
from orchestrator.grid import PlannedCell, expand
from orchestrator.spec import Resources, SweepSpec
from orchestrator.store import ResultsStore
from workers.cache import WorkerCache
from workers.cell import CellConfig
from workers.run_cell import CellRun, prepare_model, run_cell

ROOT = Path(__file__).resolve().parents[1]
NLL_ATOL = 1e-5
ROW_FIELDS = ("cell_id", "status", "score", "nll", "train_seconds", "eval_seconds", "peak_mem_bytes")


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    task: str
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    lora_steps: int
    test_size: int
    validation_size: int
    workers: int = 2
    repeats: int = 1  # runs of each Ray side, alternating which goes first; the loop runs once
    again: bool = True  # each Ray side runs the sweep a second time in the same process


QUICK = Settings(("ladder:test/xs", "ladder:test/s"), "facts", budgets=(8,), seeds=(0,), lora_steps=4, test_size=16, validation_size=8)
FULL = Settings(("ladder:l", "ladder:xl"), "facts", budgets=(32, 128, 512), seeds=(0, 1), lora_steps=150, test_size=100, validation_size=32, repeats=3)
# The same grid with LoRA cells 4x as long, once per Ray side: a first run's fixed costs (worker
# processes importing torch and transformers) against more compute, as real cells have.
LONGER = replace(FULL, lora_steps=600, repeats=1, again=False)


def planned_cells(s: Settings, results_dir: str) -> list[PlannedCell]:
    spec = SweepSpec(
        sweep="bench", results_dir=results_dir, models=[{"id": m} for m in s.models], tasks=[s.task],
        methods={
            "steer_mean": {"layers": [0.5], "scales": [0.0, 1.0, 2.0]},
            "lora": {"rank": 4, "train": {"lr": 3e-3, "min_steps": s.lora_steps, "max_steps": s.lora_steps, "batch_size": 8, "checkpoints": 2}},
        },
        budgets=list(s.budgets), seeds=list(s.seeds),
        eval={"test_size": s.test_size, "validation_size": s.validation_size, "neutral_size": 4, "offtask_size": 0, "batch_size": 64},
        resources={"cpus_per_cell": 1, "max_retries": 0},
    )  # fmt: skip
    return expand(spec)


def _start_ray(workers: int) -> float:
    """Start a local Ray; returns the seconds it took."""
    # Tune's trainable lives in this package, which is not installed: let the workers import it.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return time.perf_counter() - started


@dataclass
class SideOutcome:
    wall: float  # the sweep, from submission to the last row (Ray already up)
    rows: dict[str, dict]  # cell_id -> row
    loads: int
    workers: int
    ray_start: float = 0.0
    first_start: float | None = None  # seconds from submission to the first cell's own compute: worker start-up, first model load
    again_wall: float | None = None  # the same sweep again in the same process (an adaptive loop's next round)
    warm_efficiency: float | None = None  # steerscale: that second run's efficiency, on the pool the first started
    again_rows: dict[str, dict] | None = None  # steerscale: that second run's rows, which must equal the first's

    @property
    def cell_seconds(self) -> float:
        return sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0) for r in self.rows.values())

    @property
    def efficiency(self) -> float:
        return self.cell_seconds / (self.wall * self.workers)

    @property
    def peak_rss(self) -> int:
        return max(int(r.get("peak_mem_bytes") or 0) for r in self.rows.values())


def run_steerscale(cells: list[PlannedCell], s: Settings) -> SideOutcome:
    """The sweep, then (with `s.again`) the same cells again into a second store on the now-warm worker
    pool: what every adaptive round after the first, or a second sweep from one process, sees."""
    resources = Resources(cpus_per_cell=1, max_retries=0)
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as again:
        ray_start = _start_ray(s.workers)
        try:
            submitted, started = time.time(), time.perf_counter()
            outcome = run_cells(cells, ResultsStore(out), resources, progress=False, dashboard=False)
            wall = time.perf_counter() - started
            warm = run_cells(cells, ResultsStore(again), resources, progress=False, dashboard=False) if s.again else None
        finally:
            ray.shutdown()
        table = ResultsStore(out).read().to_pylist()
        again_table = ResultsStore(again).read().to_pylist() if warm else []
    side = SideOutcome(wall, {r["cell_id"]: r for r in table}, outcome.total_model_loads, s.workers, ray_start,
                       _first_compute(table) - submitted)  # fmt: skip
    if warm:
        side.again_wall, side.warm_efficiency = warm.wall_seconds, warm.cell_seconds / (warm.wall_seconds * s.workers)
        side.again_rows = {r["cell_id"]: r for r in again_table}
    return side


def _first_compute(rows: list[dict]) -> float:
    """When the first cell's own compute began (its end less its train + eval seconds), as a timestamp.

    A row's `started_at` is no fair mark of start-up: a Tune trial stamps it before its process
    imports peft and loads the model, a steerscale worker after (in the actor's set-up).
    """
    return min(r["finished_at"].timestamp() - (r.get("train_seconds") or 0) - (r.get("eval_seconds") or 0) for r in rows)


def _tune_trainable(config: dict) -> dict:
    """What a user would write: the cell in, the worker's row fields out."""
    from workers.cache import PROCESS_CACHE  # imported here: a by-value pickled function would count a copy's loads

    torch.set_num_threads(1)
    row = run_cell(CellConfig.model_validate_json(config["cell"]))
    return {**{k: row.get(k) for k in ROW_FIELDS}, "compute_began": _first_compute([row]), "pid": os.getpid(), "loads": PROCESS_CACHE.loads}


def _tune_fit(cells: list[PlannedCell], s: Settings, storage: str, name: str, *, reuse_actors: bool):
    tuner = tune.Tuner(
        tune.with_resources(_tune_trainable, {"cpu": 1}),
        param_space={"cell": tune.grid_search([c.config.model_dump_json() for c in cells])},
        # reusing actors keeps each worker's model cache across trials (not Tune's default)
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, max_concurrent_trials=s.workers),
        run_config=tune.RunConfig(storage_path=storage, name=name, verbose=0),
    )
    return tuner.fit().get_dataframe()


def run_tune(cells: list[PlannedCell], s: Settings, *, reuse_actors: bool = True) -> SideOutcome:
    """The grid, then (with `s.again`) the same grid again in the same process, as an adaptive loop's next round would."""
    with tempfile.TemporaryDirectory() as out:
        ray_start = _start_ray(s.workers)
        try:
            submitted, started = time.time(), time.perf_counter()
            frame = _tune_fit(cells, s, out, "bench", reuse_actors=reuse_actors)
            wall = time.perf_counter() - started
            started = time.perf_counter()
            again_wall = None
            if s.again:
                _tune_fit(cells, s, out, "again", reuse_actors=reuse_actors)
                again_wall = time.perf_counter() - started
        finally:
            ray.shutdown()
    rows = {r["cell_id"]: r for r in frame.to_dict("records")}
    loads = int(frame.groupby("pid")["loads"].max().sum())
    return SideOutcome(wall, rows, loads, s.workers, ray_start, float(frame["compute_began"].min()) - submitted, again_wall)


def run_sequential(cells: list[PlannedCell]) -> SideOutcome:
    started = time.perf_counter()
    loads = 0
    rows = {}
    for cell in cells:
        cache = WorkerCache()  # a fresh process per cell, in effect: load the model, score the base, run
        rows[cell.cell_id] = run_cell(cell.config, CellRun(cache=cache))
        loads += cache.loads
    return SideOutcome(time.perf_counter() - started, rows, loads, 1)


def _json_rows(rows: dict[str, dict]) -> dict[str, dict]:
    return {k: {f: r.get(f) for f in ROW_FIELDS} for k, r in rows.items()}


# What a worker imports before its first cell: the actor's module, the row's library versions (peft), a model's code.
WORKER_IMPORTS = (
    "import time; t = time.perf_counter(); import orchestrator.pool, workers.run_cell as r; r.library_versions(); "
    "import transformers.models.llama.modeling_llama; print(time.perf_counter() - t)"
)


def worker_import_seconds(repeats: int = 3) -> float:
    """Median seconds a fresh process takes to import what a worker needs: a floor under any first
    run's start-up (Tune's trial actors import the same), before Ray places the actor or a model loads."""
    runs = [subprocess.run([sys.executable, "-c", WORKER_IMPORTS], capture_output=True, text=True, cwd=ROOT, check=True) for _ in range(repeats)]
    return sorted(float(r.stdout.strip().splitlines()[-1]) for r in runs)[repeats // 2]


def floor_row(label: str, ours: SideOutcome, tuned: SideOutcome, imports: float) -> Row:
    """The least wall a first run can take: the workers' imports, then the cells' compute split evenly."""
    floor = imports + ours.cell_seconds / ours.workers
    return Row(
        f"{label}: floor — a fresh process imports a worker's libraries in {imports:.1f} s; no first run's wall is below "
        "that + Σ cell compute ÷ workers", f"{floor:.1f} s (ours {ours.wall:.1f} s: {ours.wall - floor:+.1f} s)",
        f"Tune {tuned.wall:.1f} s", f"at the floor: Tune÷ours ≤ {tuned.wall / floor:.2f}×, efficiency ≤ {ours.cell_seconds / (floor * ours.workers):.2f}",
        "shows whether the goals (0.8× Tune's wall, efficiency 0.9) can be met at this sweep's size",
    )


def _compare(a: SideOutcome, b: SideOutcome) -> tuple[bool, str]:
    if set(a.rows) != set(b.rows):
        return False, f"different cells: {len(a.rows)} vs {len(b.rows)}"
    bad = [k for k in a.rows if a.rows[k]["status"] != "ok" or b.rows[k]["status"] != "ok"]
    d_score = max(abs(a.rows[k]["score"] - b.rows[k]["score"]) for k in a.rows if k not in bad) if len(bad) < len(a.rows) else float("nan")
    d_nll = max(abs(a.rows[k]["nll"] - b.rows[k]["nll"]) for k in a.rows if k not in bad) if len(bad) < len(a.rows) else float("nan")
    ok = not bad and d_score == 0 and d_nll <= NLL_ATOL
    return ok, f"{len(a.rows)} cells, not ok: {len(bad)}, max |Δscore| {d_score:.2g}, max |Δnll| {d_nll:.2g}"


SIDES = {
    "steerscale": run_steerscale,
    "tune": run_tune,  # reuse_actors=True: Tune at its best here
    "tune_defaults": lambda cells, s: run_tune(cells, s, reuse_actors=False),  # a new trial actor (process) per cell
    "loop": lambda cells, s: run_sequential(cells),
}


def run_side(side: str, s: Settings) -> SideOutcome:
    """One side in a fresh process: a second local Ray in one process was seen to hang, and memory stays apart."""
    out = subprocess.run(
        [sys.executable, "-c", "from benchmarks.sweep import main; main()", side, json.dumps(asdict(s))],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"sweep side {side} failed: {out.stderr.strip()[-2000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return SideOutcome(data["wall"], data["rows"], data["loads"], data["workers"], data["ray_start"], data["first_start"], data["again_wall"],
                       data["warm_efficiency"], data["again_rows"])


def run(quick: bool) -> Result:
    s = QUICK if quick else FULL
    cells = planned_cells(s, "unused")
    for model in {c.config.model for c in cells}:
        prepare_model(model)  # build ladder rungs outside the timed region (LONGER uses the same ones)
    result = Result(f"4. A {len(cells)}-cell sweep: steerscale driver vs Ray Tune grid search vs a plain loop", settings={
        **asdict(s), "cells": len(cells), "methods": ["steer_mean", "lora"], "torch_threads_per_cell": 1,
    })  # fmt: skip
    runs: dict[str, list[SideOutcome]] = {"steerscale": [], "tune": []}
    for repeat in range(s.repeats):  # alternate the order, so drifting load on a shared machine hits both alike
        for side in (("steerscale", "tune") if repeat % 2 == 0 else ("tune", "steerscale")):
            runs[side].append(run_side(side, s))
    plain = run_side("loop", s)
    defaults = run_side("tune_defaults", replace(s, again=False))  # once: at a new process per cell it is far behind
    comparisons = (("Ray Tune", runs["tune"]), ("Ray Tune with its defaults", [defaults]), ("steerscale's other runs", runs["steerscale"][1:]),
                   ("plain loop", [plain]))  # fmt: skip
    for name, others in comparisons:
        for other in others:
            ok, text = _compare(runs["steerscale"][0], other)
            result.checks.append(Check(f"same rows as {name}", text, ok))
    for run_ in runs["steerscale"]:
        if run_.again_rows is not None:
            ok, text = _compare(run_, SideOutcome(run_.again_wall or 0.0, run_.again_rows, 0, s.workers))
            result.checks.append(Check("steerscale's second round (warm pool, cached baselines): same rows as its first", text, ok))
    ours, tuned = (sorted(runs[side], key=lambda o: o.wall)[len(runs[side]) // 2] for side in ("steerscale", "tune"))  # the median run
    spread = {side: f"[{min(o.wall for o in runs[side]):.1f}–{max(o.wall for o in runs[side]):.1f} s, n={len(runs[side])}]" for side in runs}
    result.rows += [
        Row("sweep wall time (Ray up), median run", f"{ours.wall:.1f} s {spread['steerscale']}",
            f"Tune {tuned.wall:.1f} s {spread['tune']} / Tune defaults {defaults.wall:.1f} s / loop {plain.wall:.1f} s",
            f"Tune÷ours {tuned.wall / ours.wall:.2f}×, Tune defaults÷ours {defaults.wall / ours.wall:.2f}×, loop÷ours {plain.wall / ours.wall:.2f}×",
            "ours ≤ 0.8× Tune's wall"),
        Row("model loads", str(ours.loads), f"Tune {tuned.loads} / Tune defaults {defaults.loads} / loop {plain.loads}", "", "one per (worker, model)"),
        Row("efficiency: Σ cell compute ÷ (wall × workers)", f"{ours.efficiency:.2f} ({ours.workers} workers)",
            f"Tune {tuned.efficiency:.2f} ({tuned.workers}) / Tune defaults {defaults.efficiency:.2f} ({defaults.workers}) / "
            f"loop {plain.efficiency:.2f} ({plain.workers})", "", "≥ 0.9"),
        Row("start-up: submission to the first cell's own compute (worker processes importing torch, transformers, peft; first model load)",
            f"{ours.first_start:.1f} s", f"Tune {tuned.first_start:.1f} s / Tune defaults {defaults.first_start:.1f} s", "",
            "paid by every first run: ≈ this ÷ wall of the efficiency is lost to it"),
        Row("the same sweep again in the same process (an adaptive loop's next round): wall", f"{ours.again_wall:.1f} s (warm worker pool)",
            f"Tune {tuned.again_wall:.1f} s (a second Tuner.fit)", f"Tune÷ours {tuned.again_wall / ours.again_wall:.2f}×",
            "not the goal's like-for-like test: a second Tuner.fit starts new actors (≈ Tune's start-up), where rounds of "
            "one Tuner.fit with a searcher would keep them"),
        Row("efficiency of that second run", f"{ours.warm_efficiency:.2f}", "-", "", "≥ 0.9"),
        Row("Ray start-up (before the sweep, not in its wall)", f"{ours.ray_start:.1f} s", f"Tune {tuned.ray_start:.1f} s / loop -", ""),
        Row("Σ cell compute (train + eval seconds in rows)", f"{ours.cell_seconds:.1f} s", f"Tune {tuned.cell_seconds:.1f} s / loop {plain.cell_seconds:.1f} s", ""),
        Row("peak memory of a cell, max over rows (the worker's resident set during the cell, after its model is loaded, "
            "less other models it keeps; not the load's own spike)", f"{ours.peak_rss / 2**20:.0f} MiB",
            f"Tune {tuned.peak_rss / 2**20:.0f} MiB / loop {plain.peak_rss / 2**20:.0f} MiB", ""),
    ]  # fmt: skip
    imports = worker_import_seconds()
    result.rows.append(floor_row("first run", ours, tuned, imports))
    if not quick:
        result.rows += _longer_cells(result, imports)
    result.notes.append(
        "\"Tune\" is Tune at its best here, `reuse_actors=True` (each trial actor keeps its process and so its loaded model); "
        "\"Tune defaults\" is the same grid with Tune's default `reuse_actors=False`, a new actor process per trial, as a user "
        "who does not know to change it gets (run once). Each of steerscale and Tune ran `repeats` times, alternating which went "
        "first; its row shows the median run (by wall). The loop ran once, as one process with one torch thread, the Ray sides "
        "two single-thread workers. Cell compute excludes model loading, so a side that reloads shows it as lost efficiency; "
        "it includes the base model's reference passes, which steerscale's workers run once per (model, task) and the loop "
        "in every cell (so the loop's efficiency counts that repeated work as useful). The loop is the issue's: it loads the "
        "model for every cell, as a fresh process per cell would, but pays no process's imports; a loop keeping one process "
        "cache (two loads, baselines scored once) would need about Σ cell compute less the repeated reference passes, "
        "≈ steerscale's Σ cell compute, so loop÷ours would fall from the row's ratio towards its Σ compute ÷ ours' wall."
    )
    return result


def _longer_cells(result: Result, imports: float) -> list[Row]:
    """The first run again with LoRA cells 4x as long: how much of the efficiency lost is a fixed start-up."""
    ours, tuned = run_side("steerscale", LONGER), run_side("tune", LONGER)
    ok, text = _compare(ours, tuned)
    result.checks.append(Check(f"same rows as Ray Tune, LoRA cells of {LONGER.lora_steps} steps", text, ok))
    return [
        Row(f"first run with LoRA cells of {LONGER.lora_steps} steps (4× as long; one run each): wall",
            f"{ours.wall:.1f} s", f"Tune {tuned.wall:.1f} s", f"Tune÷ours {tuned.wall / ours.wall:.2f}×", "ours ≤ 0.8× Tune's wall"),
        Row("efficiency of that run", f"{ours.efficiency:.2f} (start-up {ours.first_start:.1f} s)",
            f"Tune {tuned.efficiency:.2f} (start-up {tuned.first_start:.1f} s)", "", "≥ 0.9"),
        floor_row(f"LoRA cells of {LONGER.lora_steps} steps", ours, tuned, imports),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="run one side of the sweep comparison; prints its outcome as JSON")
    parser.add_argument("side", choices=sorted(SIDES))
    parser.add_argument("settings", help="the Settings as JSON")
    args = parser.parse_args(sys.argv[1:])
    torch.set_num_threads(1)
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.settings).items()})
    outcome = SIDES[args.side](planned_cells(s, "unused"), s)
    data = {"wall": outcome.wall, "rows": _json_rows(outcome.rows), "loads": outcome.loads, "workers": outcome.workers, "ray_start": outcome.ray_start,
            "first_start": outcome.first_start, "again_wall": outcome.again_wall, "warm_efficiency": outcome.warm_efficiency,
            "again_rows": _json_rows(outcome.again_rows) if outcome.again_rows is not None else None}
    print(json.dumps(data, default=lambda v: v.item()))  # numpy scalars from the Tune dataframe


if __name__ == "__main__":
    main()
