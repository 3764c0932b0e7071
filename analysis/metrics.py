"""Metrics as losses: the laws describe something that falls towards an irreducible floor.

A score in [0, 1] (accuracy, success rate) is fitted as the loss 1 − score; an NLL is a loss
already. The loss is floored so that a perfect cell does not send log(loss) to −∞.
"""

from __future__ import annotations

import math

import numpy as np

HIGHER_IS_BETTER = {"score": True, "score_elicited": True, "nll": False}
BASE_COLUMN = {"score": "score_base", "score_elicited": "score_base", "nll": "nll_base"}
LOSS_FLOOR = 1e-3
ROUNDING = 1e-9  # means of k/n scores that are equal can differ in their last bits: closer than this they are level
MAX_TEST_SIZE = 100_000  # `questions_counted`: the largest test set a score's step is looked for in
WHOLE = 1e-6  # `questions_counted`: how far from a whole number of questions v · n may be (float error is ~1e-16 · n)


def whole_percent(share: float) -> int:
    """A share of resamples as a whole percent, rounded down (94.75 % is not "95 %" beside a 95 % bar). Exact for
    the k/B shares resamples give: floor(100 · 0.29) is 28 in floats, so 58 of 200 read "28 %"."""
    return math.floor(100 * share + ROUNDING)


def check_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(HIGHER_IS_BETTER)}")


def clip_difference(lo: float, hi: float, metric: str) -> tuple[float, float]:
    """An interval for a difference of two means of `metric`, cut to the differences it can take: a score's lie in
    [−1, 1]. A t interval over two seeds a side (1–2 degrees of freedom, t ≈ 4–13) reached past them: "ahead by 0.14
    [-1.86, 2.14]". Cut to the possible values, it holds the truth as often, and an NLL's has no such bound."""
    if not HIGHER_IS_BETTER[metric]:
        return lo, hi
    return max(lo, -1.0), min(hi, 1.0)


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


def questions_counted(values: np.ndarray) -> int | None:
    """The n of scores counted over n test questions: the smallest n (up to MAX_TEST_SIZE) of which every
    finite value is a multiple of 1/n; None where there is none (a continuous metric, such as an NLL).

    Searched over n rather than read off the gaps between values: a gap of k/n rounded to a fixed number
    of decimals is no longer a whole multiple of 1/n once n has no short decimal (300, 1024, 1319), which
    made the step 0 for most test-set sizes. Where every value shares a factor with n (only 0, ½ and 1
    measured) the n found is a divisor of the real one.
    """
    values = np.asarray(values, dtype=float)
    finite = np.unique(values[np.isfinite(values)])
    if not len(finite):
        return None
    candidates = np.arange(1, MAX_TEST_SIZE + 1)
    for v in finite:
        product = v * candidates
        counts = np.round(product)
        # a whole count, and not 0 for a value that is not (1e-7 is within WHOLE of 0 questions of any n)
        candidates = candidates[(np.abs(product - counts) < WHOLE) & ((counts != 0) | (v == 0))]
        if not len(candidates):
            return None
    return int(candidates[0])


def step(values: np.ndarray) -> float:
    """The step the measured values move in (a score over n test questions: 1/n, `questions_counted`), 0 where
    they have none: a continuous metric, or fewer than two distinct values (one value is a multiple of
    many fractions, and says nothing of the step)."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or np.ptp(finite) <= ROUNDING:  # 0.225 and 1 − (1 − 0.225) are one value
        return 0.0
    n = questions_counted(finite)
    return 0.0 if n is None else 1.0 / n


def question_sampling_sd(values: np.ndarray) -> tuple[int, float] | None:
    """(n, sd) for a score that moves in steps of 1/n — n test questions, the same for every cell —
    with the binomial sd √(p(1 − p)/n) at the scores' mean p: how far a cell's score would move on
    another draw of n questions, noise that redrawing seeds does not carry. None for a metric with
    no step (an NLL); n may be a divisor of the real one where every score is (see `questions_counted`)."""
    d = step(values)
    if d <= 0 or d > 0.5:
        return None
    p = float(np.clip(np.nanmean(values), 0.0, 1.0))
    n = int(round(1 / d))
    return n, float(np.sqrt(p * (1 - p) / n))
