"""Metrics as losses: the laws describe something that falls towards an irreducible floor.

A score in [0, 1] (accuracy, success rate) is fitted as the loss 1 − score; an NLL is a loss
already. The loss is floored so that a perfect cell does not send log(loss) to −∞.
"""

from __future__ import annotations

import numpy as np

HIGHER_IS_BETTER = {"score": True, "score_elicited": True, "nll": False}
BASE_COLUMN = {"score": "score_base", "score_elicited": "score_base", "nll": "nll_base"}
LOSS_FLOOR = 1e-3


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
