"""Data efficiency: how many examples a method needs to reach x % of its asymptotic gain.

The gain is measured from the base model: with loss(D) = E + B·D^-β and the base model's loss L0,
the asymptotic gain is L0 − E and x % of it is reached at D_x = (B / ((1 − x)(L0 − E)))^(1/β).
A method whose asymptote is no better than the base model has no D_x; a flat curve better than it
(β = 0, where the curve is the constant E + B, or B ≈ 0) reaches it at every budget, D_x = 0. A D_x
outside the measured budgets is the law's extrapolation, so it is marked as such; one that a bound of
the fit sets rather than the data (`caveat`) is marked as no finding. A
resample that never reaches the gain counts as needing more than any budget, as D* counts a
resample that does not cross: leaving it out would pull the interval's upper end down. Where the
curve's resamples redrew the test questions, the base level is the `base` cells' score on the same
redrawn questions in each resample (it moves with them); else the measured one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.crossover import censored_interval
from analysis.curves import LawFit, redrawn_scores
from analysis.fitting import NEGLIGIBLE_SHARE
from analysis.metrics import BASE_COLUMN, to_loss

FRACTIONS = (0.5, 0.9)
EXTRAPOLATION_LIMIT = 100.0  # D_x beyond this many times the largest measured budget is not even printed


@dataclass(frozen=True)
class DataEfficiency:
    task: str
    method: str
    model: str
    n_params: float
    fraction: float
    examples: float  # NaN when the asymptote does not beat the base model; +inf when it does, past float range
    examples_lo: float  # over every resample: one without a D_x counts as +inf
    examples_hi: float
    finite_share: float  # resamples with a D_x (their asymptote beats the base model; +inf counts); NaN without resamples
    smallest_budget: float  # the curve's measured budgets: outside them D_x is the law's guess
    largest_budget: float
    caveat: str = ""  # why the fit's bounds, not the data, set D_x ('' when nothing does): see `bound_caveat`

    @property
    def extrapolated(self) -> bool | None:
        """Outside the measured budgets; None where there is no D_x."""
        return None if np.isnan(self.examples) else bool(self.examples < self.smallest_budget or self.examples > self.largest_budget)

    def record(self) -> dict[str, object]:
        return {**self.__dict__, "extrapolated": self.extrapolated}


def bound_caveat(curve: LawFit) -> str:
    """What of the fit sits at a bound that D_x reads: β at its upper bound is a step somewhere between two
    budgets, placed by the bound (D_x = (B/…)^(1/3) whatever the scores between them); E at the loss floor
    makes the asymptote, and so the gain D_x is a share of, the metric's limit, assumed, not measured; B at
    its cap caps β. β at its lower bound is a flat curve, whose level is measured: no caveat. A curve that worsens with
    the budget (`LawFit.worsening`) is fitted as a flat line that reaches its "gain" at every budget: D_x = 0 is no
    finding there."""
    reasons = [worse] if (worse := curve.worsening) else []
    if curve.exponents_at_bounds().get("beta") == 1:
        reasons.append("beta at its upper bound (a step between two budgets, placed by the bound)")
    if curve.floor_asymptote():
        reasons.append("E at the loss floor (the gain is assumed to reach the metric's limit)")
    if "B" in curve.capped_coefficients():
        reasons.append("B at its upper bound (beta capped)")
    return "; ".join(reasons)


def examples_to_reach(params: dict[str, np.ndarray], base_loss: float, fraction: float) -> np.ndarray:
    """D_x per parameter set; NaN where the curve's level does not beat the base model by more than a
    negligible share of its loss (a level equal to it, up to rounding, would put D_x anywhere); 0 where it
    does and the curve is flat, reaching its level at every budget: β = 0 (the curve is the constant E + B,
    its level) or a B term negligible from D = 1 on, next to the loss and to the gain (a gain of a fraction of a
    question with B negligible next to E alone was said reached at D = 0 where the law put it at 1024; helper-139);
    +inf where D_x is past float range (an exponent near 0). Masking β = 0 instead said of scores far above the
    base model that they never beat it."""
    e, b, beta = (np.atleast_1d(np.asarray(params[name], dtype=float)) for name in ("E", "B", "beta"))
    gain = base_loss - np.where(beta > 0, e, e + b)
    flat = (beta <= 0) | (b < NEGLIGIBLE_SHARE * np.minimum(e, gain))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # flat and invalid cases replaced below
        d = np.where(flat, 0.0, (b / ((1.0 - fraction) * gain)) ** (1.0 / beta))
    return np.where(gain > NEGLIGIBLE_SHARE * base_loss, d, np.nan)


def base_level(ok: pd.DataFrame, task: str, model: str, metric: str) -> float:
    """The base model's metric on a task: the rows' base column, else the `base` method's cells."""
    rows = ok[(ok["task"] == task) & (ok["model"] == model)]
    column = BASE_COLUMN[metric]
    values = rows[column].astype(float) if column in rows else pd.Series(dtype=float)
    if not np.isfinite(values).any():
        values = rows.loc[rows["method"] == "base", metric].astype(float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else np.nan


def redrawn_base_loss(ok: pd.DataFrame, curve: LawFit) -> np.ndarray | None:
    """The base model's loss on each of the curve's resamples' redrawn questions (B,): the mean over its
    `base` cells; None where the curve redrew none or the base cells lack the same questions' outcomes."""
    boot = curve.boot
    if boot is None or not boot.questions:
        return None
    rows = ok[(ok["task"] == curve.task) & (ok["model"] == curve.model) & (ok["method"] == "base")]
    redrawn = redrawn_scores(rows, curve.metric, curve.task, len(boot.thetas), boot.question_seed)
    if redrawn is None or redrawn[1] != boot.questions:
        return None
    return to_loss(redrawn[0].mean(axis=1), curve.metric)


def data_efficiency(fits: list[LawFit], ok: pd.DataFrame, fractions: tuple[float, ...] = FRACTIONS) -> list[DataEfficiency]:
    result = []
    for curve in (f for f in fits if f.ok and not f.joint):
        base = base_level(ok, curve.task, curve.model, curve.metric)
        if not np.isfinite(base):
            continue
        base_loss = float(to_loss(np.array([base]), curve.metric)[0])
        redrawn = redrawn_base_loss(ok, curve)
        for fraction in fractions:
            point = float(examples_to_reach(curve.fit.params, base_loss, fraction)[0])
            resampled_base = base_loss if redrawn is None else redrawn
            samples = examples_to_reach(curve.boot.params(), resampled_base, fraction) if curve.boot else np.array([])
            lo, hi = censored_interval(np.where(np.isnan(samples), np.inf, samples))
            share = float((~np.isnan(samples)).mean()) if len(samples) else np.nan  # inf: a D_x past float range, still one
            result.append(DataEfficiency(curve.task, curve.method, curve.model, curve.n_params, fraction, point, lo, hi, share,
                                         float(curve.points.d.min()), float(curve.points.d.max()), bound_caveat(curve)))  # fmt: skip
    return result
