"""Result rows drawn from known budget curves, for tests and benchmarks that need a ground truth.

Rows are plain dicts keyed by results-schema column names; writing them as Parquet is left to the
caller (analysis does not import the schema's owner, `workers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
                    "schema_version": 1, "sweep": "synthetic", "cell_id": cell, "slug": cell, "status": "ok",
                    "model": model, "family": "synthetic", "params_total": n_params[model] * 2,
                    "params_nonembed": n_params[model], "task": task, "task_type": "classification",
                    "method": method, "budget": budget, "seed": seed, "score": 1.0 - loss,
                    "score_base": score_base, "score_elicited": score_base + 0.3,
                    "neutral_kl": 0.01 * budget ** 0.5, "offtask_score_delta": -0.001 * budget ** 0.3,
                    "post_train_flops": 1e9 * budget * n_params[model] / 1e6,
                })  # fmt: skip
    return rows
