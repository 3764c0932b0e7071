"""The crossover budget D*(N): where a fine-tuning curve overtakes a steering curve.

Only the measured budget range is searched — a power law extrapolated past the data says little
about where two methods cross — so "no crossover within the measured range" is a real answer.
The CI comes from evaluating both fitted curves for every bootstrap resample at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.bootstrap import percentile_interval
from analysis.capability import Axis
from analysis.curves import LawFit
from analysis.methods import method_kind
from analysis.metrics import HIGHER_IS_BETTER, from_loss

GRID_POINTS = 512


@dataclass(frozen=True)
class Crossover:
    """D* for one (task, model, steering method, fine-tuning method)."""

    task: str
    model: str
    n_params: float
    steering: str
    finetuning: str
    d_min: float
    d_max: float
    d_star: float  # NaN when there is no crossover within [d_min, d_max]
    d_star_lo: float
    d_star_hi: float
    share: float  # fraction of bootstrap resamples that cross within the range
    outcome: str  # "crosses", "finetuning_ahead" (from the smallest budget on) or "steering_ahead" (throughout)
    verdict: str

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


def budget_curves(params: dict[str, np.ndarray], d: np.ndarray, metric: str) -> np.ndarray:
    """Metric of the budget law for each parameter set (rows) at each budget in `d` (columns)."""
    e, b, beta = (np.atleast_1d(params[name])[:, None] for name in ("E", "B", "beta"))
    return from_loss(e + b * d[None, :] ** -beta, metric)


def first_crossing(advantage: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per row, the first budget where `advantage` turns from negative to nonnegative.

    Interpolated linearly in log D between grid points; NaN where it never does, or where it is
    nonnegative from the start (nothing is overtaken).
    """
    behind = advantage < 0
    turns = behind[:, :-1] & ~behind[:, 1:]
    has = turns.any(axis=1) & behind[:, 0]
    i = np.argmax(turns, axis=1)
    rows = np.arange(len(advantage))
    a0, a1 = advantage[rows, i], advantage[rows, i + 1]
    logd = np.log(d)
    frac = a0 / np.where(a0 == a1, -1.0, a0 - a1)
    with np.errstate(over="ignore", invalid="ignore"):  # rows without a crossing are masked out below
        d_star = np.exp(logd[i] + frac * (logd[i + 1] - logd[i]))
    return np.where(has, d_star, np.nan)


def crossover(steer: LawFit, tune: LawFit) -> Crossover:
    """Where `tune` (a fine-tuning budget curve) overtakes `steer` on the same task and model."""
    d_min = max(steer.points.d.min(), tune.points.d.min())
    d_max = min(steer.points.d.max(), tune.points.d.max())
    d = np.geomspace(d_min, d_max, GRID_POINTS)
    metric = steer.metric
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0  # advantage of fine-tuning, in "better" units
    point = sign * (budget_curves(tune.fit.params, d, metric) - budget_curves(steer.fit.params, d, metric))
    d_star = float(first_crossing(point, d)[0])
    if steer.boot is not None and tune.boot is not None:
        samples = first_crossing(sign * (budget_curves(tune.boot.params(), d, metric) - budget_curves(steer.boot.params(), d, metric)), d)
        share = float(np.mean(np.isfinite(samples)))
        lo, hi = percentile_interval(samples)
    else:
        share, lo, hi = np.nan, np.nan, np.nan
    if np.isfinite(d_star):
        outcome, verdict = "crosses", f"{tune.method} overtakes {steer.method} at D* ≈ {d_star:.3g}"
    elif point[0, 0] >= 0:
        outcome, verdict = "finetuning_ahead", f"no crossover within the measured range: {tune.method} is ahead of {steer.method} throughout"
    else:
        outcome, verdict = "steering_ahead", f"no crossover within the measured range: {steer.method} stays ahead of {tune.method}"
    return Crossover(steer.task, steer.model, steer.n_params, steer.method, tune.method, float(d_min), float(d_max), d_star, lo, hi, share, outcome, verdict)


def find_crossovers(fits: list[LawFit]) -> list[Crossover]:
    """Every steering × fine-tuning pair that has fitted budget curves on the same task and model."""
    curves = [f for f in fits if f.ok and f.model != "*"]
    found = []
    for steer in (f for f in curves if method_kind(f.method) == "steering"):
        for tune in (f for f in curves if method_kind(f.method) == "finetuning"):
            if (tune.task, tune.model) == (steer.task, steer.model):
                found.append(crossover(steer, tune))
    return sorted(found, key=lambda c: (c.task, c.steering, c.finetuning, c.n_params))


@dataclass(frozen=True)
class CrossoverScaling:
    """How D* grows with model size or capability: D* ∝ x^gamma over the models that cross.

    `holdout_error` is the mean |ln D*| missed when each model in turn is predicted from the line
    through the others (needs three models). With one D* per model and a two-parameter line this
    costs nothing, and unlike leaving out only the top model it holds out the same models on every
    axis, so axes compare on equal terms.
    """

    task: str
    steering: str
    finetuning: str
    x: str
    gamma: float
    n_models: int
    holdout_error: float

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


def _leave_one_out(logx: np.ndarray, logd: np.ndarray) -> float:
    errors = []
    for i in range(len(logx)):
        rest = np.arange(len(logx)) != i
        if len(np.unique(logx[rest])) < 2:
            return np.nan
        slope, intercept = np.polyfit(logx[rest], logd[rest], 1)
        errors.append(abs(slope * logx[i] + intercept - logd[i]))
    return float(np.mean(errors)) if len(errors) >= 3 else np.nan


def crossover_scaling(crossovers: list[Crossover], capabilities: pd.DataFrame, axis: Axis) -> list[CrossoverScaling]:
    """Least-squares slope of log D* on log x per pair; needs two models with a crossover and an x."""
    x_of = capabilities.set_index(["task", "model"])[axis.name].to_dict() if len(capabilities) else {}
    pairs: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for c in crossovers:
        x = x_of.get((c.task, c.model), np.nan)
        if np.isfinite(c.d_star) and np.isfinite(x):
            pairs.setdefault((c.task, c.steering, c.finetuning), []).append((float(np.log(x)), float(np.log(c.d_star))))
    result = []
    for (task, steering, finetuning), found in sorted(pairs.items()):
        logx, logd = np.array(found).T
        if len(np.unique(logx)) >= 2:
            gamma = float(np.polyfit(logx, logd, 1)[0])
            result.append(CrossoverScaling(task, steering, finetuning, axis.name, gamma, len(found), _leave_one_out(logx, logd)))
    return result
