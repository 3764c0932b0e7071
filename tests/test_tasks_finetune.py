"""The default ladder leaves room that learning fills: at the quickstart's largest budget, fine-tuning
(LoRA, the demo's own cells) beats the untouched base model on every task and every rung.

Slow: it builds the default ladder when the cache lacks it (minutes) and fine-tunes 15 cells.
`pytest -s` prints the table that workers/world/NOTES.md records.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.grid import expand
from orchestrator.spec import load_spec
from workers.run_cell import run_cell

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_finetuning_beats_base_at_the_largest_budget_on_every_task_and_rung() -> None:
    spec = load_spec(QUICKSTART)
    largest = max(spec.budgets_for("lora"))
    cells = [
        c.config
        for c in expand(spec)
        if c.config.method == "lora" and c.config.budget == largest and c.config.seed == spec.seeds[0]
    ]
    assert len(cells) == len(spec.models) * len(spec.tasks)
    rows = [run_cell(cell) for cell in cells]
    for row in rows:
        print(f"{row['model']:>12} {row['task']:>10}  base {row.get('score_base', float('nan')):.2f}  lora@{largest} {row.get('score', float('nan')):.2f}")
    assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows if row["status"] != "ok"]
    losing = [(row["model"], row["task"], row["score_base"], row["score"]) for row in rows if not row["score"] > row["score_base"]]
    assert not losing, losing
