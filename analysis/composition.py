"""Composition gain: does `A+B` on the same data beat the better of A and B alone?

Compared cell-mean against cell-mean at each matched (task, model, budget), since a composition
has no law of its own to compare; the CI resamples the cells (seeds) of every method independently,
and "the better of A and B" is re-chosen inside each resample so the CI does not favour the
composition by fixing the winner in advance. Resampling two seeds that agree gives a zero-width
interval, so a gain gets one only with MIN_SEEDS cells on every side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.bootstrap import percentile_interval
from analysis.methods import components, method_kind
from analysis.metrics import improvement

MIN_SEEDS = 3  # cells of the composition and of each part before the gain gets an interval


@dataclass(frozen=True)
class CompositionGain:
    task: str
    model: str
    budget: float
    composition: str
    best_single: str
    gain: float  # positive: the composition is better (in the metric's direction)
    gain_lo: float  # NaN without resamples or with fewer than MIN_SEEDS cells on a side
    gain_hi: float
    n_cells: int
    seeds: int  # the fewest cells of any one side (the composition or a part)

    def seeds_note(self) -> str:
        """Why a resampled gain has no interval: too few seeds to resample ('' when there are enough)."""
        return f"no interval: {self.seeds} seed(s) on a side, {MIN_SEEDS} needed" if self.seeds < MIN_SEEDS else ""

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


def _resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    return values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)


def composition_gains(ok: pd.DataFrame, *, metric: str, bootstrap: int, seed: int) -> list[CompositionGain]:
    """Gain of every composition over its best part wherever all parts were run."""
    rng = np.random.default_rng(seed)
    usable = ok[np.isfinite(ok[metric].astype(float))]
    gains = []
    for (task, model, budget), cells in usable.groupby(["task", "model", "budget"], sort=True):
        by_method = {m: g[metric].to_numpy(float) for m, g in cells.groupby("method")}
        for comp in sorted(m for m in by_method if method_kind(m) == "composition"):
            parts = [p for p in dict.fromkeys(components(comp))]
            if not all(p in by_method for p in parts):
                continue
            score = {m: improvement(by_method[m].mean(), 0.0, metric) for m in [comp, *parts]}
            best = max(parts, key=score.get)
            draws = max(bootstrap, 1)
            comp_b = improvement(_resampled_means(by_method[comp], draws, rng), 0.0, metric)
            best_b = np.max([improvement(_resampled_means(by_method[p], draws, rng), 0.0, metric) for p in parts], axis=0)
            seeds = min(len(by_method[m]) for m in [comp, *parts])
            lo, hi = percentile_interval(comp_b - best_b) if bootstrap > 0 and seeds >= MIN_SEEDS else (np.nan, np.nan)
            n_cells = len(by_method[comp]) + sum(len(by_method[p]) for p in parts)
            gains.append(CompositionGain(task, model, float(budget), comp, best, float(score[comp] - score[best]), lo, hi, n_cells, seeds))
    return gains
