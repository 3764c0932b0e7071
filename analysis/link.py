"""A sigmoid link from a loss to a bounded score (accuracy, success rate).

A score is stuck at chance while the loss is high and saturates at a ceiling when it is low, so a
power law fitted to the loss predicts the score only through such a link (the two-step prediction
of the Llama 3 report: compute -> target NLL -> accuracy). Fitted per task on the cells' own
(target NLL, score) pairs, it turns any fitted NLL curve into a score curve, and says how tightly
score follows loss on this task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

MIN_POINTS = 6
# The loss span of a sigmoid's 10–90 % rise is 2·ln 9 / slope: a link with fewer cells than MIN_IN_RISE inside it is
# a step or a tail the cells do not resolve (fitted on 9 rows, a slope of 3.98e+04 was printed as if measured: helper-169).
RISE = 2 * np.log(9)
MIN_IN_RISE = 2


@dataclass(frozen=True)
class SigmoidLink:
    """score = floor + (ceiling − floor) / (1 + exp(slope · (loss − midpoint)))."""

    task: str
    floor: float
    ceiling: float
    slope: float
    midpoint: float
    n_points: int
    rmse: float
    in_rise: int  # cells whose loss lies within the 10–90 % rise: fewer than MIN_IN_RISE and its steepness is not measured

    @property
    def inverted(self) -> bool:
        """The score rises with the loss over these cells (ceiling below floor; slope is positive by its bounds).

        The fit is left free rather than held to ceiling ≥ floor: held, it would come out a flat line that hides
        what the cells show. But such a fit does not describe "lower loss → higher score", so it is flagged and
        cannot turn a loss curve into a score curve.
        """
        return self.ceiling < self.floor

    @property
    def note(self) -> str:
        """Why the link must not be used, or how far it may be read ('' where it may be, as it is)."""
        if self.inverted:
            return (f"inverted: the score rises with the loss across these cells (floor {self.floor:.3g} above ceiling {self.ceiling:.3g}), "
                    "not lower loss → higher score; do not use it to translate a loss into a score")  # fmt: skip
        if self.in_rise < MIN_IN_RISE:
            rise = f"{self.midpoint - RISE / 2 / self.slope:.3g}–{self.midpoint + RISE / 2 / self.slope:.3g}"
            return (f"its rise is not measured: {self.in_rise} of {self.n_points} cells lie within its 10–90 % rise (losses {rise}), "
                    "so its slope, and what a loss there translates to, are not the cells' but the fit's guess")  # fmt: skip
        return ""

    def score(self, loss: np.ndarray | float) -> np.ndarray:
        if self.inverted:
            raise ValueError(f"{self.task}: {self.note}")
        return sigmoid_score(np.asarray(loss, dtype=float), self.floor, self.ceiling, self.slope, self.midpoint)

    def record(self) -> dict:
        return {**asdict(self), "note": self.note}


def sigmoid_score(loss: np.ndarray, floor: float, ceiling: float, slope: float, midpoint: float) -> np.ndarray:
    z = np.clip(slope * (loss - midpoint), -50.0, 50.0)  # exp overflows long after the sigmoid is flat
    return floor + (ceiling - floor) / (1.0 + np.exp(z))


def fit_sigmoid_link(loss: np.ndarray, score: np.ndarray, task: str = "") -> SigmoidLink:
    """Least squares from a small grid of slopes and midpoints (the loss surface has flat plateaus)."""
    loss, score = np.asarray(loss, dtype=float), np.asarray(score, dtype=float)
    keep = np.isfinite(loss) & np.isfinite(score)
    loss, score = loss[keep], score[keep]
    if len(loss) < MIN_POINTS or np.ptp(loss) == 0:
        raise ValueError(f"a sigmoid link needs at least {MIN_POINTS} points with distinct losses, got {len(loss)}")
    span = float(np.ptp(loss))
    lower = [0.0, 0.0, 1e-3 / span, loss.min() - span]
    upper = [1.0, 1.0, 1e3 / span, loss.max() + span]

    def residual(p: np.ndarray) -> np.ndarray:
        return sigmoid_score(loss, *p) - score

    best = None
    for slope in (1.0 / span, 5.0 / span, 25.0 / span):
        for midpoint in np.quantile(loss, [0.25, 0.5, 0.75]):
            start = [float(score.min()), float(score.max()), slope, float(midpoint)]
            fit = least_squares(residual, np.clip(start, lower, upper), bounds=(lower, upper))
            if best is None or fit.cost < best.cost:
                best = fit
    floor, ceiling, slope, midpoint = best.x
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    in_rise = int((np.abs(loss - midpoint) <= RISE / 2 / slope).sum())
    return SigmoidLink(task, float(floor), float(ceiling), float(slope), float(midpoint), len(loss), rmse, in_rise)


def fit_links(ok: pd.DataFrame, loss_column: str = "nll", score_column: str = "score") -> list[SigmoidLink]:
    """One link per task over every ok cell (all methods, sizes and budgets), where there are enough."""
    links = []
    for task, rows in ok.groupby("task", sort=True):
        try:
            links.append(fit_sigmoid_link(rows[loss_column].to_numpy(float), rows[score_column].to_numpy(float), str(task)))
        except ValueError:
            continue  # too few cells on this task: the report lists the tasks that have a link
    return links
