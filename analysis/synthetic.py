"""Result rows drawn from known budget curves, for tests and benchmarks that need a ground truth.

Rows are plain dicts keyed by results-schema column names; writing them as Parquet is left to the
caller (analysis does not import the schema's owner, `workers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.capability import get_axis


@dataclass(frozen=True)
class TrueCurve:
    """score(D) = 1 − (e + b·D^-beta): the per-(task, method, model) law the fitter should recover."""

    e: float
    b: float
    beta: float

    def score(self, d: np.ndarray) -> np.ndarray:
        return 1.0 - (self.e + self.b * np.asarray(d, dtype=float) ** -self.beta)


def synthetic_rows(
    curves: dict[tuple[str, str, str], TrueCurve], n_params: dict[str, int], budgets: tuple[int, ...],
    seeds: int, noise: float, rng: np.random.Generator, score_base: float = 0.2,
) -> list[dict]:  # fmt: skip
    """One ok row per (curve, budget, seed); the loss gets multiplicative log-normal noise."""
    rows = []
    for (task, method, model), curve in curves.items():
        for budget in budgets:
            for seed in range(seeds):
                loss = (1.0 - curve.score(budget)) * float(np.exp(rng.normal(0.0, noise)))
                cell = f"{model}__{task}__{method}__n{budget}__s{seed}"
                rows.append({
                    "schema_version": 2, "sweep": "synthetic", "cell_id": cell, "slug": cell, "status": "ok",
                    "model": model, "family": "synthetic", "params_total": n_params[model] * 2,
                    "params_nonembed": n_params[model], "task": task, "task_type": "classification",
                    "method": method, "budget": budget, "seed": seed, "score": 1.0 - loss,
                    "score_base": score_base, "score_elicited": score_base + 0.3,
                    "neutral_kl": 0.01 * budget ** 0.5, "offtask_score_delta": -0.001 * budget ** 0.3,
                    "post_train_flops": 1e9 * budget * n_params[model] / 1e6,
                })  # fmt: skip
    return rows


@dataclass(frozen=True)
class BaseModel:
    """A base model as the rows see it: its family, its size and what it can do before post-training."""

    name: str
    family: str
    params: int
    neutral_nll_per_byte: float
    score_base: float

    def columns(self) -> dict[str, object]:
        """Its per-model results columns (per-token neutral NLL as if 4 bytes a token: the axes read per byte; the
        elicited score 0.3 over its own base score, as `synthetic_rows` writes it but at most 1, so no model's gap is
        negative)."""
        return {"family": self.family, "params_nonembed": self.params, "params_total": self.params * 2,
                "score_base": self.score_base, "score_elicited": min(self.score_base + 0.3, 1.0),
                "base_neutral_nll": self.neutral_nll_per_byte * 4.0, "base_neutral_nll_per_byte": self.neutral_nll_per_byte}  # fmt: skip


@dataclass(frozen=True)
class CapabilityLaw:
    """loss(x, D) = e + a·x^-alpha + b·D^-beta with x a model's value on one axis: the truth to recover."""

    e: float
    a: float
    alpha: float
    b: float
    beta: float

    def curve(self, x: float) -> TrueCurve:
        """The budget curve of a model at `x`: capability moves only the floor."""
        return TrueCurve(self.e + self.a * x**-self.alpha, self.b, self.beta)


def capability_rows(
    laws: dict[tuple[str, str], CapabilityLaw], models: list[BaseModel], x: str, budgets: tuple[int, ...],
    seeds: int, noise: float, rng: np.random.Generator,
) -> list[dict]:  # fmt: skip
    """Rows for every (task, method) law on every model, the law's x read from axis `x`."""
    axis = get_axis(x)
    at = {m.name: float(axis.values(pd.DataFrame([m.columns()]))[0]) for m in models}
    curves = {(task, method, m.name): law.curve(at[m.name]) for (task, method), law in laws.items() for m in models}
    rows = synthetic_rows(curves, {m.name: m.params for m in models}, budgets, seeds, noise, rng)
    by_name = {m.name: m for m in models}
    return [dict(row, **by_name[row["model"]].columns()) for row in rows]
