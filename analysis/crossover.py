"""The crossover budget D*(N): where a fine-tuning curve overtakes a steering curve (or the reverse).

Only the measured budget range is searched — a power law extrapolated past the data says little
about where two methods cross — so "no crossover within the measured range" is a real answer.
The CI comes from evaluating both fitted curves for every bootstrap resample at once.

The two curves count as apart only where they differ by more than the cells can resolve: half the
step the measured metric moves in (a score over 40 test questions moves in steps of 1/40). Seeds that
score alike give the bootstrap nothing to redraw, so without this a fitted difference of a fraction
of one question was stated as a crossover that every resample agreed on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from analysis.bootstrap import CI_LEVEL, percentile_interval
from analysis.capability import Axis, family_of, split_by_family
from analysis.curves import LawFit
from analysis.methods import method_kind
from analysis.metrics import HIGHER_IS_BETTER, from_loss, step, whole_percent

GRID_POINTS = 512
MIN_TREND_MODELS = 3  # models with a finite D* before a trend is stated or drawn: a line through two fits them exactly


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
    d_star: float  # where the curves swap places; NaN when they do not within [d_min, d_max]
    d_star_lo: float  # over every resample not tied throughout: −inf where the winner leads throughout (D* below d_min),
    d_star_hi: float  # +inf where it is behind at d_max (D* above it, if anywhere)
    share: float  # fraction of bootstrap resamples with the same outcome (near one half: a coin flip)
    outcome: str  # one of OUTCOMES, "no_overlap" (the two methods share no budget range) or "not_finite"
    verdict: str
    d_star_2: float = np.nan  # "crosses_twice": where they swap back (d_star is the first crossing)
    tolerance: float = np.nan  # differences up to this (metric units) are within the cells' resolution (`tolerance`)
    disputed: str = ""  # why the outcome is not a finding: the measured means do not show it (`measured_check`), or a curve's law cannot follow its cells
    idle: bool = False  # both methods left the model as it was in most cells both measured (`unchanged.idle_pairs`)
    # the outcome more than half the resamples give, and their share, where it is not `outcome` ("tied (6 %)" alone hid
    # that 80 % of resamples put fine-tuning ahead); "" where no other outcome has a majority (or none were drawn)
    resampled_outcome: str = ""
    resampled_share: float = np.nan
    overtakes: np.ndarray = field(default_factory=lambda: np.array([]), repr=False, compare=False)  # per resample: D*
    # where fine-tuning overtakes, NaN where it does not (what the trend's interval resamples)

    def record(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "overtakes"}

    def interval(self) -> str:
        """D*'s interval as '[lo, hi]', an end outside the measured range as the side it is on
        ('< d_min', '> d_max', once if both ends are); '' without one."""
        if np.isnan(self.d_star_lo):
            return ""

        def end(value: float) -> str:
            # the range's ends are measured budgets, printed whole (1024, not 1.02e+03)
            return f"< {self.d_min:g}" if value < self.d_min else f"> {self.d_max:g}" if value > self.d_max else f"{value:.3g}"

        lo, hi = end(self.d_star_lo), end(self.d_star_hi)
        return f"[{lo}]" if lo == hi and not np.isfinite(self.d_star_lo) else f"[{lo}, {hi}]"

    def claim(self) -> str:
        """The verdict less its dispute (its last clause, `disputed`), which a line prints after D*'s interval: the
        interval after it read as the Welch interval's."""
        return self.verdict.removesuffix(f"; {self.disputed}") if self.disputed else self.verdict

    def resampled_note(self) -> str:
        """'; most resamples (80%): lora ahead throughout' where the resamples' commonest outcome is not the fit's, else ''."""
        if not self.resampled_outcome:
            return ""
        said = {"crosses": f"{self.finetuning} overtakes {self.steering}", "steering_overtakes": f"{self.steering} overtakes {self.finetuning}",
                "finetuning_ahead": f"{self.finetuning} ahead throughout", "steering_ahead": f"{self.steering} ahead throughout",
                "tied": "tied", "crosses_twice": "the curves cross twice"}[self.resampled_outcome]  # fmt: skip
        return f"; most resamples ({whole_percent(self.resampled_share)}%): {said}"

    def unresampled_note(self) -> str:
        """What a reader must know of a verdict no resample checked (`--bootstrap 0`); '' otherwise, and for outcomes that
        are no verdict at all (no_overlap, not_finite)."""
        return " (no resamples: not a finding)" if not np.isfinite(self.share) and self.outcome in OUTCOMES else ""


def budget_curves(params: dict[str, np.ndarray], d: np.ndarray, metric: str) -> np.ndarray:
    """Metric of the budget law for each parameter set (rows) at each budget in `d` (columns)."""
    e, b, beta = (np.atleast_1d(params[name])[:, None] for name in ("E", "B", "beta"))
    return from_loss(e + b * d[None, :] ** -beta, metric)


MEANS_DISPUTE = "the measured means do not show it: "  # how `Crossover.disputed` begins where they do not
OUTCOMES = ("crosses", "steering_overtakes", "finetuning_ahead", "steering_ahead", "tied", "crosses_twice")  # codes 0..5 of `outcomes` (-1: not finite)
TIE = 1e-6  # in metric units: the least difference that counts where the metric has no step (an NLL, say)


def tolerance(values: np.ndarray) -> float:
    """The largest difference, in metric units, that the measured `values` cannot resolve: half their step
    (metrics.step; rounded to it, two values closer than that read the same), at least TIE."""
    return max(TIE, step(values) / 2)


def _ahead(advantage: np.ndarray, tol: float) -> np.ndarray:
    """Per point: whether fine-tuning counts as ahead. Where the two differ by more than `tol`, the side that
    leads; where they are level (within it), the side of the decided points around, so a level stretch
    neither starts nor ends a lead, except between points decided opposite ways, where the sign of the
    advantage places the change of side. A row with no decided point is all False (`outcomes`: tied)."""
    side = np.where(advantage > tol, 1, np.where(advantage < -tol, -1, 0))
    rows, at = np.arange(len(side))[:, None], np.arange(side.shape[1])
    decided = side != 0
    last = np.maximum.accumulate(np.where(decided, at, -1), axis=1)  # the decided point at or before each point
    first = side.shape[1] - 1 - np.maximum.accumulate(np.where(decided[:, ::-1], at, -1), axis=1)[:, ::-1]  # at or after
    prev = np.where(last >= 0, side[rows, np.maximum(last, 0)], 0)
    next_ = np.where(first < side.shape[1], side[rows, np.minimum(first, side.shape[1] - 1)], 0)
    filled = np.select([decided, (prev == next_) | (next_ == 0), prev == 0], [side, prev, next_], default=np.where(advantage >= 0, 1, -1))
    return filled > 0


def _flip(advantage: np.ndarray, ahead: np.ndarray, d: np.ndarray, last: bool = True) -> np.ndarray:
    """Per row: the budget of the last (or first) change of `ahead`, interpolated linearly in log D where the
    advantage crosses 0; NaN without one."""
    flips = ahead[:, :-1] != ahead[:, 1:]
    i = flips.shape[1] - 1 - np.argmax(flips[:, ::-1], axis=1) if last else np.argmax(flips, axis=1)
    rows = np.arange(len(advantage))
    a0, a1 = advantage[rows, i], advantage[rows, i + 1]
    logd = np.log(d)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # rows without a flip are masked out below
        d_star = np.exp(logd[i] + a0 / (a0 - a1) * (logd[i + 1] - logd[i]))
    return np.where(flips.any(axis=1), d_star, np.nan)


def outcomes(advantage: np.ndarray, d: np.ndarray, tol: float = TIE) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `advantage` (fine-tuning minus steering, in "better" units, over budgets `d`): the
    outcome (an index into OUTCOMES) and the crossing budget, NaN unless the two curves swap places.

    Behind at the smallest budget and ahead at the largest, swapping places once, is "crosses"
    (fine-tuning overtakes), the reverse is "steering_overtakes"; D* is that change of sign,
    interpolated linearly in log D. Two curves E + B·D^-β can also swap places twice (one leads in
    the middle of the range only): "crosses_twice", whatever the ends say, with no single D*.
    Sides are taken where the curves differ by more than `tol` (`_ahead`): curves within it over the
    whole range are "tied", and a stretch within it (at an end, say) does not change the outcome.
    """
    ahead = _ahead(advantage, tol)
    start, end = ahead[:, 0], ahead[:, -1]
    tied = (np.abs(advantage) <= tol).all(axis=1)
    broken = ~np.isfinite(advantage).all(axis=1)  # a resample whose fit went non-finite agrees with no outcome
    twice = (ahead[:, :-1] != ahead[:, 1:]).sum(axis=1) >= 2
    code = np.select([broken, tied, twice, ~start & end, start & ~end, start & end], [-1, 4, 5, 0, 1, 2], default=3)
    return code, np.where((code == 0) | (code == 1), _flip(advantage, ahead, d), np.nan)


def lead_from(advantage: np.ndarray, d: np.ndarray, tol: float = TIE) -> np.ndarray:
    """Per row: the budget from which the side `advantage` favours stays ahead to the end of the range,
    censored at the ends: −inf when it is ahead throughout (D* below the range), +inf when it is behind
    at the largest budget (D* above it, if anywhere); NaN where the row is tied or not finite. Ahead
    and behind as `outcomes` takes them with the same `tol`.

    Every resample gets a value on one scale, so an interval over them counts the resamples that do
    not cross inside the range instead of leaving them out.
    """
    ahead = _ahead(advantage, tol)
    censored = np.select([~ahead[:, -1], ahead.all(axis=1)], [np.inf, -np.inf], default=_flip(advantage, ahead, d))
    void = ~np.isfinite(advantage).all(axis=1) | (np.abs(advantage) <= tol).all(axis=1)
    return np.where(void, np.nan, censored)


def censored_interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of values that may be ±inf (censored at an end of the range): the order
    statistics outward of each tail, which an infinite neighbour cannot turn into NaN as interpolation would."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail, method="lower")), float(np.percentile(values, 100 - tail, method="higher"))


def _seed_spread(fit: LawFit) -> tuple[float, int]:
    """The variance of a curve's cells about their budget's mean, pooled over its budgets (the pure error of
    a lack-of-fit test), and its degrees of freedom: with two seeds a budget alone has one."""
    values = pd.Series(fit.points.value)
    residuals = (values - values.groupby(fit.points.d).transform("mean")).round(12)  # equal seeds leave ~1e-16, not 0
    df = len(values) - len(np.unique(fit.points.d))
    return (float((residuals**2).sum()) / df if df > 0 else np.nan), df


def _unchecked(steer: LawFit, tune: LawFit) -> str:
    """Why the means measured cannot be held against the laws ('' where they can): with one seed a budget there is no
    noise to judge a contradiction against; seeds that agree exactly carry none of the questions' noise, which every
    cell shares."""
    spreads = [_seed_spread(f) for f in (tune, steer)]
    if any(dof < 1 for _, dof in spreads):
        return "one seed a budget"
    if all(variance == 0 for variance, _ in spreads):
        return "the seeds agree exactly"
    return ""


def _mean_lead(steer: LawFit, tune: LawFit, budget: float, sign: float) -> float:
    """Fine-tuning's lead over steering in the means of the cells measured at `budget`, in "better" units."""
    tuned, steered = (f.points.value[f.points.d == budget].mean() for f in (tune, steer))
    return sign * float(tuned - steered)


def _measured_lead(steer: LawFit, tune: LawFit, budget: float, sign: float) -> tuple[float, float]:
    """`_mean_lead`, and the half-width of its 95 % Welch interval, each curve's seed variance pooled over its budgets
    (`_seed_spread`)."""
    spreads = [_seed_spread(f) for f in (tune, steer)]
    terms = [variance / np.sum(f.points.d == budget) for (variance, _), f in zip(spreads, (tune, steer))]
    se = float(np.sqrt(sum(terms)))
    df = se**4 / sum(term**2 / dof for term, (_, dof) in zip(terms, spreads) if term > 0)
    return _mean_lead(steer, tune, budget, sign), float(stats.t.ppf(0.5 + CI_LEVEL / 2, df)) * se


def _ahead_by(leader: str, budget: float, lead: float, half: float, when: str = "") -> str:
    return f"at D={budget:g} {leader} is {when}ahead by {lead:.3g} ± {half:.2g} (95 % Welch interval, seed variance pooled over budgets)"


def measured_check(steer: LawFit, tune: LawFit, d_star: float, winner: float, sign: float, tol: float) -> tuple[str, str]:
    """The budgets measured for both methods either side of D* as text, and where the cells measured there
    contradict the swap the laws place between them ('' where they do not).

    D* is the laws' interpolation between measured budgets. Where a law does not describe its data (a
    flat fit to a falling curve, a fine-tune at chance until a threshold), the bootstrap redraws noise
    around the same wrong curve and agrees with it in every resample; the cells measured either side are
    the check that does not depend on the law. A contradiction counts where the side the laws put behind
    leads by more than `tol` and by more than noise (`_measured_lead`'s interval excludes 0). Next to D* the
    true gap is small, and seeds alone move the means past it. `winner` is +1 where fine-tuning leads after D*.
    """
    budgets = np.intersect1d(steer.points.d, tune.points.d)
    below, above = budgets[budgets < d_star], budgets[budgets > d_star]
    if not len(below) or not len(above):
        return " (no budget measured for both on one side of it)" if len(budgets) else " (no budget measured for both methods)", ""
    bracket = f" (between the measured budgets {below.max():g} and {above.min():g})"
    if unchecked := _unchecked(steer, tune):
        return f"{bracket[:-1]}; {unchecked}, so the means measured there were not checked against it)", ""
    later, earlier = (tune.method, steer.method) if winner > 0 else (steer.method, tune.method)
    disputes = []
    for budget, expected in ((below.max(), -1.0), (above.min(), 1.0)):  # the later leader behind below D*, ahead above
        lead, half = _measured_lead(steer, tune, budget, sign)
        lead *= winner  # the later leader's
        if -expected * lead > tol and abs(lead) > half:
            who, by = (later, lead) if expected < 0 else (earlier, -lead)
            disputes.append(_ahead_by(who, budget, by, half, "already " if expected < 0 else "still "))
    return bracket, "; ".join(disputes)


def measured_check_without_crossing(steer: LawFit, tune: LawFit, outcome: str, sign: float, tol: float) -> tuple[str, str]:
    """Why the means measured were not checked ('' where they were, as text to add to the verdict), and where the cells
    measured at a budget both methods share contradict an outcome with no crossing ('' where they do not): the side
    the laws put behind throughout ("finetuning_ahead", "steering_ahead") leads there, or either leads where the laws
    are "tied" — by more than `tol` and past noise, as `measured_check` judges a D*. A flat fit to a steering curve
    that falls put fine-tuning "ahead at both ends" over budgets where every steering seed led, and every resample
    agreed (firm)."""
    if unchecked := _unchecked(steer, tune):
        return f" ({unchecked}, so the means measured at the shared budgets were not checked against it)", ""
    disputes = []
    for budget in np.intersect1d(steer.points.d, tune.points.d):
        lead, half = _measured_lead(steer, tune, budget, sign)
        behind = {"finetuning_ahead": lead < -tol, "steering_ahead": lead > tol, "tied": abs(lead) > tol}[outcome]
        if behind and abs(lead) > half:
            disputes.append(_ahead_by(tune.method if lead > 0 else steer.method, budget, abs(lead), half))
    return "", "; ".join(disputes)


def crossover(steer: LawFit, tune: LawFit) -> Crossover:
    """Where `tune` (a fine-tuning budget curve) and `steer` swap places on the same task and model."""
    d_min = max(steer.points.d.min(), tune.points.d.min())
    d_max = min(steer.points.d.max(), tune.points.d.max())
    identity = (steer.task, steer.model, steer.n_params, steer.method, tune.method, float(d_min), float(d_max))
    if d_min >= d_max:
        verdict = f"no shared budget range: {steer.method} was measured on D in [{steer.points.d.min():g}, {steer.points.d.max():g}], " \
                  f"{tune.method} on [{tune.points.d.min():g}, {tune.points.d.max():g}]"  # fmt: skip
        return Crossover(*identity, np.nan, np.nan, np.nan, np.nan, "no_overlap", verdict)
    d = np.geomspace(d_min, d_max, GRID_POINTS)
    metric = steer.metric
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0  # advantage of fine-tuning, in "better" units
    mode, mode_share = "", np.nan
    fitted = sign * (budget_curves(tune.fit.params, d, metric) - budget_curves(steer.fit.params, d, metric))
    tol = tolerance(np.concatenate([steer.points.value, tune.points.value]))
    code, d_star = (v[0] for v in outcomes(fitted, d, tol))
    if code < 0:
        return Crossover(*identity, np.nan, np.nan, np.nan, np.nan, "not_finite", "no verdict: a fitted curve is not finite over the range")
    if steer.boot is not None and tune.boot is not None:
        advantage = sign * (budget_curves(tune.boot.params(), d, metric) - budget_curves(steer.boot.params(), d, metric))
        codes, samples = outcomes(advantage, d, tol)
        share = float(np.mean(codes == code))
        counts = np.bincount(codes[codes >= 0], minlength=len(OUTCOMES))
        if counts.argmax() != code and counts.max() > len(codes) / 2:  # a majority, or "most resamples" would be untrue
            mode, mode_share = OUTCOMES[int(counts.argmax())], float(counts.max() / len(codes))
        winner = 1.0 if code == 0 else -1.0  # the side ahead at the largest budget
        lo, hi = censored_interval(lead_from(winner * advantage, d, tol)) if code in (0, 1) else (np.nan, np.nan)
        overtakes = np.where(codes == 0, samples, np.nan)
    else:
        share, lo, hi, overtakes = np.nan, np.nan, np.nan, np.array([])
    outcome = OUTCOMES[code]
    ahead = _ahead(fitted, tol)
    first, second = (float(_flip(fitted, ahead, d, last)[0]) if code == 5 else np.nan for last in (False, True))
    leader, middle = (tune.method, steer.method) if ahead[0, 0] else (steer.method, tune.method)
    level = (f"stay within {tol:.2g} of each other over the measured range, half the step of the measured {metric} ({2 * tol:.2g}): "
             "too close to tell apart" if tol > TIE else "fit the same curve over the measured range")  # fmt: skip
    shared = np.intersect1d(steer.points.d, tune.points.d)
    measured_ends = [_mean_lead(steer, tune, budget, sign) for budget in shared[[0, -1]]] if len(shared) else [np.nan]
    # "at both ends" where the cells measured at the shared ends show it too: a flat fit put it over a measured tie
    ends = "at both ends" if (fitted[0, [0, -1]] > tol).all() and (np.array(measured_ends) > tol).all() else f"wherever they differ by more than {tol:.2g}"
    verdict = {
        "crosses": f"{tune.method} overtakes {steer.method} at D* ≈ {d_star:.3g}",
        "steering_overtakes": f"{steer.method} overtakes {tune.method} at D* ≈ {d_star:.3g}",
        "finetuning_ahead": f"no crossover within the measured range: {tune.method} is ahead of {steer.method} {ends}",
        "steering_ahead": f"no crossover within the measured range: {steer.method} stays ahead of {tune.method}",
        "tied": f"no crossover: {steer.method} and {tune.method} {level}",
        "crosses_twice": f"the curves cross twice: {leader} is ahead below D ≈ {first:.3g} and above D ≈ {second:.3g}, {middle} in between",
    }[outcome]
    disputed = ""
    if code in (0, 1):
        bracket, disputed = measured_check(steer, tune, d_star, 1.0 if code == 0 else -1.0, sign, tol)
        verdict += bracket
    elif outcome in ("finetuning_ahead", "steering_ahead", "tied"):
        note, disputed = measured_check_without_crossing(steer, tune, outcome, sign, tol)
        verdict += note
    # a curve whose cells worsen with the budget past noise is one its law cannot follow (`LawFit.worsening`): the fit
    # says so, and an outcome drawn from it, however many resamples agree, is no finding (helper-176: gridworld's xl
    # steer_mean, 0.65 at D=4 on both seeds, fitted flat at 0.56, "tied" with full_ft, which scored 0.56 there)
    unfollowed = [f"the law does not describe {f.method}'s cells: they worsen as the budget grows past noise" for f in (steer, tune) if f.worsening]
    disputed = "; ".join([*([MEANS_DISPUTE + disputed] if disputed else []), *unfollowed])
    verdict += f"; {disputed}" if disputed else ""
    d_star = first if code == 5 else d_star
    return Crossover(*identity, float(d_star), lo, hi, share, outcome, verdict, d_star_2=second, tolerance=tol, disputed=disputed,
                     resampled_outcome=mode, resampled_share=mode_share, overtakes=overtakes)  # fmt: skip


def find_crossovers(fits: list[LawFit]) -> list[Crossover]:
    """Every steering × fine-tuning pair that has fitted budget curves on the same task and model."""
    curves = [f for f in fits if f.ok and not f.joint]
    found = []
    for steer in (f for f in curves if method_kind(f.method) == "steering"):
        for tune in (f for f in curves if method_kind(f.method) == "finetuning"):
            if (tune.task, tune.model) == (steer.task, steer.model):
                found.append(crossover(steer, tune))
    return sorted(found, key=lambda c: (c.task, c.steering, c.finetuning, c.n_params))


@dataclass(frozen=True)
class CrossoverScaling:
    """How D* grows with model size or capability: D* ∝ x^gamma over the models where fine-tuning overtakes.

    Models where it does not (ahead at both ends: D* below the smallest budget; never: above the
    largest; or steering overtaking) are censored, not fitted, and counted in `n_pairs - n_models`:
    a trend through the rest can say the opposite of what they show. The interval refits the line
    on every bootstrap resample through the same models as γ: a resample in which one of them does
    not cross gives no slope (`resample_share` is the share that do), and a line through other models
    would not be a resample of γ. `holdout_error` is
    the mean |ln D*| missed when each model in turn is predicted from the line through the others
    (needs three models); unlike leaving out only the top model, it holds out the same models on
    every axis, so axes compare on equal terms. On an axis that cannot pool families (parameters) a
    sweep of several families gets one trend per family, named in `family` ("" when pooled).
    """

    task: str
    steering: str
    finetuning: str
    x: str
    gamma: float
    gamma_lo: float
    gamma_hi: float
    n_models: int  # models the line goes through (fine-tuning overtakes inside the measured range)
    n_pairs: int  # models with both curves fitted and an x, crossing or not
    holdout_error: float
    family: str = ""
    resample_share: float = np.nan  # resamples in which every model of the line crosses, so that they give a slope

    def record(self) -> dict[str, object]:
        """Its fields; `family` only where the trend is one family's, so a pooled trend's row is unchanged."""
        return {k: v for k, v in self.__dict__.items() if k != "family" or self.family}

    @property
    def enough_models(self) -> bool:
        """Through MIN_TREND_MODELS crossing models or more: fewer leave the line no error to show (README: a finding from three models on)."""
        return self.n_models >= MIN_TREND_MODELS

    @property
    def has_interval(self) -> bool:
        """Resampled: without resamples (--bootstrap 0), or with a slope in too few of them, the trend is a line through points, not a finding."""
        return bool(np.isfinite(self.gamma_lo) and np.isfinite(self.gamma_hi))

    def describe(self) -> str:
        """The trend in words, with its interval (whether it excludes 0) and the models it leaves out."""
        others = (f"; the other {self.n_pairs - self.n_models} have no single crossing where it overtakes inside the range "
                  "(ahead or behind throughout, tied, steering overtaking, crossing twice, a disputed D*, or both methods idle)" if self.n_pairs > self.n_models else "")  # fmt: skip
        if not self.enough_models:
            ci = f"; a line through {self.n_models} points, not a finding (it needs {MIN_TREND_MODELS} models with a finite D*)"
        elif not self.has_interval:
            share = "" if np.isnan(self.resample_share) else f" ({self.finetuning} overtakes on all {self.n_models} in {self.resample_share:.0%} of resamples)"
            ci = f"; no interval{share}, so not a finding"
        elif self.gamma_lo > 0 or self.gamma_hi < 0:
            ci = f"; 95 % interval [{self.gamma_lo:.2f}, {self.gamma_hi:.2f}], which excludes 0"
        else:
            ci = f"; 95 % interval [{self.gamma_lo:.2f}, {self.gamma_hi:.2f}], which includes 0: no clear trend"
        within = f" of family {self.family}" if self.family else ""
        return (f"{self.task}: the crossover budget of {self.finetuning} over {self.steering} goes as "
                f"D* ∝ {self.x}^{self.gamma:.2f} across the {self.n_models} models{within} where it crosses{others}{ci}")  # fmt: skip


def _leave_one_out(logx: np.ndarray, logd: np.ndarray) -> float:
    errors = []
    for i in range(len(logx)):
        rest = np.arange(len(logx)) != i
        if len(np.unique(logx[rest])) < 2:
            return np.nan
        slope, intercept = np.polyfit(logx[rest], logd[rest], 1)
        errors.append(abs(slope * logx[i] + intercept - logd[i]))
    return float(np.mean(errors)) if len(errors) >= MIN_TREND_MODELS else np.nan


def _scatter_interval(logx: np.ndarray, logd: np.ndarray, gamma: float, level: float = CI_LEVEL) -> tuple[float, float]:
    """The least-squares slope's t-interval from the models' scatter about the line (n − 2 degrees of
    freedom; 1 with three models, t = 12.7). The resamples only move each model's D* by how precisely its
    curves were measured: D* of 46, 297 and 109 over three sizes got a slope interval of [0.16, 0.22]
    from them, though the line misses each left-out model by 11×; a power law across models is a claim
    about the models too. NaN with fewer than three models."""
    n = len(logx)
    if n < 3:
        return (np.nan, np.nan)
    intercept = float(np.mean(logd) - gamma * np.mean(logx))
    residual = logd - (gamma * logx + intercept)
    spread = np.sqrt(residual @ residual / (n - 2) / np.sum((logx - logx.mean()) ** 2))
    half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * spread
    return (gamma - half, gamma + half)


def _resampled_slopes(logx: np.ndarray, overtakes: np.ndarray) -> np.ndarray:
    """Least-squares slope of log D* on log x per resample (rows of `overtakes`, one column per model of the
    point fit's line); NaN where one of those models does not cross in that resample."""
    dx = logx - logx.mean()
    return np.log(overtakes) @ dx / (dx @ dx)


def crossover_scaling(crossovers: list[Crossover], capabilities: pd.DataFrame, axis: Axis, pooled: bool = False) -> list[CrossoverScaling]:
    """Least-squares slope of log D* on log x per pair; needs two models where fine-tuning overtakes, with an x.

    Per pair and family where `axis` cannot pool the families in `capabilities` (capability.split_by_family),
    unless `pooled` asks for one trend over them all.
    """
    keys = capabilities.set_index(["task", "model"]) if len(capabilities) else pd.DataFrame()
    x_of = keys[axis.name].to_dict() if len(keys) else {}
    family_at = family_of(keys).to_dict() if not pooled and split_by_family(axis, capabilities) else {}
    pairs: dict[tuple[str, str, str, str], list[tuple[float, Crossover]]] = {}
    for c in crossovers:
        x = x_of.get((c.task, c.model), np.nan)
        if np.isfinite(x) and c.outcome not in ("no_overlap", "not_finite"):  # no verdict, and no resamples to line up with the others
            pairs.setdefault((c.task, c.steering, c.finetuning, family_at.get((c.task, c.model), "")), []).append((float(np.log(x)), c))
    result = []
    for (task, steering, finetuning, family), found in sorted(pairs.items()):
        # a disputed D* is no finding to draw a line through, nor one between two methods that mostly did nothing
        crossing = [(logx, c) for logx, c in found if c.outcome == "crosses" and not c.disputed and not c.idle]
        logx = np.array([lx for lx, _ in crossing])
        if len(np.unique(logx)) < 2:
            continue
        logd = np.log([c.d_star for _, c in crossing])
        gamma = float(np.polyfit(logx, logd, 1)[0])
        resamples = {len(c.overtakes) for _, c in crossing}
        slopes = (_resampled_slopes(logx, np.stack([c.overtakes for _, c in crossing], axis=1))
                  if len(resamples) == 1 and resamples != {0} else np.array([]))  # fmt: skip
        share = float(np.isfinite(slopes).mean()) if len(slopes) else np.nan
        # resamples in which a model of the line does not cross have no slope: past 1 − CI_LEVEL of them, no interval;
        # else the span of the resampled interval (each D*'s precision) and the scatter's (how well a line fits the models)
        lo, hi = percentile_interval(slopes) if share >= CI_LEVEL else (np.nan, np.nan)
        scatter_lo, scatter_hi = _scatter_interval(logx, logd, gamma)
        if np.isfinite(lo) and np.isfinite(scatter_lo):
            lo, hi = min(lo, scatter_lo), max(hi, scatter_hi)
        result.append(CrossoverScaling(task, steering, finetuning, axis.name, gamma, lo, hi, len(crossing), len(found),
                                       _leave_one_out(logx, logd), family, share))  # fmt: skip
    return result
