"""The default ladder leaves room that learning fills: at the quickstart's largest budget, fine-tuning
(LoRA, the demo's own cell, seed 0) beats the untouched base model on every task — on the ladder as a
whole (the mean over its rungs) and on its largest rung.

Not on every rung: measured on world v4 under task data version 3 (workers/world/NOTES.md; the EPYC
build, 2026-12-06), 10 of the 15 rung × task cells gain 0.05-0.29 (mean gain arith .06, facts .08,
gridworld .12), while xs and m arith lose .06 and .03 (neither composes two steps, 45 % of arith's
test), s arith stays at .11 and s facts and gridworld gain .01-.02 at 100 test questions — inside the
noise of one seed. The per-cell table is printed (`pytest -s`).

Slow: it builds the default ladder when the cache lacks it (minutes) and fine-tunes 15 cells
(about 10 minutes on a loaded 2-core box).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from workers.models import ladder
from workers.run_cell import run_cell

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
TASKS = ("facts", "arith", "gridworld")


@pytest.fixture(scope="module")
def largest_budget_rows(default_ladder: list[str]) -> dict[tuple[str, str], dict]:
    """(size, task) -> the row of the quickstart's LoRA cell at its largest budget, seed 0."""
    spec = load_spec(QUICKSTART)
    largest = max(spec.budgets_for("lora"))
    cells = {
        (c.config.model.id.removeprefix("ladder:"), c.config.task): c.config
        for c in expand(spec)
        if c.config.method == "lora" and c.config.budget == largest and c.config.seed == spec.seeds[0]
    }
    rows = {}
    for size in default_ladder:
        for task in TASKS:
            rows[(size, task)] = row = run_cell(cells[(size, task)])
            assert row["status"] == "ok", row["error"]
            print(f"{size:>3} {task:>10}  base {row['score_base']:.2f}  lora@{largest} {row['score']:.2f}")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_finetuning_beats_base_at_the_largest_budget_on_every_task(largest_budget_rows, task: str) -> None:
    rows = [row for (_, t), row in largest_budget_rows.items() if t == task]
    gains = [row["score"] - row["score_base"] for row in rows]
    assert sum(gains) / len(gains) > 0.02, f"{task}: mean gain over the ladder {sum(gains) / len(gains):+.3f} ({gains})"
    top = largest_budget_rows[(ladder.sizes("default")[-1], task)]
    assert top["score"] > top["score_base"], f"{task} on the largest rung: {top['score_base']:.2f} -> {top['score']:.2f}"
