"""Metrics as losses: the laws describe something that falls towards an irreducible floor.

A score in [0, 1] (accuracy, success rate) is fitted as the loss 1 − score; an NLL is a loss
already. The loss is floored so that a perfect cell does not send log(loss) to −∞.
"""

from __future__ import annotations

import numpy as np

HIGHER_IS_BETTER = {"score": True, "score_elicited": True, "nll": False}
BASE_COLUMN = {"score": "score_base", "score_elicited": "score_base", "nll": "nll_base"}
LOSS_FLOOR = 1e-3
ROUNDING = 1e-9  # means of k/n scores that are equal can differ in their last bits: closer than this they are level
STEP_DIVISORS = 100  # `step`: how many steps the smallest gap between measured values may span


def check_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(HIGHER_IS_BETTER)}")


def to_loss(values: np.ndarray, metric: str) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    loss = 1.0 - values if HIGHER_IS_BETTER[metric] else values
    return np.maximum(loss, LOSS_FLOOR)


def from_loss(loss: np.ndarray, metric: str) -> np.ndarray:
    loss = np.asarray(loss, dtype=float)
    return 1.0 - loss if HIGHER_IS_BETTER[metric] else loss


def improvement(values: np.ndarray, reference: np.ndarray, metric: str) -> np.ndarray:
    """How much better `values` are than `reference`, positive when better whatever the direction."""
    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    return diff if HIGHER_IS_BETTER[metric] else -diff


def step(values: np.ndarray) -> float:
    """The step the measured values move in (a score over n test questions: 1/n), 0 where they have none.

    The largest d, the smallest gap between two distinct values divided by 1..STEP_DIVISORS, of which
    every gap is a whole multiple: with only a few distinct values the smallest gap can be several steps.
    A continuous metric (an NLL) has no such d, and is 0; so is a metric with one value.
    """
    values = np.asarray(values, dtype=float)
    distinct = np.unique(np.round(values[np.isfinite(values)], 9))  # 0.225 and 1 − (1 − 0.225) are one value
    gaps = np.diff(distinct)
    if len(gaps) == 0:
        return 0.0
    for k in range(1, STEP_DIVISORS + 1):
        multiples = gaps / (gaps.min() / k)
        if np.abs(multiples - np.round(multiples)).max() < 1e-6:
            return float(gaps.min() / k)
    return 0.0


def question_sampling_sd(values: np.ndarray) -> tuple[int, float] | None:
    """(n, sd) for a score that moves in steps of 1/n — n test questions, the same for every cell —
    with the binomial sd √(p(1 − p)/n) at the scores' mean p: how far a cell's score would move on
    another draw of n questions, noise that redrawing seeds does not carry. None for a metric with
    no step (an NLL); n may be too small where every gap is a multiple of a larger step (see `step`)."""
    d = step(values)
    if d <= 0 or d > 0.5:
        return None
    p = float(np.clip(np.nanmean(values), 0.0, 1.0))
    n = int(round(1 / d))
    return n, float(np.sqrt(p * (1 - p) / n))
