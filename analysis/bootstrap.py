"""Bootstrap over cells, stratified by design point where every point has cells to redraw, all resamples at once.

A resample redraws, with replacement, the cells (seeds) of each distinct input — each budget of a
budget curve, each (N, D) of a joint law — as many times as it has cells, so the design stays the
one the point fit saw. Drawn from the whole curve instead, 4 budgets × 2 seeds lost a budget in
~38 % of the resamples, which then fitted 3 parameters through 3 budgets or fewer: fits the point
fit refuses. Redrawn within a point, n seeds vary about (n − 1)/n as much as n new seeds would
(half with 2 seeds: "95 %" intervals of budget curves then covered their truth 70–79 % of the time),
so a resample's targets are its cells' own, spread about their point's mean by √(n/(n − 1))
(`widened_targets`): the redraw's mean then varies as the mean of n new seeds does. A point measured
once has nothing to redraw and would stay fixed in every resample, so its cell moves by a seed's
deviation drawn from the other points' (widened alike: `singleton_noise`) — a failed seed at one
budget used to send the whole curve to the unstratified bootstrap, which lost a budget in over half
the resamples and doubled the intervals. Where the points with seeds to redraw say too little about
the seeds' variance (one seed at most points, or seeds that agree), the curve is resampled as a
whole, an unstratified bootstrap (`design_strata`).

Every cell of a task is scored on the same test questions, so redrawing seeds leaves out how far
the scores would move on other questions of the task (with seeds that agree, intervals of zero
width). Where rows store each question's outcome (`score_outcomes`), a resample also redraws the
questions (`question_counts`) — one draw per resample for every curve of the task, so two methods
compared resample by resample were scored on the same redrawn questions — and refits each
resample to its own scores.

A resample is the same points with counts as weights, so every resample can start from the
full-data optimum (it is close) and all of them are refined together by the fitter's batched
Levenberg-Marquardt (`fitting.refine`) instead of B separate grid searches. The close start is not
always in the resample's own best basin, so every resample is also refined from a few starts spread
over the exponents' range, and keeps its lowest optimum (`refit_weighted`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from analysis.fitting import Fit, LawData, input_index, negligible_terms, point_losses, refine, scan, unidentified

CI_LEVEL = 0.95
SPREAD = 3  # starts per exponent for each resample, besides the full-data optimum (`refit_weighted`)
SCREEN = 50  # resamples a spread start is tried on before it is run on all (`refit_weighted`)
LOWER = 1e-3  # a spread start counts where its optimum is 0.1 % lower: another basin, not the same one polished further
MIN_POOLED_DOF = 3  # `design_strata`: the seed degrees of freedom lone points' noise must come from, at the least


@dataclass(frozen=True)
class Bootstrap:
    """Resampled parameter vectors (B, p) in the fit's theta parameterisation."""

    fit: Fit
    thetas: np.ndarray
    x: dict[str, np.ndarray]  # the points' inputs: over them a term must matter for its exponent to mean anything
    questions: int = 0  # test questions each resample redrew (`question_counts`); 0: seeds only
    question_seed: int = 0  # the study seed those draws came from: the base level redraws the same ones

    def params(self) -> dict[str, np.ndarray]:
        """Natural parameters per resample: coefficients exponentiated, exponents as they are."""
        k = len(self.fit.law.coefs)
        values = np.concatenate([np.exp(self.thetas[:, :k]), self.thetas[:, k:]], axis=1)
        return {name: values[:, i] for i, name in enumerate(self.fit.law.params)}

    def unidentified_resamples(self) -> dict[str, np.ndarray]:
        """Per exponent, (B,): True in the resamples where every term carrying it is ~0 over the data."""
        return unidentified(self.fit.law, negligible_terms(self.fit.law, self.params(), self.x))

    def intervals(self, level: float = CI_LEVEL) -> dict[str, tuple[float, float]]:
        """Percentile intervals per natural parameter.

        A resample whose term is ~0 over the data (fitting.negligible_terms) leaves that term's
        exponents arbitrary, so it is left out of their intervals; where more than 1 − level of the
        resamples are such, the exponent could be anything there and has no interval (NaN).
        """
        params = self.params()
        lost = self.unidentified_resamples()
        result = {}
        for name, values in params.items():
            gone = lost.get(name, np.zeros(len(values), dtype=bool))
            result[name] = percentile_interval(values[~gone], level) if gone.mean() <= 1 - level else (np.nan, np.nan)
        return result


def percentile_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def resample_weights(strata: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Counts (B, n): each row one resample that draws every cell's place from the cells of its stratum
    (`strata`: one label per cell), so each stratum keeps its size; one stratum is the plain bootstrap."""
    strata = np.asarray(strata)
    n = len(strata)
    order = np.argsort(strata, kind="stable")
    grouped = strata[order]
    first = np.searchsorted(grouped, grouped, side="left")  # per place: its stratum's first cell in `order`
    size = np.searchsorted(grouped, grouped, side="right") - first
    drawn = order[first + (rng.random((n_resamples, n)) * size).astype(int)]
    flat = (np.arange(n_resamples)[:, None] * n + drawn).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def question_counts(task: str, questions: int, n_resamples: int, seed: int) -> np.ndarray:
    """Counts (B, questions): each row one redraw of the task's test questions with replacement, from a
    stream of the study's seed and the task alone, so every curve of the task gets the same draws."""
    rng = np.random.default_rng([seed, zlib.crc32(f"questions/{task}".encode()), questions])
    drawn = rng.integers(0, questions, size=(n_resamples, questions))
    flat = (np.arange(n_resamples)[:, None] * questions + drawn).ravel()
    return np.bincount(flat, minlength=n_resamples * questions).reshape(n_resamples, questions).astype(float)


def design_strata(data: LawData) -> np.ndarray:
    """The strata `bootstrap_fit` draws within: each cell's design point where every point holds two or more
    cells, or where the points that do give a seed variance to lend the rest (`singleton_noise`): at least
    MIN_POOLED_DOF degrees of freedom, as many as there are lone points, and not all seeds agreeing. Else
    one stratum for the whole curve (see the module docstring): one point's two seeds (1 degree of freedom)
    lent to four lone points gave "95 %" intervals that covered the truth 67 % of the time, and seeds that
    agreed at that point, intervals of zero width."""
    points = input_index(data.x)
    _, counts = np.unique(points, return_counts=True)
    if counts.min() >= 2:
        return points
    lone, dof = int((counts == 1).sum()), int((counts - 1).sum())
    varies = np.any(seed_deviations(data, points) != 0)
    return points if dof >= max(MIN_POOLED_DOF, lone) and varies else np.zeros(len(points), dtype=int)


def seed_deviations(data: LawData, strata: np.ndarray) -> np.ndarray:
    """Per cell, its log target's deviation from its stratum's mean, widened by √(n/(n − 1)) (n the
    stratum's cells), so that each has a seed's variance; 0 for a cell alone in its stratum, and for seeds
    that agree: their mean misses their value by ~1e-17 (scores .17, .22, .29, …), which read as seeds that
    varied and gave a curve whose seeds agreed intervals of zero width (helper-139)."""
    _, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=data.logy) / counts
    widen = np.sqrt(counts / np.maximum(counts - 1, 1))
    return (widen[inverse] * (data.logy - means[inverse])).round(12)


def singleton_noise(data: LawData, strata: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray | None:
    """(B, n) additions to the log targets: for each cell alone at its design point, in each resample, one
    of the other points' `seed_deviations`, so it varies as a new seed of it would; 0 for the rest. None
    where no point is measured once, or none twice (nothing to draw from)."""
    _, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    alone, shared = counts[inverse] == 1, counts[inverse] >= 2
    if not alone.any() or not shared.any():
        return None
    pool = seed_deviations(data, strata)[shared]
    noise = np.zeros((n_resamples, data.n))
    noise[:, alone] = pool[rng.integers(0, len(pool), size=(n_resamples, int(alone.sum())))]
    return noise


def refit_weighted(fit: Fit, data: LawData, weights: np.ndarray, logy: np.ndarray | None = None) -> np.ndarray:
    """Every resample's fit (B, p), to its own log targets `logy` (B, n) where given: refined from the
    full-data optimum and, where it helps, from the fitter's exponent scan at `SPREAD` cells per
    exponent (coefficients fitted to the full data there), keeping each resample's lowest optimum.

    From the optimum alone a resample stayed in its basin: on budget curves that a step at the
    smallest budget and a slow power law with no floor fit about equally well, 5 % of the resamples
    (up to 30 % on one curve) ended ≥ 0.1 % above a lower optimum, and β's interval could shrink to its
    bound, [3, 3] (tests/test_bootstrap.py). A far start converges slowly, so each is first tried on
    `SCREEN` resamples and run on all only where it finds a lower optimum for one of them: a
    well-determined law, whose resamples all share one basin, pays SPREAD^m × `SCREEN` extra resample
    fits (m exponents: 150 for a budget law, 450 for a joint law).
    """
    targets = np.tile(data.logy, (len(weights), 1)) if logy is None else logy
    best = refine(data, np.tile(fit.theta, (len(weights), 1)), weights, logy=logy)
    best_loss = _losses(data, best, weights, targets)
    screen = np.arange(min(SCREEN, len(weights)))
    for start in scan(data, cells=SPREAD)[0]:
        tried = _improve(data, start, weights, targets, best, best_loss, screen)
        if tried.any() and len(weights) > len(screen):
            _improve(data, start, weights, targets, best, best_loss, np.arange(len(screen), len(weights)))
    return best


def _improve(
    data: LawData, start: np.ndarray, weights: np.ndarray, logy: np.ndarray, best: np.ndarray, best_loss: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Refine `rows`' resamples from `start`; where that ends lower, replace their `best` in place. Returns where it did."""
    thetas = refine(data, np.tile(start, (len(rows), 1)), weights[rows], logy=logy[rows])
    loss = _losses(data, thetas, weights[rows], logy[rows])
    lower = loss < best_loss[rows] * (1 - LOWER)
    best[rows[lower]], best_loss[rows[lower]] = thetas[lower], loss[lower]
    return lower


def _losses(data: LawData, thetas: np.ndarray, weights: np.ndarray, logy: np.ndarray) -> np.ndarray:
    return np.einsum("bn,bn->b", weights, point_losses(data, thetas, logy))


@dataclass(frozen=True)
class QuestionDraws:
    """The points' losses on each resample's redrawn questions (B, n), and the draws they came from."""

    losses: np.ndarray
    questions: int
    seed: int


def widened_targets(data: LawData, strata: np.ndarray) -> np.ndarray | None:
    """The log targets with each cell's deviation from its stratum's mean widened by √(n/(n − 1)), n the
    stratum's cells, so that a stratum's redrawn mean varies as much as the mean of n new draws would
    (the plain redraw: (n − 1)/n of that). Only where every stratum is one design point: across points,
    deviations from a shared mean are the curve itself. None where nothing would change."""
    labels, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
    points = input_index(data.x)
    if len(np.unique(np.stack([inverse, points]), axis=1)[0]) != len(labels) or counts.max() < 2:
        return None
    means = np.bincount(inverse, weights=data.logy) / counts
    return means[inverse] + seed_deviations(data, strata)


def bootstrap_fit(
    fit: Fit, data: LawData, n_resamples: int, rng: np.random.Generator, *, strata: np.ndarray | None = None,
    redrawn: QuestionDraws | None = None,
) -> Bootstrap:
    """Bootstrap over cells within each stratum, by default `design_strata` (see the module docstring),
    refitting every resample in one batch: to `widened_targets`, or each to its own targets on its redrawn
    questions, where given, unwidened (the questions' variance they add covered more than the seeds'
    shortfall in simulation, 100 questions and 2 seeds: 98–100 %; with many questions it may not). Either
    way a cell alone at its design point moves by `singleton_noise`."""
    strata = design_strata(data) if strata is None else strata
    weights = resample_weights(strata, n_resamples, rng)
    noise = singleton_noise(data, strata, n_resamples, rng)
    if redrawn is None:
        widened = widened_targets(data, strata)
        targets = None if widened is None else np.tile(widened, (n_resamples, 1))
        if noise is not None:
            targets = noise + (data.logy if targets is None else targets)
        return Bootstrap(fit, refit_weighted(fit, data, weights, targets), data.x)
    targets = np.log(redrawn.losses) + (0.0 if noise is None else noise)
    return Bootstrap(fit, refit_weighted(fit, data, weights, targets), data.x, redrawn.questions, redrawn.seed)
