"""What a cell costs, in post-training FLOPs, before it runs: a prior refined by the rows already stored.

The prior follows the FLOP formulas the methods record (workers/methods/protocol.py), in units of
N · examples · tokens-per-example:

    a method with a `train` section (LoRA, full FT, trained steering vectors)
        ≈ 6 · N · steps · min(batch_size, budget) · T · rates      steps: the trainer's own rule (`workers.training.steps_for`),
                                                            rates: the learning rates it tries (`train.lr_search`)
    a method without one (mean-difference steering, few-shot prompting)
        ≈ 2 · N · budget · T                   one forward pass over the budget's examples

with N the model's parameter count (from stored rows, else the prior the caller passes: the CLI
counts it on the meta device with `workers.run_cell.estimated_params`) and T = 32 tokens per example until something is measured.
Once rows exist, the prior's shape is kept and its scale measured, with a fixed part beside it:

    post_train_flops ≈ N · (a · units + c)

where c is what a cell spends whatever its budget — the validation passes that choose a steering
vector's layer and scale (18 of them by default: at budget 4 they are 94 % of the cell's FLOPs), a
fine-tune's checkpoint validations, few-shot prompting's choice of shots. A and c are fitted to the
stored rows (least squares on relative errors, both ≥ 0), taken from the most specific group that has
rows — the same (task, method, model) curve, else (task, method), else the method, else every row. A
group whose rows span one budget (a curve's first cell) takes the shape — c over a — of the nearest
broader group of its method and fits only its scale (without one, a scale alone, c = 0), so a curve's
cost is right after its first cell where its method has been measured at two budgets, and a new model
borrows its method's rate. (A scale alone, fitted to budgets 4 to 4,096, priced a mean-difference
vector's small-budget cells at 0.06 of their FLOPs and its largest at 2.2 times.)

The budget of an adaptive sweep counts post-training FLOPs only (measured where stored, as the
compute frontier does). Ranking cells by value per FLOP also adds the forward cost of the cell's
evaluation, so methods that post-train for free (`base`, `prompt`) do not look infinitely cheap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, TypeVar

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from workers.cell import CellConfig
from workers.methods import resolve_config, steps_for, training_configs

TOKENS_PER_EXAMPLE = 32.0  # the prior's T; measured rows replace it


class Planned(Protocol):
    """What the adaptive loop needs of a planned cell (`orchestrator.grid.PlannedCell` is one)."""

    config: CellConfig

    @property
    def cell_id(self) -> str: ...


P = TypeVar("P", bound=Planned)


def work_units(cell: CellConfig) -> float:
    """Prior post-training work in examples × passes (multiply by N and T for FLOPs)."""
    configs = [train for _, train in training_configs(resolve_config(cell.method, cell.method_config))]
    if configs:
        # a step draws min(batch_size, budget) examples: a budget smaller than a batch is one whole pass per step
        return float(sum(6 * len(t.learning_rates) * steps_for(cell.budget, t) * min(t.batch_size, cell.budget) for t in configs))
    return 2.0 * cell.budget


def eval_units(cell: CellConfig) -> float:
    """Forward work of the cell's evaluation: test, shared validation, neutral and off-task examples."""
    e = cell.eval
    return 2.0 * (e.test_size + e.validation_size + e.neutral_size + e.offtask_size * len(cell.offtask))


def longest_first(cells: Sequence[P]) -> list[P]:
    """The cells, most prior work first (post-training plus evaluation passes), ties in plan order.

    The driver hands them out in this order: with the long cells first, a sweep ends on short ones
    that even out across workers (the longest-processing-time rule), instead of on one long cell
    while the other workers idle. Only the order within a model matters for cost (the driver keeps
    a worker on its own model), so the prior needs no parameter count.
    """
    return sorted(cells, key=lambda c: work_units(c.config) + eval_units(c.config), reverse=True)


@dataclass(frozen=True)
class Rate:
    """Post-training FLOPs per parameter of a cell of `units` prior work: per_unit · units + fixed."""

    per_unit: float
    fixed: float = 0.0

    def __call__(self, units: float) -> float:
        return self.per_unit * units + self.fixed

    @classmethod
    def fitted(cls, units: Sequence[float], per_param: Sequence[float], shape: Rate | None = None) -> Rate:
        """The rate closest to the measured FLOPs per parameter in relative error, both parts ≥ 0, from the rows that
        spent any (a steering vector with no pairs to contrast, a prompt with one choice: none). Where those span
        fewer than two budgets' work (one budget says nothing of how cost grows) or leave nothing growing with the
        budget, `shape` — the rate of a broader group of the same method — is scaled to them; without one, a scale
        alone (the median ratio), or the fixed part alone where two budgets' work says cost does not grow. Rows that
        all spent nothing (a curve's first cell, at a budget too small for a pair to contrast) take `shape` as it is,
        else a rate of 0 (a method that never spends: prompting with nothing to choose)."""
        x, y = np.asarray(units, float), np.asarray(per_param, float)
        spent = y > 0
        if not spent.any():
            return shape if shape is not None else cls(0.0)
        x, y = x[spent], y[spent]
        borrowable = shape is not None and bool((shape(x) > 0).all())
        if len(np.unique(x)) >= 2:
            (per_unit, fixed), _ = nnls(np.column_stack([x / y, 1 / y]), np.ones(len(y)))
            if per_unit > 0 or not borrowable:
                return cls(float(per_unit), float(fixed))
        if shape is not None and borrowable:
            scale = float(np.median(y / shape(x)))
            return cls(shape.per_unit * scale, shape.fixed * scale)
        return cls(float(np.median(y / x)))


@dataclass(frozen=True)
class CostModel:
    """Prior cell costs with rates measured from stored rows (see the module docstring)."""

    params: dict[str, float]  # model id -> N
    rates: dict[tuple[str, ...], Rate]  # (), (method,), (task, method), (task, method, model) -> FLOPs per parameter
    unsized: frozenset[str] = frozenset()  # models priced at a guessed N: no size prior, no stored row

    @classmethod
    def calibrate(cls, cells: Sequence[Planned], rows: pd.DataFrame, params_prior: Mapping[str, float]) -> CostModel:
        """Rates from the stored rows of `cells` that report post-training FLOPs."""
        params = dict(params_prior)
        if len(rows):
            counted = rows.dropna(subset=["params_total"]).groupby("model")["params_total"].median()
            params.update({model: float(n) for model, n in counted.items() if n > 0})
        known = [n for n in params.values() if n > 0]
        fallback = float(np.exp(np.mean(np.log(known)))) if known else 1.0
        unsized = frozenset(cell.config.model.id for cell in cells if cell.config.model.id not in params)
        for cell in cells:
            params.setdefault(cell.config.model.id, fallback)
        by_id = {c.cell_id: c.config for c in cells}
        measured: dict[tuple[str, ...], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        flops = rows[["cell_id", "post_train_flops"]].dropna() if len(rows) else rows
        for cell_id, value in zip(flops.get("cell_id", []), flops.get("post_train_flops", [])):
            config = by_id.get(cell_id)
            if config is None:
                continue
            units = work_units(config)
            if units <= 0:
                continue
            keys = [(config.method,), (config.task, config.method), (config.task, config.method, config.model.id)]
            # A method that post-trains for free (prompting) says nothing about tokens per example.
            for key in keys + ([()] if value > 0 else []):
                measured[key][0].append(units)
                measured[key][1].append(float(value) / params[config.model.id])
        rates: dict[tuple[str, ...], Rate] = {}
        for key in sorted(measured, key=len):  # broad first: a narrower group may borrow its method's shape
            broader = {3: [key[:2], key[1:2]], 2: [key[1:]]}.get(len(key), [])  # (task, method, model): (task, method), (method,)
            rates[key] = Rate.fitted(*measured[key], shape=next((rates[k] for k in broader if k in rates), None))
        return cls(params=params, rates=rates, unsized=unsized)

    def _rate(self, config: CellConfig) -> Rate:
        for key in ((config.task, config.method, config.model.id), (config.task, config.method), (config.method,), ()):
            if key in self.rates:
                return self.rates[key]
        return Rate(TOKENS_PER_EXAMPLE)

    def post_train(self, config: CellConfig) -> float:
        """Expected post-training FLOPs of a cell not yet run; none for a cell with no post-training work (budget 0:
        `base`), which the rates' fixed part — fitted to the methods that do work — priced like a steering cell."""
        units = work_units(config)
        return self._rate(config)(units) * self.params[config.model.id] if units > 0 else 0.0

    def ranking_cost(self, config: CellConfig) -> float:
        """Post-training FLOPs plus the evaluation's forward FLOPs: what running the cell really takes."""
        measured = self.rates.get(())
        tokens = measured.per_unit if measured is not None and measured.per_unit > 0 else TOKENS_PER_EXAMPLE
        return self.post_train(config) + eval_units(config) * self.params[config.model.id] * tokens

    def spent(self, cells: Sequence[Planned], rows: pd.DataFrame) -> float:
        """Post-training FLOPs of the grid's stored cells, as measured. A failed row records none and is counted as 0:
        what it ran before failing is not known, and the whole cell's prior charged a model that runs out of memory
        at load (no compute) for its grid's largest cells — 73 % of a run's spend in a test — ending a
        `--budget-flops` sweep on failures."""
        ids = {c.cell_id for c in cells}
        values = [float(v) for cell_id, v in zip(rows.get("cell_id", []), rows.get("post_train_flops", [])) if cell_id in ids]
        return float(sum(v for v in values if np.isfinite(v)))
