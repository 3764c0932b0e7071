"""Bootstrap over cells, all resamples at once.

A resample of cells is the same points with multinomial counts as weights, so every resample can
start from the full-data optimum (it is close) and all of them are refined together by the fitter's
batched Levenberg-Marquardt (`fitting.refine`) instead of B separate grid searches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.fitting import Fit, LawData, refine

CI_LEVEL = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """Resampled parameter vectors (B, p) in the fit's theta parameterisation."""

    fit: Fit
    thetas: np.ndarray

    def params(self) -> dict[str, np.ndarray]:
        """Natural parameters per resample: coefficients exponentiated, exponents as they are."""
        k = len(self.fit.law.coefs)
        values = np.concatenate([np.exp(self.thetas[:, :k]), self.thetas[:, k:]], axis=1)
        return {name: values[:, i] for i, name in enumerate(self.fit.law.params)}

    def intervals(self, level: float = CI_LEVEL) -> dict[str, tuple[float, float]]:
        """Percentile intervals per natural parameter."""
        return {name: percentile_interval(v, level) for name, v in self.params().items()}


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def resample_weights(n_points: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial counts (B, n): each row is one bootstrap resample of the cells."""
    return rng.multinomial(n_points, np.full(n_points, 1.0 / n_points), size=n_resamples).astype(float)


def refit_weighted(fit: Fit, data: LawData, weights: np.ndarray) -> np.ndarray:
    """Every resample's fit, all started from the full-data optimum and refined together."""
    return refine(data, np.tile(fit.theta, (len(weights), 1)), weights)


def bootstrap_fit(fit: Fit, data: LawData, n_resamples: int, rng: np.random.Generator) -> Bootstrap:
    """Bootstrap over cells (points), refitting every resample in one batch."""
    weights = resample_weights(data.n, n_resamples, rng)
    return Bootstrap(fit, refit_weighted(fit, data, weights))
