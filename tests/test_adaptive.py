"""Adaptive sweeps: a simulated world with a known law (no training, no Ray, no torch), then the CLI on real Ray.

The world: one task, three model sizes, a steering curve that saturates early and a fine-tuning
curve that keeps improving, so fine-tuning overtakes steering at a known D*(N) inside a budget
range of three decades; every cell's loss is the law times log-normal noise, and its post-training
FLOPs follow the methods' own formulas (fine-tuning cost grows with the budget, steering's is a
forward pass). The full grid is 11 budgets × 3 seeds per curve, as a dense sweep would run it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.report import write_report
from analysis.synthetic import TrueCurve
from orchestrator.acquisition import DESIGN_POINTS, GIVE_UP_FAILURES, check_grid, curve_key, curves_of, design_choices, design_order, label, targets_from
from orchestrator import adaptive as adaptive_loop
from orchestrator.adaptive import DecisionLog, Settings, fit_budget_curves, run_adaptive, stored_rows
from orchestrator.cellcost import CostModel, work_units
from orchestrator.claims import Claims
from orchestrator.store import ResultsStore
from workers.cell import CellConfig, EvalConfig, ModelSpec
from workers.config import ConfigError
from workers.training import TrainConfig, batch_order, steps_for

MODELS = {"sim-s": 1e5, "sim-m": 4e5, "sim-l": 1.6e6}
BUDGETS = [4 * 2**k for k in range(11)]
SEEDS = [0, 1, 2]
TRAIN = {"lr": 1e-3, "epochs": 4, "min_steps": 20, "max_steps": 1000, "batch_size": 16}
METHODS = {"steer_mean": {}, "lora": {"rank": 4, "train": TRAIN}}
TOKENS_PER_EXAMPLE = 40.0  # the world's; the cost model starts from 32 and must find 40
NOISE = 0.05  # log-normal noise on each cell's loss
GOAL_OVER_FULL_GRID = 1.1  # the adaptive run's goal, over the full grid's widest interval (see `adaptive`)


def truth(method: str, model: str) -> TrueCurve:
    i = list(MODELS).index(model)
    return TrueCurve(0.40 - 0.05 * i, 1.0, 0.8) if method == "steer_mean" else TrueCurve(0.05, 2.0, 0.45)


def true_log10_dstar(model: str) -> float:
    d = np.geomspace(BUDGETS[0], BUDGETS[-1], 400_000)
    advantage = truth("lora", model).score(d) - truth("steer_mean", model).score(d)
    return float(np.log10(d[np.argmax(advantage >= 0)]))


@dataclass(frozen=True)
class SimCell:
    """A planned cell of the simulated grid (what `orchestrator.grid.PlannedCell` offers the loop)."""

    config: CellConfig

    @property
    def cell_id(self) -> str:
        return self.config.cell_id


def grid() -> list[SimCell]:
    evaluation = EvalConfig(test_size=100, validation_size=32, neutral_size=16)
    return [
        SimCell(CellConfig(sweep="sim", model=ModelSpec(id=model), task="facts", method=method, method_config=config,
                           budget=budget, seed=seed, eval=evaluation))  # fmt: skip
        for model in MODELS for method, config in METHODS.items() for budget in BUDGETS for seed in SEEDS
    ]


class World:
    """The executor of the simulated world: each cell answered from its law, stored as a real Parquet row."""

    def __init__(self, store: ResultsStore, *, interrupt_at_call: int | None = None) -> None:
        self.store, self.interrupt_at_call, self.calls, self.ran = store, interrupt_at_call, 0, []

    def noise(self, cell: SimCell) -> float:
        """The cell's log-normal noise: the same cell always gets the same answer, drawn from its slug, not its id,
        which a method's version moves (the checks on this world are calibrated to these draws)."""
        return float(np.random.default_rng(zlib.crc32(cell.config.slug.encode())).normal(0, NOISE))

    def __call__(self, cells: list[SimCell], planned_at: float = 0.0) -> None:  # one driver: nothing to skip
        self.calls += 1
        for i, cell in enumerate(cells):
            if self.calls == self.interrupt_at_call and i == 2:
                raise KeyboardInterrupt  # the driver is killed mid-batch: two cells stored, the rest not
            c = cell.config
            loss = (1 - truth(c.method, c.model.id).score(c.budget)) * math.exp(self.noise(cell))
            n = MODELS[c.model.id]
            self.store_row(cell, status="ok", family="sim", params_total=int(n), params_nonembed=int(0.9 * n), score=1 - loss,
                           post_train_flops=work_units(c) * n * TOKENS_PER_EXAMPLE)  # fmt: skip

    def store_row(self, cell: SimCell, **columns: object) -> None:
        """Store the cell's row: its identity from its config, `columns` beside it."""
        c = cell.config
        self.ran.append(cell.cell_id)
        self.store.write({"schema_version": 1, "sweep": c.sweep, "cell_id": cell.cell_id, "slug": c.slug, "model": c.model.id,
                          "task": c.task, "method": c.method, "budget": c.budget, "seed": c.seed, **columns})  # fmt: skip


class ExactWorld(World):
    """The world with the cells of some models exactly on their laws: a design whose cells happen to line up."""

    def __init__(self, store: ResultsStore, *, exact: set[str]) -> None:
        super().__init__(store)
        self.exact = exact

    def noise(self, cell: SimCell) -> float:
        return 0.0 if cell.config.model.id in self.exact else super().noise(cell)


def crossover_widths(store: ResultsStore, cells: list[SimCell]) -> dict[str, tuple[float, float, float]]:
    """model -> (95% CI width of log10 D*, lo, hi), from 2000 fresh resamples (not the loop's own)."""
    targets = targets_from(fit_budget_curves(cells, stored_rows(store, cells), 2000, seed=12345), 1.0, None)
    return {t.curves[0][2]: (t.width, *t.interval) for t in targets}


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    cells = grid()
    store = ResultsStore(str(tmp_path_factory.mktemp("full")))
    World(store)(cells)
    return store, crossover_widths(store, cells), float(stored_rows(store, cells)["post_train_flops"].sum())


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory, full_grid):
    """The adaptive run, killed mid-batch in its third round and resumed by running it again.

    Its goal is 1.1x the full grid's widest log10 D* interval. Exactly that width sits on a knife
    edge: a curve's interval from all of its grid cells lands on either side of it by Monte Carlo
    noise alone, and over 12 noise draws the loop then ran out of cells in 2.
    """
    _, full_widths, full_flops = full_grid
    cells = grid()
    store = ResultsStore(str(tmp_path_factory.mktemp("adaptive")))
    goal = GOAL_OVER_FULL_GRID * max(w for w, _, _ in full_widths.values())
    settings = Settings(budget_flops=full_flops, target_width=goal, batch_size=12, bootstrap=400)  # fewer rounds, faster fits
    world = World(store, interrupt_at_call=3)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_adaptive(cells, store, world, settings, MODELS, echo=lines.append)
    outcome = run_adaptive(cells, store, world, settings, MODELS, echo=lines.append)
    return store, cells, world, outcome, lines, crossover_widths(store, cells)


def test_adaptive_comes_within_a_tenth_of_the_full_grids_interval_on_at_most_half_the_compute(full_grid, adaptive):
    _, full_widths, full_flops = full_grid
    store, cells, _, outcome, _, reached = adaptive
    assert outcome.stop_reason == "every target interval is narrower than its goal"
    spent = float(stored_rows(store, cells)["post_train_flops"].sum())
    assert spent <= 0.5 * full_flops, f"adaptive used {spent / full_flops:.0%} of the full grid's compute"
    # The loop confirmed its stop on 4000 resamples; recompute the widths from 2000 fresh ones, whose
    # 95% interval widths carry a few % Monte Carlo error: allow that.
    widest = max(w for w, _, _ in reached.values())
    assert widest <= 1.05 * GOAL_OVER_FULL_GRID * max(w for w, _, _ in full_widths.values()), (reached, full_widths)
    assert len(stored_rows(store, cells)) < len(cells)


def test_adaptive_intervals_cover_the_true_crossover(adaptive):
    *_, reached = adaptive
    for model, (_, lo, hi) in reached.items():
        assert lo <= true_log10_dstar(model) <= hi, (model, lo, hi, true_log10_dstar(model))


def test_every_stored_cell_was_chosen_once_with_a_reason(adaptive):
    store, cells, world, *_ = adaptive
    log = DecisionLog(store).read()
    choices = [r for r in log if r["event"] == "choice"]
    stored = set(stored_rows(store, cells)["cell_id"])
    chosen = {r["cell_id"] for r in choices}
    assert stored <= chosen
    assert all(r["reason"] and r["slug"] and r["expected_flops"] > 0 for r in choices)
    assert {r["phase"] for r in choices} == {"design", "acquisition"}
    assert all(r["reason"].startswith("expected to narrow log10 D*") for r in choices if r["phase"] == "acquisition")
    rounds = [r for r in log if r["event"] == "round"]
    assert rounds and all(len(r["targets"]) == len(MODELS) for r in rounds)
    events = [r["event"] for r in log]
    assert events[-1] == "stop" and all(after == "resume" for before, after in zip(events, events[1:]) if before == "stop")


def test_resuming_after_a_kill_runs_no_cell_twice(adaptive):
    store, cells, world, outcome, lines, _ = adaptive
    log = DecisionLog(store).read()
    assert len(world.ran) == len(set(world.ran)), "a cell ran twice"
    assert set(world.ran) == set(stored_rows(store, cells)["cell_id"])
    resumed = [r for r in log if r["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["round"] == 3  # rounds 0-2 happened before the kill
    assert any(line.startswith("adaptive: resuming at round 3") for line in lines)
    # a rerun after the stop changes nothing: the same decision from the same rows
    before = len(world.ran)
    settings = Settings(budget_flops=1e30, target_width=outcome.targets[0].goal, batch_size=12, bootstrap=400)
    again = run_adaptive(cells, store, world, settings, MODELS, echo=lambda _: None)
    assert len(world.ran) == before and again.stop_reason == outcome.stop_reason


def test_the_report_lists_every_choice_its_stored_outcome_and_why_the_run_stopped(adaptive):
    store, cells, *_ = adaptive
    report = write_report(store.root, bootstrap=20).report_page
    text = (report.parent / "report.md").read_text()
    log = DecisionLog(store).read()
    records, stop = [r for r in log if r["event"] == "choice"], [r for r in log if r["event"] == "stop"][-1]
    last = {r["cell_id"]: i for i, r in enumerate(records)}
    choices = [r for i, r in enumerate(records) if last[r["cell_id"]] == i]  # the killed round's unstored cells were chosen again
    section = text.split("## Adaptive sweep")[1].split("\n## ")[0]
    assert f"{len(choices)} cells chosen" in section and stop["reason"] in section
    table = [line for line in section.splitlines() if line.startswith("| ") and "| round |" not in line and "| target |" not in line]
    stored = stored_rows(store, cells).set_index("cell_id")
    choice_rows = [line for line in table if " | design | " in line or " | acquisition | " in line]
    assert len(choice_rows) == len(choices)  # one line per cell, at its last choice, in the log's order
    for choice, line in zip(choices, choice_rows):
        assert choice["slug"] in line and choice["reason"] in line
        expected = f"ok, score {stored.loc[choice['cell_id'], 'score']:.3g}" if choice["cell_id"] in stored.index else "not stored"
        assert expected in line
    final = {t["target"]: t for t in stop["targets"]}
    target_rows = [line for line in table if line not in choice_rows]
    assert len(target_rows) == len(final) and all(f"{final[name]['width']:.3g}" in line for name in final for line in target_rows if f"| {name} |" in line)
    assert (report.parent / "adaptive.png").stat().st_size > 10_000


def test_the_report_counts_a_cell_chosen_again_on_resume_once(tmp_path):
    """A round is logged before its cells run: killed after storing one of three, it was chosen again on resume
    (the other two), and the report said "7 cells chosen ..., 7 of them stored" over 5 cells, listing 2 twice."""
    cells = [c for c in grid() if c.config.model.id == "sim-s" and c.config.seed == 0][:5]
    store = ResultsStore(str(tmp_path))
    World(store)(cells)
    a, b, c, d, e = cells

    def choice(round_: int, phase: str, cell: SimCell) -> dict:
        return {"event": "choice", "round": round_, "phase": phase, "cell_id": cell.cell_id, "slug": cell.config.slug,
                "expected_flops": 1e9, "reason": f"round {round_} wants it"}  # fmt: skip

    DecisionLog(store).append([choice(0, "design", a), choice(0, "design", b), *(choice(1, "acquisition", x) for x in (c, d, e)),
                               {"event": "resume", "round": 2}, choice(2, "acquisition", d), choice(2, "acquisition", e),
                               {"event": "stop", "round": 3, "reason": "every cell of the grid is stored", "cells_stored": 5,
                                "flops_spent": 5e9, "targets": []}])  # fmt: skip
    text = (write_report(store.root, bootstrap=20).report_page.parent / "report.md").read_text()
    section = text.split("## Adaptive sweep")[1].split("\n## ")[0]
    assert "5 cells chosen (3 acquisition, 2 design), 5 of them stored. " in section
    assert "2 choices of an interrupted round made again on resume are counted once." in section
    rows = [line for line in section.splitlines() if " | design | " in line or " | acquisition | " in line]
    assert [(line.split(" | ")[0], line.split(" | ")[2]) for line in rows] == [
        ("| 0", a.config.slug), ("| 0", b.config.slug), ("| 1", c.config.slug), ("| 2", d.config.slug), ("| 2", e.config.slug)]


def test_a_grid_run_reports_that_no_cell_was_chosen(full_grid):
    store, *_ = full_grid
    text = (write_report(store.root, bootstrap=20).report_page.parent / "report.md").read_text()
    assert "No adaptive.jsonl here: the cells were run as a grid" in text.split("## Adaptive sweep")[1]


def test_design_covers_the_range_ends_and_staggers_the_interior():
    curves = curves_of(grid())
    interior_taken = set()
    for (task, method, model), cells in curves.items():
        first = design_order(cells, (list(MODELS).index(model) + 0.5) / len(MODELS))[:DESIGN_POINTS]
        budgets = {c.config.budget for c in first}
        assert len(budgets) == DESIGN_POINTS and {BUDGETS[0], BUDGETS[-1]} <= budgets
        assert {c.config.seed for c in first} == {0}
        interior_taken |= budgets - {BUDGETS[0], BUDGETS[-1]}
    assert interior_taken == set(BUDGETS[1:-1])  # three models × four staggered picks cover all nine


def test_the_design_buys_no_cell_of_a_curve_the_flops_left_cannot_bring_to_enough_budgets(tmp_path):
    """The FLOPs left pay for LoRA at budgets 4 and 8 only: the fitter needs MIN_BUDGETS distinct budgets, so every seed
    at those two was bought for a curve that could never be fitted (helper-134 #4). The steering curve, affordable
    throughout, keeps its design."""
    cells = [c for c in grid() if c.config.model.id == "sim-s"]
    cost = CostModel.calibrate(cells, stored_rows(ResultsStore(str(tmp_path)), cells), MODELS)
    lora_at_8 = next(c for c in cells if (c.config.method, c.config.budget) == ("lora", 8))
    flops_left = cost.post_train(lora_at_8.config) * 1.01
    methods = [choice.cell.config.method for choice in design_choices(cells, {}, cost, flops_left)]
    assert "lora" not in methods and methods.count("steer_mean") >= DESIGN_POINTS, methods
    assert "lora" in [choice.cell.config.method for choice in design_choices(cells, {}, cost)]


def test_a_grid_of_three_budgets_is_refused_before_anything_runs():
    """The budget law has 3 parameters and the fitter needs 4 distinct budgets: 3 budgets × 2 seeds passed the check
    (6 cells over 3 budgets), and the loop then fitted nothing and stopped with "no target"."""
    with pytest.raises(ConfigError, match="needs at least 6 cells over 4 distinct budgets > 0; not so for: lora, steer_mean"):
        check_grid([c for c in grid() if c.config.budget in BUDGETS[:3] and c.config.seed < 2])


def test_the_design_asks_for_the_budget_a_failed_cell_left_missing(tmp_path):
    """Every curve has 6 ok cells over 3 budgets and its seed-0 cell at a 4th failed: the design counted the curve
    as done, and the fitter then refused it, so it dropped out of the sweep. It asks for the 4th budget's other seed."""
    cells = [c for c in grid() if c.config.budget in BUDGETS[:4] and c.config.seed < 2]
    status = {c.cell_id: "ok" if c.config.budget < BUDGETS[3] else "failed" for c in cells if c.config.budget < BUDGETS[3] or c.config.seed == 0}
    cost = CostModel.calibrate(cells, stored_rows(ResultsStore(str(tmp_path)), cells), MODELS)
    chosen = design_choices(cells, status, cost)
    assert sorted((c.cell.config.budget, c.cell.config.seed) for c in chosen) == [(BUDGETS[3], 1)] * len(curves_of(cells))


def test_a_design_reason_counts_the_stored_cells_apart_from_those_chosen_with_it(tmp_path):
    """Round 0, nothing run: the log said "design: … has 1 ok cells over 1 budgets", then "2 ok", of cells only queued
    in the same batch (helper-129)."""
    cells = grid()
    cost = CostModel.calibrate(cells, stored_rows(ResultsStore(str(tmp_path)), cells), MODELS)
    key = next(iter(curves_of(cells)))
    reasons = [c.reason for c in design_choices(cells, {}, cost) if curve_key(c.cell) == key]
    assert reasons[0].startswith(f"design: {label(key)} has 0 ok cells over 0 budgets; its curve needs"), reasons[0]
    assert reasons[2].startswith(f"design: {label(key)} has 0 ok cells over 0 budgets (+2 chosen before this one); "), reasons[2]


class BrokenCurveWorld(World):
    """The simulated world where every cell of one curve fails (a config that breaks, a model out of memory)."""

    def __init__(self, store: ResultsStore, broken: tuple[str, str]) -> None:
        super().__init__(store)
        self.broken = broken

    def fails(self, cell: SimCell) -> bool:
        return (cell.config.method, cell.config.model.id) == self.broken

    def __call__(self, cells: list[SimCell], planned_at: float = 0.0) -> None:
        failing = [c for c in cells if self.fails(c)]
        super().__call__([c for c in cells if c not in failing], planned_at)
        for cell in failing:
            self.store_row(cell, status="failed", error="OutOfMemoryError: CUDA out of memory")


def test_a_curve_whose_cells_all_fail_is_given_up_and_the_other_curves_are_fitted(tmp_path):
    """Every sim-l LoRA cell fails: the design walked that curve's whole sub-grid before anything else was
    fitted, and a 60-cell budget ended with "the design is incomplete, so nothing could be fitted" though
    sim-s and sim-m had their designs. It now gives that curve up after GIVE_UP_FAILURES failed cells (curves
    take turns in the design), fits the others, and says which curve it left unfitted."""
    cells, store, lines = grid(), ResultsStore(str(tmp_path)), []
    world = BrokenCurveWorld(store, ("lora", "sim-l"))
    outcome = run_adaptive(cells, store, world, Settings(max_cells=60, target_width=0.05, batch_size=6, bootstrap=200), MODELS, echo=lines.append)
    broken = [c for c in cells if (c.config.method, c.config.model.id) == ("lora", "sim-l")]
    assert sum(c.cell_id in world.ran for c in broken) == GIVE_UP_FAILURES
    assert sorted(t.name for t in outcome.targets) == ["facts/sim-m steer_mean->lora", "facts/sim-s steer_mean->lora"]
    assert "given up, left unfitted: facts/lora/sim-l (6 cells failed)" in outcome.stop_reason, outcome.stop_reason


class LargeBudgetsFailWorld(BrokenCurveWorld):
    """One curve's cells fail from a budget on (a fine-tune past `cell_timeout_s` at 64 examples and more)."""

    def fails(self, cell: SimCell) -> bool:
        return super().fails(cell) and cell.config.budget >= 64


def test_a_curve_given_up_with_a_few_ok_cells_is_not_fitted_nor_narrowed(tmp_path):
    """sim-s's LoRA fails at every budget from 64: 6 failed cells beside 4 ok ones give the curve up, and the stop
    said "given up, left unfitted" while the loop fitted it from those 4 cells, made its D* a target and chose more
    of its cells to narrow it (helper-134)."""
    cells = [c for c in grid() if c.config.model.id == "sim-s"]
    store = ResultsStore(str(tmp_path))
    world = LargeBudgetsFailWorld(store, ("lora", "sim-s"))
    outcome = run_adaptive(cells, store, world, Settings(max_cells=24, target_width=0.05, bootstrap=200), MODELS, echo=lambda _: None)
    assert outcome.targets == []
    assert "given up, left unfitted: facts/lora/sim-s (6 cells failed)" in outcome.stop_reason, outcome.stop_reason
    lora = [c for c in cells if c.config.method == "lora" and c.cell_id in world.ran]
    assert len(lora) == 4 + GIVE_UP_FAILURES, sorted(c.config.slug for c in lora)  # the design's (4 ok, 6 failed), none after


def test_a_model_without_a_size_runs_one_cell_before_its_others_are_priced(tmp_path):
    """No size prior (a hub config the driver cannot fetch): every cell was priced at N = 1, about a millionth of its
    cost, and the first design batch spent 13× a --budget-flops of 2 % of the grid (helper-134). One cell per such
    model runs first; its row's size prices the rest, and the run keeps within the budget."""

    class Batches(World):
        def __init__(self, store: ResultsStore) -> None:
            super().__init__(store)
            self.batches: list[list[SimCell]] = []

        def __call__(self, cells: list[SimCell], planned_at: float = 0.0) -> None:
            self.batches.append(list(cells))
            super().__call__(cells, planned_at)

    cells = grid()
    full = sum(work_units(c.config) * MODELS[c.config.model.id] * TOKENS_PER_EXAMPLE for c in cells)
    store, lines = ResultsStore(str(tmp_path)), []
    world = Batches(store)
    run_adaptive(cells, store, world, Settings(budget_flops=0.02 * full, target_width=0.05, bootstrap=100), {}, echo=lines.append)
    first = world.batches[0]
    assert sorted(c.config.model.id for c in first) == sorted(MODELS), [c.config.slug for c in first]
    assert "  no size known for sim-l, sim-m, sim-s: one cell of each runs first, and its row prices the rest" in lines
    rows = stored_rows(store, cells)
    assert CostModel.calibrate(cells, rows, {}).spent(cells, rows) <= 0.02 * full


# ~45 s each on two cores (its bootstraps' refits): the exponent goal runs with the slow tests, in CI too
@pytest.mark.parametrize("goal", ["crossover", pytest.param("exponent", marks=pytest.mark.slow)])
def test_a_pair_whose_curve_cannot_be_fitted_is_named_not_dropped(tmp_path, goal):
    """4 budgets x 2 seeds, both sim-l LoRA cells at the top budget out of memory: that curve has 6 ok cells over 3
    budgets, too few budgets to fit and too few failures to give up. The run said "every target interval is narrower
    than its goal", naming sim-s and sim-m, and sim-l's D* (or, aiming at exponents, its β) was nowhere."""

    class TopBudgetBroken(BrokenCurveWorld):
        def fails(self, cell: SimCell) -> bool:
            return super().fails(cell) and cell.config.budget == BUDGETS[6]

    cells = [c for c in grid() if c.config.budget in BUDGETS[3:7] and c.config.seed < 2]
    store = ResultsStore(str(tmp_path))
    widths = {"target_width": 50.0} if goal == "crossover" else {"target_width": None, "target_exponent_width": 50.0}
    outcome = run_adaptive(cells, store, TopBudgetBroken(store, ("lora", "sim-l")), Settings(max_cells=len(cells), batch_size=8, bootstrap=200,
                           **widths), MODELS, echo=lambda line: None)  # fmt: skip
    if goal == "crossover":
        assert sorted(t.name for t in outcome.targets) == ["facts/sim-m steer_mean->lora", "facts/sim-s steer_mean->lora"]
        assert "; no D* for facts/steer_mean/sim-l × lora: facts/lora/sim-l not fitted" in outcome.stop_reason, outcome.stop_reason
    else:
        assert "facts/lora/sim-l" not in {t.name for t in outcome.targets}
        assert "; no exponent for facts/lora/sim-l: not fitted" in outcome.stop_reason, outcome.stop_reason


class ClaimRespectingWorld(World):
    """The world run as `run_cells` runs a batch: a cell another live driver holds a claim on is skipped."""

    def __call__(self, cells: list[SimCell], planned_at: float = 0.0) -> None:
        held = Claims(self.store).held_by_live_drivers()
        super().__call__([c for c in cells if c.cell_id not in held], planned_at)


@pytest.mark.slow  # ~60 s on two cores, in its rounds' bootstrap refits
def test_a_run_resumed_while_a_dead_drivers_claims_live_waits_for_them(tmp_path, monkeypatch):
    """A driver on another host died holding claims on every cell, and the run was resumed here at once: it chose those
    cells (choices are deterministic), ran none, and stopped with "no progress". It now waits until the claims lapse
    (no heartbeat for the TTL; aged here by a thread a second in) and runs the cells."""
    monkeypatch.setattr(adaptive_loop, "CLAIM_POLL_SECONDS", 0.05)
    cells = [c for c in grid() if c.config.budget in BUDGETS[3:7] and c.config.seed < 2]
    store = ResultsStore(str(tmp_path))
    (tmp_path / "claims").mkdir()
    dead = {"host": "another-host", "pidns": None, "pid": 1, "started": None, "run": "deadbeef", "claimed_at": time.time()}
    claims = [tmp_path / "claims" / f"{cell.cell_id}.json" for cell in cells]
    for claim in claims:
        claim.write_text(json.dumps(dead))

    def lapse() -> None:
        time.sleep(1.0)
        for claim in claims:
            os.utime(claim, (time.time() - 2 * Claims.ttl_seconds,) * 2)

    threading.Thread(target=lapse, daemon=True).start()
    lines: list[str] = []
    outcome = run_adaptive(cells, store, ClaimRespectingWorld(store), Settings(max_cells=len(cells), target_width=50.0, batch_size=8,
                           bootstrap=200), MODELS, echo=lines.append)  # fmt: skip
    assert any(line.startswith("adaptive: waiting for ") and "another driver has claimed" in line for line in lines), lines
    assert outcome.stop_reason == "every target interval is narrower than its goal", outcome.stop_reason
    assert len(outcome.targets) == 3


class WorldWithBase(World):
    """The simulated world with a `base` reference level per model and seed: free to post-train, scored at 0.3."""

    def __call__(self, cells: list[SimCell], planned_at: float = 0.0) -> None:
        super().__call__([c for c in cells if c.config.method != "base"], planned_at)
        for cell in (c for c in cells if c.config.method == "base"):
            self.store_row(cell, status="ok", params_total=MODELS[cell.config.model.id], score=0.3, post_train_flops=0.0)


def test_a_compute_budget_too_small_for_some_curves_designs_narrows_the_other_curves(tmp_path, full_grid):
    """--budget-flops at a fiftieth of the full grid. The design stopped at the first cell it could not pay for (curves
    take turns, the costliest near the front), holding back every cheaper cell after it, and round 0 spent 71 % of the
    budget then stopped with nothing fitted. Now a cell it cannot pay for is passed over for the curve's next budget, a
    curve none of whose cells it can pay for is named, and the others are fitted and narrowed until the FLOPs run out —
    never past them, though the prior prices cells 20 % low until rows are measured (so its first batch spends at most
    half). And base cells (free) are priced at 0: the rates' fixed part priced each like a steering cell, and a cheapest
    cell left that was a base seed made a run that had spent its budget say "no remaining cell is expected to narrow
    an open target"."""
    evaluation = EvalConfig(test_size=100, validation_size=32, neutral_size=16)
    base = [SimCell(CellConfig(sweep="sim", model=ModelSpec(id=model), task="facts", method="base", budget=0, seed=seed, eval=evaluation))
            for model in MODELS for seed in SEEDS]  # fmt: skip
    cells, store = grid() + base, ResultsStore(str(tmp_path))
    budget = 0.02 * full_grid[2]
    outcome = run_adaptive(cells, store, WorldWithBase(store), Settings(budget_flops=budget, target_width=0.02, batch_size=12, bootstrap=200),
                           MODELS, echo=lambda line: None)  # fmt: skip
    assert [t.name for t in outcome.targets] == ["facts/sim-s steer_mean->lora"]
    assert outcome.stop_reason.startswith("compute budget reached"), outcome.stop_reason
    assert outcome.stop_reason.endswith("; the compute budget cannot finish the design of facts/lora/sim-l, facts/lora/sim-m"), outcome.stop_reason
    assert 0.9 * budget < outcome.flops_spent <= budget
    assert CostModel.calibrate(cells, stored_rows(store, cells), MODELS).post_train(base[0].config) == 0.0


def test_a_cell_budget_below_the_design_says_so_before_it_runs(tmp_path):
    """`--max-cells 20` when the design needs more ran its 20 cells and only then said nothing could be fitted."""
    cells, store, lines = grid(), ResultsStore(str(tmp_path)), []
    world = World(store)
    outcome = run_adaptive(cells, store, world, Settings(max_cells=20, target_width=0.05, batch_size=6, bootstrap=200), MODELS, echo=lines.append)
    needed = int(re.search(r"design, (\d+) cells needed", lines[0]).group(1))
    assert needed > 20 and lines[1] == (f"  note: --max-cells 20 leaves room for 20 of them: the curves whose designs it cannot finish will not "
                                        f"be fitted (all of them need {needed} cells)")  # fmt: skip
    every_curve = ", ".join(f"facts/{method}/{model}" for method in ("lora", "steer_mean") for model in ("sim-l", "sim-m", "sim-s"))
    assert outcome.stop_reason == ("cell budget reached (20 of --max-cells 20); no target: no steering × fine-tuning pair of curves over shared "
                                   f"budgets could be fitted; the cell budget cannot finish the design of {every_curve}"), outcome.stop_reason  # fmt: skip


def test_a_cell_budget_that_finishes_some_curves_designs_fits_them(tmp_path):
    """Room for every design cell but one (curves take turns, so sim-l's LoRA curve is the one left short): the run
    stopped with "the design is incomplete, so nothing could be fitted" though five of six curves had their designs
    and two crossovers could be fitted. Now those are fitted and reported, and the short curve is named."""
    cells, store = grid(), ResultsStore(str(tmp_path))
    cells_for_design = 6 * DESIGN_POINTS - 1
    outcome = run_adaptive(cells, store, World(store), Settings(max_cells=cells_for_design, target_width=0.05, batch_size=6, bootstrap=200),
                           MODELS, echo=lambda line: None)  # fmt: skip
    assert sorted(t.name for t in outcome.targets) == ["facts/sim-m steer_mean->lora", "facts/sim-s steer_mean->lora"]
    assert outcome.stop_reason == (f"cell budget reached ({cells_for_design} of --max-cells {cells_for_design}); the cell budget cannot finish "
                                   "the design of facts/lora/sim-l"), outcome.stop_reason  # fmt: skip


def test_a_grid_whose_steering_and_fine_tuning_budgets_do_not_overlap_has_no_crossover_to_narrow(tmp_path):
    """steer_mean at 4..64 and LoRA at 128..4096: the crossover search range was empty, every resample was
    clipped to one budget, and the loop reported a zero-width D* as resolved. Such a grid is refused up front
    (unless an exponent goal gives it something to narrow), and such fits make no crossover target."""
    cells = [c for c in grid() if (c.config.budget <= 64) == (c.config.method == "steer_mean")]
    with pytest.raises(ConfigError, match="overlapping budget ranges; this grid has none"):
        check_grid(cells)
    check_grid(cells, exponent_goal=0.2)
    store = ResultsStore(str(tmp_path))
    World(store)(cells)
    fits = fit_budget_curves(cells, stored_rows(store, cells), 200, seed=1)
    assert len(fits) == 6 and targets_from(fits, 0.3, None) == []


def test_the_stops_confirmation_draws_resamples_of_its_own(tmp_path):
    """The confirmation's 4,000 resamples began with the 1,000 that had just passed (one stream, drawn in order), so
    it re-checked its own evidence; drawn apart, its first resamples are other draws than the round's."""
    cells = [c for c in grid() if c.config.model.id == "sim-s"]
    store = ResultsStore(str(tmp_path))
    World(store)(cells)
    rows = stored_rows(store, cells)
    first, again = fit_budget_curves(cells, rows, 200, seed=1), fit_budget_curves(cells, rows, 400, seed=1)
    confirming = fit_budget_curves(cells, rows, 400, seed=1, confirming=True)
    for key, fit in first.items():
        assert np.allclose(again[key].boot.thetas[:200], fit.boot.thetas, atol=1e-6)  # one stream: the same draws come first
        assert np.isclose(confirming[key].boot.thetas[:200], fit.boot.thetas, atol=1e-6).all(axis=1).mean() < 0.1  # a chance match at most


def test_a_target_is_resolved_only_if_its_design_is_narrow_on_fresh_noise_too(tmp_path):
    """Cells that happen to sit on their curves (sim-s's, exactly) give a D* interval of width ~0, and the loop took
    that as done — a target that dipped under its goal by luck got no more cells and the run stopped on it. The same
    design redrawn with the sweep's pooled noise (sim-m's cells carry sd 0.05) is wider than the goal: still open."""
    from orchestrator.acquisition import PooledNoise, fresh_noise_twins, on_fresh_noise, pooled_noise

    cells = [c for c in grid() if c.config.model.id in ("sim-s", "sim-m") and c.config.seed == 0 and c.config.budget in BUDGETS[::2]]
    store = ResultsStore(str(tmp_path))
    ExactWorld(store, exact={"sim-s"})(cells)
    fits = fit_budget_curves(cells, stored_rows(store, cells), 500, seed=1)
    target = next(t for t in targets_from(fits, 0.2, None) if t.curves[0][2] == "sim-s")
    assert target.width < 1e-6 and target.resolved and target.fresh_width is None  # on its own data
    noise = pooled_noise(fits)
    assert noise.dof == 4 * (6 - 3) and 0.02 < np.sqrt(noise.variance) < NOISE
    (fresh,) = on_fresh_noise([target], fresh_noise_twins(fits, noise, 500, seed=1))
    assert fresh.width == target.width and fresh.fresh_width > 0.2 and not fresh.resolved
    assert f"width {target.width:.3g}, {fresh.fresh_width:.3g} on fresh noise (goal 0.2, open)" in fresh.describe()
    (quiet,) = on_fresh_noise([target], fresh_noise_twins(fits, PooledNoise(1e-8, noise.dof), 500, seed=1))
    assert quiet.fresh_width < 0.01 and quiet.resolved  # the width comes from the noise, not from the fit
    # two curves with the same points are still drawn apart (their crossover would otherwise be a tie in every resample)
    steer, tune = target.curves
    same = {steer: fits[steer], tune: replace(fits[steer], key=tune)}
    twins = fresh_noise_twins(same, noise, 50, seed=1)
    assert not np.allclose(twins[steer].boot.thetas, twins[tune].boot.thetas)
    # a noise level known from few residuals may be larger than it looked: its draws widen the interval
    (known,), (few,) = (on_fresh_noise([target], fresh_noise_twins(fits, PooledNoise(noise.variance, dof), 500, seed=1)) for dof in (10_000, 3))
    assert known.fresh_width < fresh.fresh_width < few.fresh_width and few.fresh_width > 1.3 * known.fresh_width


def test_an_exponent_its_fresh_resamples_lose_is_named_and_no_target(tmp_path, monkeypatch):
    """An exponent identified on the stored resamples but not on fresh noise (β unidentified in > 5 % of them) has no
    width there (inf: open), where dropping it crashed the stop's check. The round names it and leaves it out of its
    targets, as it does an exponent its stored resamples lose: kept open, no cell is known to make it identified and
    it would take the whole budget."""
    import orchestrator.adaptive as adaptive
    from analysis.bootstrap import Bootstrap
    from orchestrator.acquisition import on_fresh_noise, pooled_noise

    cells = grid()
    design = {c.cell_id for group in curves_of(cells).values() for c in design_order(group, 0.5)[:8]}
    store = ResultsStore(str(tmp_path))
    World(store)([c for c in cells if c.cell_id in design])
    fits = fit_budget_curves(cells, stored_rows(store, cells), 200, seed=3)
    settings = Settings(target_width=None, target_exponent_width=10.0, bootstrap=200)
    identified, _, note = adaptive._judged(fits, pooled_noise(fits), 200, settings)
    assert len(identified) == len(fits) and all(t.resolved for t in identified) and note == ""

    class Unidentified(Bootstrap):
        def unidentified_resamples(self) -> dict[str, np.ndarray]:
            return {**super().unidentified_resamples(), "beta": np.arange(len(self.thetas)) % 10 == 0}

    real = adaptive.fresh_noise_twins
    monkeypatch.setattr(adaptive, "fresh_noise_twins", lambda *args, **kwargs: {
        key: replace(twin, boot=Unidentified(twin.boot.fit, twin.boot.thetas, twin.boot.x)) for key, twin in real(*args, **kwargs).items()})  # fmt: skip
    lost = on_fresh_noise(identified, adaptive.fresh_noise_twins(fits, pooled_noise(fits), 200, 0))
    assert all(t.fresh_width == float("inf") and not t.resolved and "inf on fresh noise" in t.describe() for t in lost)
    assert all(t.record()["fresh_width"] == float("inf") for t in lost)  # null in adaptive.jsonl (jsonable)
    targets, _, note = adaptive._judged(fits, pooled_noise(fits), 200, settings)
    assert targets == [] and note.count("is no target: fresh noise around its fit leaves it unidentified") == len(fits)


def test_the_loop_goes_on_past_a_target_narrow_only_on_lucky_cells(tmp_path):
    """sim-s's cells sit exactly on its curves: after the design its D* interval is ~0 wide on its own resamples, and the
    loop gave it no more cells — it stopped once sim-m's target was narrow, with sim-s's design alone (12 cells) behind
    an interval the same design gives ~0.2 wide on the sweep's noise. Now sim-s's target stays open until its design
    is narrow on fresh noise too."""
    cells = [c for c in grid() if c.config.model.id in ("sim-s", "sim-m")]
    store = ResultsStore(str(tmp_path))
    goal = 0.15
    outcome = run_adaptive(cells, store, ExactWorld(store, exact={"sim-s"}), Settings(target_width=goal, batch_size=6, bootstrap=200),
                           MODELS, echo=lambda _: None)  # fmt: skip
    per_model = stored_rows(store, cells).groupby("model").size()
    assert per_model["sim-s"] > 2 * DESIGN_POINTS, per_model.to_dict()
    assert outcome.stop_reason == "every target interval is narrower than its goal"
    assert all(t.fresh_width is not None and t.width <= goal and t.fresh_width <= goal for t in outcome.targets)


def test_a_perfect_score_does_not_set_every_curves_noise(tmp_path):
    """A score of 1 is the loss floor, ~5 from its curve in log-loss: one such cell raised the pooled noise sd from
    ~0.05 to ~0.8 for every curve, and with it every acquisition value. A curve with floored cells gives the pool its
    other cells' residuals, around a curve fitted to them alone."""
    from orchestrator.acquisition import pooled_noise

    cells = [c for c in grid() if c.config.model.id == "sim-s"]
    store = ResultsStore(str(tmp_path))
    World(store)(cells)
    rows = stored_rows(store, cells)
    sd = np.sqrt(pooled_noise(fit_budget_curves(cells, rows, 50, seed=1)).variance)
    for top in (1, 3, 5):  # the LoRA curve's top budgets perfect: its fit is pulled off its other cells too
        perfect = rows.copy()
        perfect.loc[(perfect["method"] == "lora") & perfect["budget"].isin(sorted(set(perfect["budget"]))[-top:]), "score"] = 1.0
        assert np.sqrt(pooled_noise(fit_budget_curves(cells, perfect, 50, seed=1)).variance) < 2 * sd < 0.2, top
    # every curve with a perfect cell: the noise came from a fixed prior (sd 0.1, no degrees of freedom) whatever was
    # stored; it comes from the cells above the floor, around curves fitted to them
    everywhere = rows.copy()
    everywhere.loc[everywhere["budget"] == max(everywhere["budget"]), "score"] = 1.0
    noise = pooled_noise(fit_budget_curves(cells, everywhere, 50, seed=1))
    assert noise.dof == 2 * (30 - 3) and 0.5 * sd < np.sqrt(noise.variance) < 2 * sd, (noise, sd)


def test_an_exponent_target_leaves_out_resamples_where_beta_is_unidentified(tmp_path):
    """A flat curve's B·D^-β term is ~0 in nearly every resample, so β can be anything there: the report gives it
    no interval, while the loop's target counted those resamples and stayed open at [0, 3] for ever."""
    cells = [c for c in grid() if c.config.model.id == "sim-s" and c.config.method == "steer_mean"]
    store, rng = ResultsStore(str(tmp_path)), np.random.default_rng(0)
    for cell in cells:
        c = cell.config
        score = 0.6 + rng.normal(0, 0.01)
        store.write({"schema_version": 1, "sweep": c.sweep, "cell_id": cell.cell_id, "slug": c.slug, "status": "ok", "model": c.model.id,
                     "task": c.task, "method": c.method, "budget": c.budget, "seed": c.seed, "score": score})  # fmt: skip
    (fit,) = fit_budget_curves(cells, stored_rows(store, cells), 1000, seed=1).values()
    assert np.isnan(fit.boot.intervals()["beta"]).all()  # the report: not identified
    assert targets_from({fit.key: fit}, None, 0.2) == []


def test_cost_model_learns_the_part_of_a_cells_cost_that_its_budget_does_not_set(tmp_path):
    """A steering vector's cell spends its validation passes (choosing a layer and scale) at any budget: with one scale
    per curve, fitted to every budget, the loop priced budget-4 cells at a small fraction of their FLOPs and the
    largest at twice theirs. Rows at three budgets of one model fix both parts, for other budgets and other models."""
    cells = [c for c in grid() if c.config.method == "steer_mean"]
    fixed = 5000.0  # FLOPs per parameter, whatever the budget

    def true_flops(cell: SimCell) -> float:
        return (work_units(cell.config) * TOKENS_PER_EXAMPLE + fixed) * MODELS[cell.config.model.id]

    def true_flops_at(model: str, budget: int) -> float:
        return true_flops(next(c for c in cells if (c.config.model.id, c.config.budget) == (model, budget)))
    def priced(model: str, budget: int) -> float:
        probe = next(c for c in cells if (c.config.model.id, c.config.budget) == (model, budget))
        return CostModel.calibrate(cells, stored_rows(store, cells), MODELS).post_train(probe.config)

    def store_row(model: str, budget: int, flops: float | None = None) -> None:
        cell = next(c for c in cells if (c.config.model.id, c.config.budget) == (model, budget))
        c = cell.config
        store.write({"schema_version": 1, "sweep": c.sweep, "cell_id": cell.cell_id, "slug": c.slug, "status": "ok", "model": c.model.id,
                     "params_total": MODELS[c.model.id], "task": c.task, "method": c.method, "budget": c.budget, "seed": c.seed,
                     "score": 0.5, "post_train_flops": true_flops(cell) if flops is None else flops})  # fmt: skip

    store = ResultsStore(str(tmp_path))
    for budget in (4, 64, 1024):
        store_row("sim-s", budget)
    for model, budget in (("sim-s", 8), ("sim-s", 4096), ("sim-l", 4), ("sim-l", 512)):
        assert priced(model, budget) == pytest.approx(true_flops_at(model, budget), rel=1e-6), (model, budget)
    # sim-m's first cell spent nothing (too few examples for a pair to contrast): its curve is priced as its method, not at 0
    store_row("sim-m", 4, flops=0.0)
    assert priced("sim-m", 4096) == pytest.approx(true_flops_at("sim-m", 4096), rel=1e-6)
    # sim-l's first cell, at a budget where the fixed part is most of it: sim-l's one-budget curve borrows the method's
    # shape (alone, its one scale priced sim-l's largest cells at 20 times their FLOPs)
    store_row("sim-l", 4)
    assert priced("sim-l", 4096) == pytest.approx(true_flops_at("sim-l", 4096), rel=1e-6)
    # a cell that spent nothing (no pairs to contrast) is no measure of how cost grows: the fit stands
    store_row("sim-s", 16, flops=0.0)
    assert priced("sim-s", 4096) == pytest.approx(true_flops_at("sim-s", 4096), rel=1e-6)


def test_the_design_takes_the_next_seed_of_a_reference_cell_that_failed(tmp_path):
    """A failed base cell counted as the model's reference level: no other seed was ever chosen, and the report
    lacked that model's base level. Its next seed is chosen instead, until one is ok or every seed has failed."""
    evaluation = EvalConfig(test_size=100, validation_size=32, neutral_size=16)
    base = [SimCell(CellConfig(sweep="sim", model=ModelSpec(id="sim-s"), task="facts", method="base", budget=0, seed=seed, eval=evaluation))
            for seed in SEEDS]  # fmt: skip
    cost = CostModel.calibrate(base, stored_rows(ResultsStore(str(tmp_path)), base), MODELS)

    def chosen(status: dict[str, str]) -> list[int]:
        return [c.cell.config.seed for c in design_choices(base, status, cost)]

    assert chosen({}) == [0]
    assert chosen({base[0].cell_id: "failed"}) == [1]
    assert chosen({base[0].cell_id: "failed", base[1].cell_id: "ok"}) == []
    assert chosen({c.cell_id: "failed" for c in base}) == []


def test_cost_model_learns_the_worlds_cost_from_stored_rows(tmp_path):
    cells = grid()
    store = ResultsStore(str(tmp_path))
    prior = CostModel.calibrate(cells, stored_rows(store, cells), MODELS)
    probe = next(c for c in cells if c.config.method == "lora" and c.config.budget == 1024 and c.config.model.id == "sim-l")
    true_flops = work_units(probe.config) * MODELS["sim-l"] * TOKENS_PER_EXAMPLE
    assert prior.post_train(probe.config) == pytest.approx(true_flops * 32 / 40)  # the prior's 32 tokens per example
    World(store)([c for c in cells if c.config.model.id == "sim-s" and c.config.budget in (4, 64)])
    measured = CostModel.calibrate(cells, stored_rows(store, cells), MODELS)
    assert measured.post_train(probe.config) == pytest.approx(true_flops)  # a model not yet run borrows its method's scale
    steer = next(c for c in cells if c.config.method == "steer_mean" and c.config.budget == 8)
    assert measured.post_train(steer.config) < measured.post_train(probe.config) / 100
    ran = sum(work_units(c.config) * MODELS["sim-s"] * TOKENS_PER_EXAMPLE for c in cells if c.config.model.id == "sim-s" and c.config.budget in (4, 64))
    assert measured.spent(cells, stored_rows(store, cells)) == pytest.approx(ran)
    failed = next(c for c in cells if c.config.model.id == "sim-l" and c.config.budget == 1024)
    store.write({"schema_version": 1, "sweep": failed.config.sweep, "cell_id": failed.cell_id, "slug": failed.config.slug, "status": "failed",
                 "model": "sim-l", "task": failed.config.task, "method": failed.config.method, "budget": 1024, "seed": failed.config.seed,
                 "error": "OutOfMemoryError: at load"})  # fmt: skip
    assert measured.spent(cells, stored_rows(store, cells)) == pytest.approx(ran)  # not charged the whole cell's prior


@pytest.mark.parametrize("budget", [1, 4, 16, 100])
def test_the_cost_prior_counts_the_examples_the_trainer_draws(budget):
    """Below a batch, a step draws the whole budget, not a batch: the prior once made budget 1 cost 16x its work."""
    cell = CellConfig(sweep="sim", model=ModelSpec(id="sim-s"), task="facts", method="lora", method_config=METHODS["lora"],
                      budget=budget, seed=0, eval=EvalConfig(test_size=10))  # fmt: skip
    train = TrainConfig.model_validate(TRAIN)
    drawn = sum(len(take) for take in batch_order(budget, steps_for(budget, train), train.batch_size, seed=0))
    assert work_units(cell) == 6 * drawn


# --- the command line ---------------------------------------------------------------------------


def steerscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget-flops", "1e12"], "--budget-flops only applies with --adaptive"),
        (["--budget-flops", "1e12", "--max-cells", "3"], "--budget-flops, --max-cells only apply with --adaptive"),
        (["--adaptive"], "--adaptive needs a budget to stop at"),
        (["--adaptive", "--budget-flops", "-5"], "argument --budget-flops: must be a finite number > 0, got -5"),
        (["--adaptive", "--budget-flops", "inf"], "argument --budget-flops: must be a finite number > 0, got inf"),  # was a budget
        (["--adaptive", "--max-cells", "0"], "argument --max-cells: must be a finite number > 0, got 0"),
        (["--adaptive", "--max-cells", "three"], "argument --max-cells: expected an integer, got 'three'"),
        (["--adaptive", "--max-cells", "4", "--force"], "does not combine with --force"),
        (["--adaptive", "--max-cells", "4"], "over 4 distinct budgets > 0; not so for: lora"),  # one budget: no curve
    ],
)
def test_bad_adaptive_flags_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    from orchestrator.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": "flags", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"],
                                      "methods": {"lora": {}}, "budgets": [4], "results_dir": str(tmp_path / "r")}))  # fmt: skip
    try:
        code = main(["run", str(config), *flags])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_grid_cells_row_that_cannot_be_read_mid_run_stops_the_run_instead_of_rerunning_it(tmp_path):
    from orchestrator.errors import StoreUnreadableError

    store, cells = ResultsStore(str(tmp_path / "r")), grid()
    World(store)(cells[:3])
    assert len(stored_rows(store, cells)) == 3
    (tmp_path / "r" / "other.parquet").write_bytes(b"not this grid's")  # not a cell file of the grid: no matter
    damaged = tmp_path / "r" / "cells" / f"{cells[1].cell_id}.parquet"
    damaged.write_bytes(b"a read that failed")
    with pytest.raises(StoreUnreadableError, match=cells[1].cell_id):
        stored_rows(store, cells)
    world = World(store)
    with pytest.raises(StoreUnreadableError, match=cells[1].cell_id):
        run_adaptive(cells, store, world, Settings(budget_flops=1e30, batch_size=12, bootstrap=100), MODELS, echo=lambda _: None)
    assert world.ran == [] and damaged.read_bytes() == b"a read that failed"  # nothing rerun, the file left for a look


def test_an_adaptive_grid_refused_leaves_the_store_as_it_was(tmp_path, capsys):
    """The refusal (exit 2) comes before the store is read for the run, which sets unreadable files aside."""
    from orchestrator.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": "flags", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"],
                                      "methods": {"lora": {}}, "budgets": [4], "results_dir": str(tmp_path / "r")}))  # fmt: skip
    broken = tmp_path / "r" / "cells" / "broken.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not parquet")
    assert main(["run", str(config), "--adaptive", "--max-cells", "4"]) == 2
    assert "over 4 distinct budgets > 0" in capsys.readouterr().err
    assert broken.exists() and not (tmp_path / "r" / "quarantine").exists()


@pytest.mark.slow  # real Ray and ten real cells: about 30 s on two cores
def test_cli_adaptive_run_on_the_test_ladder_stores_at_most_k_cells_and_its_log(tmp_path, test_ladder, write_sweep):
    config = write_sweep({
        "sweep": "adaptive-cli", "models": [{"id": test_ladder[0]}], "tasks": ["facts"],
        "methods": {"steer_mean": {"scales": [0.0, 1.0, 4.0]}, "lora": {"rank": 2, "train": {"lr": 3e-2, "checkpoints": 0, "max_steps": 20}}},
        "budgets": [4, 8, 16, 32], "seeds": [0, 1],
        "eval": {"test_size": 30, "validation_size": 8, "neutral_size": 4}, "resources": {"cpus_per_cell": 1},
    })  # fmt: skip
    # a cell budget below the design's 12 cells: the curves take turns, 5 cells each
    flags = ["--adaptive", "--max-cells", "10", "--no-progress", "--no-dashboard"]
    first = steerscale("run", str(config), *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "results" / "adaptive-cli"
    rows = pq.read_table(results / "cells").to_pandas()
    assert len(rows) == 10 and rows.cell_id.is_unique and (rows.status == "ok").all()
    assert rows.method.value_counts().to_dict() == {"steer_mean": 5, "lora": 5}
    log = [json.loads(line) for line in (results / "adaptive.jsonl").read_text().splitlines()]
    choices = [r for r in log if r["event"] == "choice"]
    assert {r["cell_id"] for r in choices} == set(rows.cell_id) and all(r["reason"] for r in choices)
    assert log[-1]["event"] == "stop" and log[-1]["reason"].startswith("cell budget reached (10 of --max-cells 10)")
    assert "adaptive: stopped after round 1" in first.stdout
    # a cell the rounds chose failed (a node lost): --adaptive refused --retry-failed, and the rounds never rerun a stored
    # cell, so it stayed failed for good (helper-144). It runs again first now; the rounds then resume as before.
    lost = results / "cells" / f"{rows.cell_id[0]}.parquet"
    table = pq.read_table(lost)
    pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", pa.array(["failed"])), lost)
    again = steerscale("run", str(config), *flags, "--retry-failed")  # resumes from the store, finds the cell budget spent
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--retry-failed: 1 failed cell of the grid run again before the adaptive rounds" in again.stdout
    assert "resuming at round 2" in again.stdout
    rows = pq.read_table(results / "cells").to_pandas()
    assert len(rows) == 10 and (rows.status == "ok").all()


def test_crossover_samples_count_d_star_as_the_report_does():
    """A resample in which steering overtakes has fine-tuning behind at the end: D* above the range
    (the largest budget), not below it; one in which fine-tuning overtakes gives its crossing."""
    from types import SimpleNamespace

    from orchestrator.acquisition import crossover_samples

    def curve(e: list[float], b: list[float], beta: list[float]) -> SimpleNamespace:
        params = {"E": np.array(e), "B": np.array(b), "beta": np.array(beta)}
        return SimpleNamespace(d=np.array([4.0, 1024.0]), measured=np.array([0.2, 0.2]), boot=SimpleNamespace(params=lambda: params))

    steer = curve([0.1, 0.3], [1.0, 0.2], [0.3, 0.3])  # loss = E + B·D^-beta (the score's 1 − score)
    tune = curve([0.3, 0.05], [0.5, 2.0], [1.0, 1.0])  # resample 0: ahead, then overtaken; 1: behind, then ahead
    samples, share = crossover_samples(steer, tune)
    assert samples[0] == pytest.approx(np.log10(1024.0))
    d_star = 10 ** samples[1]
    assert 4 < d_star < 1024 and 0.05 + 2 / d_star == pytest.approx(0.3 + 0.2 * d_star**-0.3, abs=2e-3)
    assert share == 0.5


def test_a_choices_reason_starts_from_the_width_its_round_recorded(adaptive):
    """A round logs each target's percentile-interval widths; its first acquisition choice quoted a normal
    2·Z·sd width of the same samples instead, so the log read "[1.2, 1.9] width 0.7" then "width ≈0.55→0.5".
    A target is valued on the wider of its two intervals (stored, on fresh noise), and that is the one quoted."""
    store, *_ = adaptive
    checked = 0
    widths: dict[str, dict[str, float]] = {}
    first_in_round = False
    for record in DecisionLog(store).read():
        if record["event"] == "round":
            widths = {f"{t['unit']} {t['target']}": t for t in record["targets"]}
            first_in_round = True
        elif record["event"] == "choice" and record["phase"] == "acquisition" and first_in_round:
            first_in_round = False
            target = record["reason"].removeprefix("expected to narrow ").split(" width")[0]
            fresh = record["reason"].removeprefix(f"expected to narrow {target} width").startswith(" on fresh noise ≈")
            recorded = widths[target]["fresh_width" if fresh else "width"]
            assert recorded == max(widths[target]["width"], widths[target]["fresh_width"])
            assert record["reason"].split("≈")[1].split("→")[0] == f"{recorded:.3g}", (record["reason"], widths[target])
            checked += 1
    assert checked >= 1


def test_crossover_samples_call_curves_within_half_a_question_tied() -> None:
    """Curves 0.005 apart (a fifth of a question out of 40) do not cross for the report, so the loop must not count
    a crossing either; a perfect score among the cells (1.0, floored to 0.999 as a loss) must not shrink the step."""
    from types import SimpleNamespace

    from orchestrator.acquisition import crossover_samples

    measured = np.array([9, 10, 40]) / 40

    def curve(e: float, b: float, beta: float) -> SimpleNamespace:
        params = {"E": np.array([e]), "B": np.array([b]), "beta": np.array([beta])}
        return SimpleNamespace(d=np.array([4.0, 1024.0]), measured=measured, boot=SimpleNamespace(params=lambda: params))

    steer, tune = curve(0.5, 0.0, 1.0), curve(0.495, 0.02, 0.5)  # tune behind by 0.005 at D=4, ahead by 0.004 at 1024
    _, share = crossover_samples(steer, tune)
    assert share == 0.0


def test_resamples_tied_throughout_resolve_as_fine_tuning_never_ahead() -> None:
    """Two curves within a fifth of a question of each other in every resample, fine-tuning a hair ahead in some
    and behind in others: each is a tie, D* at the largest budget (fine-tuning never goes ahead to stay), so the
    target's interval closes. Censored at the end each hair pointed to, they split between 4 and 1024: width 2.4."""
    from types import SimpleNamespace

    from orchestrator.acquisition import crossover_samples

    def curve(e: list[float]) -> SimpleNamespace:
        params = {"E": np.array(e), "B": np.zeros(len(e)), "beta": np.ones(len(e))}
        return SimpleNamespace(d=np.array([4.0, 1024.0]), measured=np.array([9, 10, 12]) / 40, boot=SimpleNamespace(params=lambda: params))

    steer, tune = curve([0.5] * 4), curve([0.498, 0.502, 0.499, 0.501])
    samples, share = crossover_samples(steer, tune)
    assert share == 0.0 and np.allclose(samples, np.log10(1024.0))


def test_two_drivers_appending_to_the_decision_log_keep_each_others_events(tmp_path):
    """Each append reads the log, adds its events and rewrites it: two drivers on one results directory (claims
    split the cells) overwrote each other's choices. The rewrite now happens under a lock file beside the log."""
    from concurrent.futures import ThreadPoolExecutor

    store = ResultsStore(str(tmp_path))

    def driver(name: str) -> None:
        log = DecisionLog(store)
        for i in range(40):
            log.append([{"event": "choice", "round": i, "cell_id": f"{name}-{i}"}])

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(driver, ["a", "b"]))
    ids = [event["cell_id"] for event in DecisionLog(store).read()]
    assert sorted(ids) == sorted(f"{name}-{i}" for name in "ab" for i in range(40))
    assert not (tmp_path / "adaptive.jsonl.lock").exists()


def test_an_exponent_target_partly_unidentified_keeps_its_samples_aligned_with_the_curves_resamples(tmp_path, monkeypatch):
    """Leaving out the resamples where β is unidentified shortened the target's samples, and the acquisition step,
    which sets them beside each curve's per-resample predictions, crashed on the mismatch (4 of 200 lost)."""
    from analysis.bootstrap import Bootstrap
    from orchestrator.acquisition import acquisition_choices, fresh_noise_twins, on_fresh_noise, pooled_noise

    cells = grid()
    design = {c.cell_id for group in curves_of(cells).values() for c in design_order(group, 0.5)[:8]}
    store = ResultsStore(str(tmp_path))
    World(store)([c for c in cells if c.cell_id in design])
    rows = stored_rows(store, cells)
    fits = fit_budget_curves(cells, rows, 200, seed=3)
    lost = np.arange(200) < 4
    unidentified = Bootstrap.unidentified_resamples
    monkeypatch.setattr(Bootstrap, "unidentified_resamples", lambda self: {**unidentified(self), "beta": lost})
    twins = fresh_noise_twins(fits, pooled_noise(fits), 200, seed=3)
    targets = on_fresh_noise(targets_from(fits, None, 1e-6), twins)
    assert targets and all(len(t.samples) == len(t.fresh) == 200 and np.isnan(t.samples).sum() == np.isnan(t.fresh).sum() == 4 for t in targets)
    cost = CostModel.calibrate(cells, rows, MODELS)
    candidates = [c for c in cells if c.cell_id not in design]
    chosen = acquisition_choices(targets, fits, twins, candidates, cost, pooled_noise(fits).variance, size=4, flops_left=float("inf"))
    assert len(chosen) == 4
    with pytest.raises(ValueError, match="on_fresh_noise"):
        acquisition_choices(targets_from(fits, None, 1e-6), fits, twins, candidates, cost, pooled_noise(fits).variance, size=4, flops_left=float("inf"))


def test_a_target_open_on_its_stored_resamples_alone_is_still_narrowed(tmp_path):
    """A target whose stored interval is wider than its goal but whose fresh-noise one is narrow (a cell the pooled
    noise does not explain): valued on the fresh ensemble alone it looked done — its samples barely vary there, so no
    cell removed any of its variance, and the loop stopped "nothing narrows an open target". It is valued on the
    ensemble that keeps it open."""
    from orchestrator.acquisition import acquisition_choices, fresh_noise_twins, on_fresh_noise, pooled_noise

    cells = [c for c in grid() if c.config.model.id == "sim-s"]
    design = {c.cell_id for group in curves_of(cells).values() for c in design_order(group, 0.5)[:6]}
    store = ResultsStore(str(tmp_path))
    World(store)([c for c in cells if c.cell_id in design])
    rows = stored_rows(store, cells)
    fits = fit_budget_curves(cells, rows, 200, seed=3)
    twins = fresh_noise_twins(fits, pooled_noise(fits), 200, seed=3)
    (target,) = on_fresh_noise(targets_from(fits, 0.01, None), twins)
    steady = replace(target, fresh=np.full(200, float(np.median(target.fresh))))  # narrow on fresh noise, open on its own data
    assert steady.fresh_width == 0 and steady.width > steady.goal and not steady.resolved
    cost = CostModel.calibrate(cells, rows, MODELS)
    candidates = [c for c in cells if c.cell_id not in design]
    chosen = acquisition_choices([steady], fits, twins, candidates, cost, pooled_noise(fits).variance, size=3, flops_left=float("inf"))
    assert len(chosen) == 3 and all(" width ≈" in c.reason for c in chosen)  # its stored width, not "on fresh noise"


def test_a_fitted_curve_whose_later_cells_fail_is_not_called_given_up():
    """Six failed cells on a curve that already has its design's ok cells (a larger budget out of memory, say):
    the stop reason called it "left unfitted" beside its own crossover target."""
    from orchestrator.acquisition import given_up

    cells = [c for c in grid() if (c.config.method, c.config.model.id) == ("lora", "sim-l")]
    ok = {c.cell_id: "ok" for c in cells[:DESIGN_POINTS]}
    failed = {c.cell_id: "failed" for c in cells[-GIVE_UP_FAILURES:]}
    assert given_up(cells, {**ok, **failed}) == {}
    assert given_up(cells, failed) == {("facts", "lora", "sim-l"): GIVE_UP_FAILURES}


def test_a_crossover_target_says_its_interval_in_examples_too():
    """`log10 D* …: [0.602, 2.11]` left the user to work out 10^0.602 = 4 and 10^2.11 = 128 examples."""
    from orchestrator.acquisition import Target

    target = Target("facts/sim-s steer_mean->lora", "log10 D*", (), np.log10(np.array([4.0, 16.0, 128.0] * 40)), goal=0.3)
    assert "[0.602, 2.11] (D* 4 to 128 examples) width 1.51 (goal 0.3, open)" in target.describe()
    assert "examples" not in Target("x", "beta", (), np.array([0.2, 0.4] * 40), goal=0.3).describe()


def test_adaptive_retry_failed_runs_its_batch_as_planned_when_the_store_was_read(tmp_path, test_ladder, monkeypatch):
    """--retry-failed's batch was planned at its own start, after the data and models were prepared (minutes of a
    download): a failed cell another driver stored ok in between was not found by the claim check and ran again."""
    from orchestrator import cli, driver
    from orchestrator.driver import SweepOutcome, crashed_row
    from orchestrator.grid import expand
    from orchestrator.spec import load_spec

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "sweep": "retry", "models": [{"id": test_ladder[0]}], "tasks": ["facts"], "methods": {"steer_mean": {}},
        "budgets": [4, 8, 16, 32], "seeds": [0, 1], "eval": {"test_size": 8, "validation_size": 8, "neutral_size": 2},
        "results_dir": str(tmp_path / "r"),
    }))  # fmt: skip
    cell = expand(load_spec(str(config)))[0]
    store = ResultsStore(str(tmp_path / "r"))
    store.write(crashed_row(cell.config, RuntimeError("a node was lost"), 1, datetime.now(timezone.utc)))
    read_at: list[float] = []
    real_scan, real_prepare = ResultsStore.scan, cli._prepare_data
    monkeypatch.setattr(ResultsStore, "scan", lambda self, **options: read_at.append(time.time()) or real_scan(self, **options))
    monkeypatch.setattr(cli, "_prepare_data", lambda cells: time.sleep(0.05) or real_prepare(cells))  # a download's minutes
    batches: list[tuple[list[str], float]] = []

    def run_cells(batch, store, resources, *, address, progress, dashboard, planned_at):
        batches.append(([c.cell_id for c in batch], planned_at))
        return SweepOutcome()

    monkeypatch.setattr(driver, "run_cells", run_cells)
    assert cli.main(["run", str(config), "--adaptive", "--max-cells", "1", "--target-exponent-width", "0.5", "--retry-failed", "--no-progress"]) == 0
    (retried, planned_at), *_ = batches
    assert retried == [cell.cell_id]
    assert planned_at <= read_at[0]  # before the store was read, as a plain run's
