"""Choosing the next cells of an adaptive sweep: a space-filling design, then variance removed per FLOP.

Both phases are pure functions of the planned cells, the stored rows and the current fits.

1. **Design.** A budget curve loss(D) = E + B·D^-β (one per task × method × model, fitted by
   `analysis.curves`) can be fitted from ok cells over 4 distinct budgets (one more than its
   parameters, as the fitter asks), but its bootstrap interval is trusted only from 6 cells (two
   per parameter). Each curve gets those first, in a space-filling order: the smallest and the largest budget (so the
   crossover search sees the grid's whole range), then interior budgets staggered across model
   sizes so that the models together cover every budget level, then the other seeds. A failed
   cell is simply passed over for the next one in that order. Cells without a budget axis
   (`base`, budget 0) get one seed per model and task: the report's reference level.

2. **Acquisition.** The targets are log10 D\\* for every (task, model, steering method,
   fine-tuning method) — where the fine-tuning curve overtakes the steering curve — and, when
   asked, every curve's exponent β. Each target's uncertainty comes from the bootstrap resamples
   of the fits: per resample, D\\* is where that resample's two curves cross (censored at the end
   of the budget range when they do not, so "no crossover" is an answer with a width too). A
   target is resolved when its 95% percentile interval is narrower than its goal, and so is the
   interval its curves' *design* gives on fresh noise: the same budgets, each cell redrawn around
   the fitted curve with the sweep's pooled noise, its level drawn from what the residuals say of it
   (`fresh_noise_twins`, `PooledNoise.draws`). The stored resamples alone
   judge a design by the noise its cells happened to get: a curve whose few cells sit close to it by
   chance has resamples that barely differ, so its target looked done, got no more cells, and
   repeated that width every round (its resamples are seeded by its cells) — each target's final
   width was the first lucky value it reached (in a simulation 0.125 from 17 cells, where the same
   design under fresh noise gave a median of 0.29). The resamples redraw seeds only, not the test
   questions as the report's do (analysis/bootstrap.py): the questions' noise is the same whatever
   cells run next (only a larger test set shrinks it), so it would only put a floor under every
   width that no choice of cells can move.

   A candidate cell measures one curve's loss at one budget. Each set of resamples — stored, and
   fresh-noise — forms an ensemble: the same resamples give the curve's predicted log-loss f(D) at
   every budget and every target's value, so their sample covariance says how the two move
   together. A target is valued on the ensemble whose interval is the wider, the one that keeps
   it open (the stored resamples of a curve whose cells line up by chance barely vary, and would
   value every further cell of it at nothing; the fresh ones miss a cell the pooled noise does not
   explain). Observing
   y = f(D) + ε, with ε the pooled residual noise of the fits (variance σ²), would remove

       Cov(t, f(D))² / (Var f(D) + σ²)

   from Var(t) in the linear-Gaussian approximation (the Kalman / kriging update). A cell's value
   is that sum over the unresolved targets, each divided by its goal variance (so a log10 D\\*
   and a β are both counted in units of "how far from done"), per FLOP of
   `CostModel.ranking_cost`. A batch is built greedily: take the best cell, apply its update to
   the covariance (so a second cell at the same curve and budget is now worth less, and cells of
   other curves keep their value), repeat. That update is the batch's diversity; no ad-hoc
   spacing rule is needed.

Covariances between different curves are set to zero: their resamples are drawn apart (the fresh
ones share only their σ² draw), so any sample covariance between them is noise (the "localisation"
of ensemble Kalman filters). Every column is winsorised at its 2.5/97.5 percentiles first, so a few
wild resamples do not dominate.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import norm

import pandas as pd

from analysis.bootstrap import CI_LEVEL, Bootstrap, bootstrap_fit, percentile_interval, refit_weighted
from analysis.crossover import GRID_POINTS, budget_curves, lead_from, tolerance
from analysis.fitting import FIT_FAILURES, Fit, LawData, fit_law, min_inputs
from analysis.laws import POWER_D
from analysis.methods import method_kind
from analysis.metrics import HIGHER_IS_BETTER, LOSS_FLOOR, to_loss

from orchestrator.cellcost import CostModel, Planned
from workers.config import ConfigError

CurveKey = tuple[str, str, str]  # (task, method, model id)
METRIC = "score"  # the study's main metric: the crossover is where fine-tuning's score overtakes steering's
# The fitter needs params + 1 points; a bootstrap over cells needs more to mean anything (with 4 points
# for 3 parameters, resampled intervals came out narrow and missed the truth in the simulated world).
DESIGN_POINTS = 2 * len(POWER_D.params)
MIN_BUDGETS = min_inputs(POWER_D)  # distinct budgets the fitter refuses a curve without
# Failed cells after which the design stops walking a curve: a config that fails every cell, or a model
# that does not fit its GPU, would otherwise take its whole sub-grid while no other curve is fitted.
GIVE_UP_FAILURES = DESIGN_POINTS
Z = float(norm.ppf(0.5 + CI_LEVEL / 2))  # a normal interval at the bootstrap's level is 2·Z·sd wide


def curve_key(cell: Planned) -> CurveKey:
    return (cell.config.task, cell.config.method, cell.config.model.id)


def label(key: CurveKey) -> str:
    return "/".join(key)


@dataclass(frozen=True)
class Choice:
    """One cell picked for the next batch, with why."""

    cell: Planned
    phase: str  # "design" | "acquisition"
    reason: str
    flops: float  # expected post-training FLOPs
    value: float  # goal variances removed per ranking FLOP (NaN in the design phase)


@dataclass(frozen=True)
class CurveFit:
    """One budget curve loss(D) = E + B·D^-β fitted to its stored ok cells, with bootstrap resamples.

    The same law, loss transform, exclusions and fitter as `analysis.curves.fit_group` uses for a
    budget curve; built here from `analysis.fitting` directly so that a round does not also fit the
    joint (N, D) laws, which the loop never reads. Its resamples always draw cells from the whole
    curve, where the report's redraw within each budget once every budget has two or more seeds: the
    loop measures one seed per budget first and adds seeds where they narrow an interval, and its
    widths must stay comparable from round to round as the design fills in.
    """

    key: CurveKey
    d: np.ndarray
    loss: np.ndarray
    fit: Fit
    boot: Bootstrap
    measured: np.ndarray  # the metric as stored (the loss is floored: a score of 1 would come back as 0.999)


def fit_curve(key: CurveKey, rows: pd.DataFrame, bootstrap: int, rng: np.random.Generator) -> CurveFit | None:
    """The curve `key` fitted to its rows of `rows`; None when they cannot support it yet."""
    task, method, model = key
    usable = rows[(rows["task"] == task) & (rows["method"] == method) & (rows["model"] == model) & (rows["status"] == "ok")]
    usable = usable[np.isfinite(usable[METRIC].astype(float)) & (usable["budget"].astype(float) > 0)]
    measured = usable[METRIC].to_numpy(float)
    d, loss = usable["budget"].to_numpy(float), to_loss(measured, METRIC)
    try:
        data = LawData.build(POWER_D, {"D": d}, loss)
        fit = fit_law(data)
        return CurveFit(key, d, loss, fit, bootstrap_fit(fit, data, bootstrap, rng, strata=np.zeros(data.n)), measured)
    except FIT_FAILURES:  # as fit_group: the curve waits for more cells
        return None


def check_grid(cells: Sequence[Planned], exponent_goal: float | None = None) -> None:
    """Refuse grids whose curves could never be fitted (every curve needs DESIGN_POINTS cells over
    MIN_BUDGETS budgets), and grids with nothing to pin down: without an exponent goal, the targets are
    crossovers, which need a steering and a fine-tuning curve of one task and model over shared budgets."""
    curves = curves_of(cells)
    short = sorted({k[1] for k, group in curves.items() if not fittable(group)})
    if short:
        raise ConfigError(
            f"an adaptive sweep fits loss(D) per task × method × model, which needs at least {DESIGN_POINTS} cells "
            f"over {MIN_BUDGETS} distinct budgets > 0; not so for: {', '.join(short)} (add budgets or seeds)"
        )
    ranges = {key: [c.config.budget for c in group] for key, group in curves.items()}
    if exponent_goal is None and not any(shared_range(ranges[steer], ranges[tune]) for steer, tune in curve_pairs(ranges)):
        raise ConfigError(
            "an adaptive sweep without --target-exponent-width narrows crossovers D*, which need a steering and a "
            "fine-tuning method on the same task and model over overlapping budget ranges; this grid has none "
            "(add such a pair, or give --target-exponent-width)"
        )


def curve_pairs(curves: Mapping[CurveKey, object]) -> list[tuple[CurveKey, CurveKey]]:
    """(steering curve, fine-tuning curve) of one task and model: the pairs whose crossover is a target."""
    return [(steer, tune) for steer in curves for tune in curves
            if steer[0::2] == tune[0::2] and method_kind(steer[1]) == "steering" and method_kind(tune[1]) == "finetuning"]  # fmt: skip


def shared_range(steer_budgets: Sequence[float], tune_budgets: Sequence[float]) -> tuple[float, float] | None:
    """The budgets both curves span, where their crossover is searched; None when it is a point or empty
    (a crossover there would be clipped to one budget, a zero-width interval that says nothing)."""
    low, high = max(min(steer_budgets), min(tune_budgets)), min(max(steer_budgets), max(tune_budgets))
    return (low, high) if low < high else None


def fittable(cells: Sequence[Planned]) -> bool:
    return len(cells) >= DESIGN_POINTS and len({c.config.budget for c in cells}) >= MIN_BUDGETS


def curves_of(cells: Sequence[Planned]) -> dict[CurveKey, list[Planned]]:
    """The cells of every budget curve (budget > 0), in grid order."""
    curves: dict[CurveKey, list[Planned]] = defaultdict(list)
    for cell in cells:
        if cell.config.budget > 0:
            curves[curve_key(cell)].append(cell)
    return dict(curves)


def design_order(cells: Sequence[Planned], rank: float) -> list[Planned]:
    """A curve's cells as the design takes them: range ends, staggered interior, the rest; seed by seed.

    `rank` in [0, 1) is the model's place among the sweep's models: with k = DESIGN_POINTS − 2 interior
    picks, model i of n takes the interior budgets at fractions (j + (i + 1/2)/n)/k, j = 0..k−1, so
    the n models together cover n·k interior levels (all of them, when there are that few).
    """
    budgets = sorted({c.config.budget for c in cells})
    interior = budgets[1:-1]
    k = DESIGN_POINTS - 2
    staggered = [interior[int((j + rank) / k * len(interior))] for j in range(k)] if interior else []
    preferred = list(dict.fromkeys([budgets[0], budgets[-1], *staggered, *interior]))
    seeds = sorted({c.config.seed for c in cells})
    return sorted(cells, key=lambda c: (seeds.index(c.config.seed), preferred.index(c.config.budget)))


def given_up(cells: Sequence[Planned], status: Mapping[str, str]) -> dict[CurveKey, int]:
    """Curves the design no longer walks, with their failed cells: GIVE_UP_FAILURES or more failed before
    the curve had its DESIGN_POINTS ok cells (one that has them is fitted, and failures later are its cells' own)."""
    given = {}
    for key, group in curves_of(cells).items():
        outcomes = [status.get(c.cell_id) for c in group]
        if outcomes.count("failed") >= GIVE_UP_FAILURES and outcomes.count("ok") < DESIGN_POINTS:
            given[key] = outcomes.count("failed")
    return given


def design_choices(cells: Sequence[Planned], status: Mapping[str, str], cost: CostModel, flops_left: float = float("inf")) -> list[Choice]:
    """Cells still missing from the design (see the module docstring); empty once every curve can be
    fitted or has been given up (`given_up`). Curves take turns, one cell each, so that a cell or
    compute budget too small for the whole design still spreads it over every curve. A cell costing more
    than `flops_left` is passed over for the next in its curve's order (a curve whose top budgets the
    budget cannot pay for is designed on the budgets it can, where they are MIN_BUDGETS or more)."""
    choices = []
    references: dict[CurveKey, list[Planned]] = defaultdict(list)
    for cell in cells:
        if cell.config.budget == 0:
            references[curve_key(cell)].append(cell)
    for key, group in references.items():
        left = [c for c in group if c.cell_id not in status]  # a failed seed is passed over for the next, as on a curve
        if left and not any(status.get(c.cell_id) == "ok" for c in group):
            cell = min(left, key=lambda c: c.config.seed)
            reason = f"reference level: {label(key)} has no budget axis; one cell per model and task"
            choices.append(Choice(cell, "design", reason, cost.post_train(cell.config), float("nan")))
    models = list(dict.fromkeys(c.config.model.id for c in cells))
    abandoned = given_up(cells, status)
    per_curve = []
    for key, group in curves_of(cells).items():
        if key in abandoned:
            continue
        ok = [c for c in group if status.get(c.cell_id) == "ok"]
        n_ok, budgets = len(ok), {c.config.budget for c in ok}
        stored = f"{n_ok} ok cells over {len(budgets)} budgets"  # the reasons count the cells chosen before them apart
        missing = []
        for cell in design_order(group, (models.index(key[2]) + 0.5) / len(models)):
            if n_ok >= DESIGN_POINTS and len(budgets) >= MIN_BUDGETS:
                break
            if cell.cell_id in status or cost.post_train(cell.config) > flops_left:
                continue
            chosen = f" (+{len(missing)} chosen before this one)" if missing else ""
            reason = (
                f"design: {label(key)} has {stored}{chosen}; its curve needs {DESIGN_POINTS} "
                f"over {MIN_BUDGETS} before its bootstrap is trusted (order: range ends, staggered interior, more seeds)"
            )
            missing.append(Choice(cell, "design", reason, cost.post_train(cell.config), float("nan")))
            n_ok, budgets = n_ok + 1, budgets | {cell.config.budget}
        if len(budgets) < MIN_BUDGETS:  # even with all of them the fitter would refuse the curve: none is bought (more seeds
            missing = []  # at the 2 budgets `flops_left` paid for were, and the run then said the design could not be finished)
        per_curve.append(missing)
    turns = max(map(len, per_curve), default=0)
    return choices + [missing[turn] for turn in range(turns) for missing in per_curve if turn < len(missing)]


@dataclass(frozen=True)
class Target:
    """A quantity the sweep should pin down, as bootstrap samples, and the interval width that is enough."""

    name: str
    unit: str  # "log10 D*" or "beta"
    curves: tuple[CurveKey, ...]
    samples: np.ndarray  # one per stored resample of its curves (NaN where an exponent is unidentified)
    goal: float
    note: str = ""
    fresh: np.ndarray | None = None  # one per fresh-noise resample of its curves (`on_fresh_noise`); None: not drawn

    @property
    def interval(self) -> tuple[float, float]:
        return percentile_interval(self.samples)

    @property
    def width(self) -> float:
        return _width(self.samples)

    @property
    def fresh_width(self) -> float | None:
        """The width its curves' stored design gives on fresh noise; inf where the fresh resamples lose it (an
        exponent unidentified in more than 1 − level of them, as `targets_from` would drop it)."""
        if self.fresh is None:
            return None
        return float("inf") if np.isnan(self.fresh).mean() > 1 - CI_LEVEL else _width(self.fresh)

    @property
    def resolved(self) -> bool:
        """Narrower than the goal on the stored data and, where drawn, on fresh noise around the same design."""
        fresh = self.fresh_width
        return bool(self.width <= self.goal and (fresh is None or fresh <= self.goal))

    def record(self) -> dict[str, object]:
        lo, hi = self.interval
        return {"target": self.name, "unit": self.unit, "lo": lo, "hi": hi, "width": self.width, "fresh_width": self.fresh_width,
                "goal": self.goal, "resolved": self.resolved, "note": self.note}  # fmt: skip

    def describe(self) -> str:
        lo, hi = self.interval
        mark = "done" if self.resolved else "open"
        budgets = f" (D* {10**lo:.3g} to {10**hi:.3g} examples)" if self.unit == "log10 D*" else ""  # what [0.602, 2.11] means
        fresh = "" if self.fresh_width is None else f", {self.fresh_width:.3g} on fresh noise"
        return f"{self.unit} {self.name}: [{lo:.3g}, {hi:.3g}]{budgets} width {self.width:.3g}{fresh} (goal {self.goal:.3g}, {mark}){self.note}"


def _width(samples: np.ndarray) -> float:
    lo, hi = percentile_interval(samples)
    return hi - lo


def crossover_samples(steer: CurveFit, tune: CurveFit) -> tuple[np.ndarray, float]:
    """log10 D* per bootstrap resample, on the measured budget range as `analysis.crossover` searches it,
    and the share of resamples that cross inside it.

    D* is where fine-tuning goes ahead to stay (`lead_from`, as the report finds it): a resample in which
    it leads throughout is censored at the smallest budget, one in which it is behind at the largest
    (steering overtaking included) at the largest, and so is a resample in which the two are tied
    throughout: fine-tuning never goes ahead there either. (Put at the end its sub-tolerance advantage
    pointed to, tied resamples split between the two ends and a tie never resolved.) The report's
    interval leaves tied resamples out and calls a mostly tied pair "tied"; here they count, so such a
    target resolves at the largest budget.
    """
    d_min, d_max = max(steer.d.min(), tune.d.min()), min(steer.d.max(), tune.d.max())
    d = np.geomspace(d_min, d_max, GRID_POINTS)
    sign = 1.0 if HIGHER_IS_BETTER[METRIC] else -1.0
    advantage = sign * (budget_curves(tune.boot.params(), d, METRIC) - budget_curves(steer.boot.params(), d, METRIC))
    lead = lead_from(advantage, d, tolerance(np.concatenate([steer.measured, tune.measured])))  # as the report judges a lead: apart by more than half a step
    censored = np.where(np.isnan(lead), d_max, np.clip(lead, d_min, d_max))
    return np.log10(censored), float(np.mean(np.isfinite(lead)))


def targets_from(fits: Mapping[CurveKey, CurveFit], crossover_goal: float | None, exponent_goal: float | None) -> list[Target]:
    """Every steering × fine-tuning pair of fitted curves over shared budgets, and (when asked) every
    curve's exponent where it is identified."""
    targets = []
    if crossover_goal is not None:
        for steer_key, tune_key in curve_pairs(fits):
            steer, tune = fits[steer_key], fits[tune_key]
            if shared_range(steer.d, tune.d) is None:  # measured budgets that do not overlap: no crossover to narrow
                continue
            samples, share = crossover_samples(steer, tune)
            (task, steering, model), tuning = steer_key, tune_key[1]
            note = f"; {share:.0%} of resamples cross inside the range"
            targets.append(Target(f"{task}/{model} {steering}->{tuning}", "log10 D*", (steer_key, tune_key), samples, crossover_goal, note))
    if exponent_goal is not None:
        for key, fit in fits.items():
            # As the report's interval (Bootstrap.intervals): a curve where more than 1 − level of the resamples
            # leave β unidentified has no exponent to narrow.
            beta = exponent_samples(fit)
            lost = np.isnan(beta).mean()
            if lost <= 1 - CI_LEVEL:
                note = f"; {lost:.0%} of resamples leave it unidentified" if lost else ""
                targets.append(Target(label(key), "beta", (key,), beta, exponent_goal, note))
    return targets


def unidentified_exponents(fits: Mapping[CurveKey, CurveFit]) -> dict[CurveKey, float]:
    """Curves whose exponent is no target (`targets_from`): the share of their resamples that leave it unidentified."""
    shares = {key: float(np.isnan(exponent_samples(fit)).mean()) for key, fit in fits.items()}
    return {key: share for key, share in shares.items() if share > 1 - CI_LEVEL}


def exponent_samples(fit: CurveFit) -> np.ndarray:
    """β per resample, NaN where its B·D^-β term is ~0 and leaves β arbitrary (as the report's interval leaves those
    out): NaN, not dropped, so the samples stay aligned with the curve's resamples."""
    beta = fit.boot.params()["beta"]
    return np.where(fit.boot.unidentified_resamples().get("beta", np.zeros(len(beta), dtype=bool)), np.nan, beta)


def fresh_noise_twins(
    fits: Mapping[CurveKey, CurveFit], noise: PooledNoise, n_resamples: int, seed: int, *, confirming: bool = False
) -> dict[CurveKey, CurveFit]:
    """The curves with their resamples drawn anew around their fits: in resample b every cell is its fitted curve at
    its stored budget times exp(N(0, σ²_b)), each curve refitted; σ²_b is drawn from what the pooled residuals say
    of the noise (`PooledNoise.draws`, one per resample for every curve: the crossover of two curves meets one σ).

    Their spread is what the stored design gives, not what its cells happened to give (the module docstring); the
    σ² draws keep a pool of few residuals that happen to be small from passing as a quiet sweep. Seeded by `seed`,
    the curve and its points, so a rerun on the same rows draws the same resamples; `confirming` (the stop's check
    on more resamples) draws from streams of its own, as `adaptive.fit_budget_curves` does.
    """
    tail = [1] if confirming else []
    sd = np.sqrt(noise.draws(n_resamples, np.random.default_rng([seed, 3, *tail])))[:, None]
    twins = {}
    for key, curve in fits.items():
        points = zlib.crc32(np.concatenate([curve.d, curve.loss]).tobytes())
        rng = np.random.default_rng([seed, 2, zlib.crc32(label(key).encode()), points, *tail])
        data = LawData.build(POWER_D, {"D": curve.d}, curve.loss)
        logy = np.log(curve.fit.predict({"D": curve.d})) + sd * rng.standard_normal((n_resamples, data.n))
        thetas = refit_weighted(curve.fit, data, np.ones((n_resamples, data.n)), logy)
        twins[key] = replace(curve, boot=Bootstrap(curve.fit, thetas, data.x))
    return twins


def on_fresh_noise(targets: Sequence[Target], twins: Mapping[CurveKey, CurveFit]) -> list[Target]:
    """The targets with their values on their curves' fresh-noise resamples (`fresh_noise_twins`)."""
    out = []
    for target in targets:
        if target.unit == "beta":
            fresh = exponent_samples(twins[target.curves[0]])
        else:
            fresh, _ = crossover_samples(*(twins[key] for key in target.curves))
        out.append(replace(target, fresh=fresh))
    return out


@dataclass(frozen=True)
class PooledNoise:
    """One cell's log-loss variance around its curve, pooled over the curves (`pooled_noise`), and its degrees of freedom."""

    variance: float
    dof: int  # 0: no curve has more measured cells than parameters, and `variance` is a prior

    def draws(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n variances from the posterior of σ² given the residuals (scaled inverse χ², flat prior on log σ): an
        estimate from 6 residuals is under 0.7 of the true sd in ~18 % of draws, and the fresh-noise widths scale with
        it. At least 3 degrees of freedom are assumed (with 1 or 2 the posterior's mean is infinite, and no design
        would ever look narrow); the Huber fits' residuals already put the estimate a little high (~1.3× σ² at 3)."""
        if self.dof <= 0:
            return np.full(n, self.variance)
        dof = max(self.dof, 3)
        return dof * self.variance / rng.chisquare(dof, n)


def pooled_noise(fits: Mapping[CurveKey, CurveFit]) -> PooledNoise:
    """Pooled variance of one cell's log-loss around its curve: Σ residual² / Σ (points − parameters).

    Not a median-based estimate: the Huber fit (δ = 1e-3, nearly least absolute deviations) passes
    exactly through as many points as it has parameters, so most residuals of a small curve are 0.
    A curve with cells at the loss floor (a perfect score: its loss is the floor, not a measurement) counts the
    residuals of its other cells around a curve fitted to them alone: in log-loss a floored cell sits ~5 from its
    curve and pulls the fit off the others, and one raised the pooled sd of every curve 15-fold (three: 40-fold, when
    only the floored cells themselves were left out). With no residual at all, the variance is a prior (dof 0).
    """
    squares, dof = 0.0, 0
    for curve in fits.values():
        residuals = _measured_residuals(curve)
        squares += float(np.sum(residuals**2))
        dof += max(len(residuals) - len(POWER_D.params), 0)
    return PooledNoise(max(squares / dof, 1e-8), dof) if dof > 0 else PooledNoise(1e-2, 0)


def _measured_residuals(curve: CurveFit) -> np.ndarray:
    """Log residuals of a curve's cells above the loss floor, around its fit (refitted to them where it had floored
    cells); none where those cells cannot support a fit of their own."""
    measured = curve.loss > LOSS_FLOOR
    fit = curve.fit
    if not measured.all():
        try:  # LawData refuses fewer than MIN_BUDGETS distinct budgets
            fit = fit_law(LawData.build(POWER_D, {"D": curve.d[measured]}, curve.loss[measured]))
        except FIT_FAILURES:  # as fit_curve: no fit, no residuals
            return np.zeros(0)
    return np.log(fit.predict({"D": curve.d[measured]})) - np.log(curve.loss[measured])


def _filled(x: np.ndarray) -> np.ndarray:
    """NaN (an unidentified exponent) as the column's median; a column of NaN alone as zeros: no variance, no value."""
    return np.zeros_like(x) if np.isnan(x).all() else np.nan_to_num(x, nan=np.nanmedian(x))


def _winsorise(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [2.5, 97.5])
    return np.clip(x, lo, hi)


def predicted_log_loss(fit: CurveFit, budget: float) -> np.ndarray:
    p = fit.boot.params()
    return np.log(p["E"] + p["B"] * float(budget) ** -p["beta"])


def acquisition_choices(
    targets: Sequence[Target], fits: Mapping[CurveKey, CurveFit], twins: Mapping[CurveKey, CurveFit], candidates: Sequence[Planned],
    cost: CostModel, noise: float, *, size: int, flops_left: float,
) -> list[Choice]:  # fmt: skip
    """Up to `size` cells, greedily by goal variances removed per FLOP (see the module docstring).

    Each target is valued on the ensemble whose interval is the wider: its stored resamples (beside the predictions
    of `fits`) or its fresh-noise ones (beside those of `twins`, the curves' `fresh_noise_twins`, from which its
    `fresh` samples come). A target open on a design that lined up by chance is narrowed by the cells its design
    lacks; one open on a cell the pooled noise does not explain (an outlier, a noisier curve), by the cells that pin
    its own curve down — on the other ensemble it would look done, and no cell would be worth anything to it.
    """
    if any(t.fresh is None for t in targets):
        raise ValueError("acquisition reads the targets on fresh noise too: pass them through on_fresh_noise first")
    slots: dict[tuple[CurveKey, int], list[Planned]] = defaultdict(list)  # (curve, budget) -> cells, seed order
    for cell in sorted(candidates, key=lambda c: c.config.seed):
        if curve_key(cell) in twins:
            slots[(curve_key(cell), cell.config.budget)].append(cell)
    if not targets or not slots:
        return []
    owners = [set(t.curves) for t in targets] + [{k} for k, _ in slots]
    index = {key: i for i, key in enumerate(twins)}
    incidence = np.zeros((len(owners), len(index)))
    for i, curves in enumerate(owners):
        incidence[i, [index[k] for k in curves]] = 1.0
    shared = (incidence @ incidence.T) > 0

    def covariance(target_columns: list[np.ndarray], curves: Mapping[CurveKey, CurveFit]) -> np.ndarray:
        columns = target_columns + [predicted_log_loss(curves[k], b) for k, b in slots]
        return np.cov(np.column_stack([_winsorise(_filled(c)) for c in columns]), rowvar=False) * shared

    n_targets = len(targets)
    ensembles = [covariance([t.samples for t in targets], fits), covariance([t.fresh for t in targets], twins)]
    weight = np.array([0.0 if t.resolved else (2 * Z / t.goal) ** 2 for t in targets])
    # Widths are each target's own (percentile) widths, narrowed as its variance is: the normal width 2·Z·sd of a
    # skewed or winsorised sample differs from it, and the two numbers would disagree in the log.
    widths = [np.array([t.width for t in targets]), np.array([_width(t.fresh) for t in targets])]
    per_sd = [np.divide(w, np.sqrt(np.diag(cov)[:n_targets]), out=np.zeros(n_targets), where=np.diag(cov)[:n_targets] > 0)
              for w, cov in zip(widths, ensembles)]  # fmt: skip

    def projected() -> tuple[np.ndarray, np.ndarray]:
        """Each target's width as the cells chosen so far narrow it, and whether its stored one is the wider (the
        ensemble it is valued on, looked at again after every choice)."""
        stored, fresh = (sd * np.sqrt(np.maximum(np.diag(cov)[:n_targets], 0.0)) for sd, cov in zip(per_sd, ensembles))
        return np.maximum(stored, fresh), stored >= fresh

    def removed_by(col: int, on_stored: np.ndarray) -> np.ndarray:
        """Each target's variance removed by a cell of slot column `col`, on its own ensemble."""
        stored, fresh = (cov[:n_targets, col] ** 2 / (cov[col, col] + noise) for cov in ensembles)
        return np.where(on_stored, stored, fresh)

    slot_keys = list(slots)
    choices: list[Choice] = []
    while len(choices) < size:
        width, on_stored = projected()
        best: tuple[float, int] | None = None
        for j, key in enumerate(slot_keys):
            if not slots[key] or cost.post_train(slots[key][0].config) > flops_left:
                continue
            value = (weight * removed_by(n_targets + j, on_stored)).sum() / cost.ranking_cost(slots[key][0].config)
            if value > 0 and (best is None or value > best[0]):
                best = (value, j)
        if best is None:
            break
        value, j = best
        col = n_targets + j
        cell = slots[slot_keys[j]].pop(0)
        removed = removed_by(col, on_stored)
        variance = np.where(on_stored, np.diag(ensembles[0])[:n_targets], np.diag(ensembles[1])[:n_targets])
        narrowed = np.where(on_stored, per_sd[0], per_sd[1]) * np.sqrt(np.maximum(variance - removed, 0.0))
        helped = [i for i in np.argsort(-weight * removed) if weight[i] > 0 and removed[i] > 0][:2]
        effects = "; ".join(
            f"{targets[i].unit} {targets[i].name} width{'' if on_stored[i] else ' on fresh noise'} ≈{width[i]:.3g}→"
            f"{narrowed[i]:.3g} (goal {targets[i].goal:.3g})"
            for i in helped
        )
        flops = cost.post_train(cell.config)
        reason = f"expected to narrow {effects}; {value:.3g} goal-variances per FLOP"
        choices.append(Choice(cell, "acquisition", reason, flops, value))
        flops_left -= flops
        ensembles = [cov - np.outer(cov[:, col], cov[col, :]) / (cov[col, col] + noise) for cov in ensembles]
    return choices
