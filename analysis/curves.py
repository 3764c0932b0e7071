"""Fitting the study's curves from result rows, one group of cells at a time.

Per (task, method, model) the main curve is the saturating power law in the post-training budget,
loss(D) = E + B·D^-β (score = 1 − loss, so S∞ = 1 − E). Per (task, method) across models the joint
additive and multiplicative laws in (N, D) are fitted too, N being parameters or a base-model
capability (analysis/capability.py), validated by leaving the model at the top of that axis out.
Parameters do not compare across families, so on that axis a sweep of several families gets one
joint law per family ("* (family)") instead of one over all of them ("*").
Groups that cannot support a law get a row that says why instead of an exception.
"""

from __future__ import annotations

import functools
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import stats

from analysis.bootstrap import CI_LEVEL, Bootstrap, QuestionDraws, bootstrap_fit, percentile_interval, question_counts
from analysis.capability import X_COLUMN, Axis, family_of, get_axis, split_by_family, with_x
from analysis.fitting import FIT_FAILURES, LOG_COEF_BOUNDS, NEGLIGIBLE_SHARE, Fit, FitError, LawData, fit_law, negligible_terms, unidentified
from analysis.laws import LAWS, POWER_D, Law
from analysis.methods import method_kind
from analysis.metrics import LOSS_FLOOR, from_loss, step, to_loss
from analysis.parallel import parallel_map

BOUND_TOLERANCE = 1e-3  # an exponent this close to its bound is at it
ALL_PARAMS = tuple(dict.fromkeys(p for law in LAWS.values() for p in law.params))
JOINT = "*"  # the model label of a joint law over models


def joint_label(family: str) -> str:
    """The model label of a joint law: "*" over every family, "* (family)" within one."""
    return f"{JOINT} ({family})" if family else JOINT


@dataclass(frozen=True)
class Exclusions:
    """Rows of a group that could not enter the fit, by reason."""

    failed: int
    nan: int  # ok rows without a finite metric
    no_x: int  # ok rows with a metric but no N, which only a joint law needs
    no_budget: int


@dataclass(frozen=True)
class Points:
    """The usable cells of a group: inputs N and D and the metric value."""

    n: np.ndarray
    d: np.ndarray
    value: np.ndarray


@dataclass(frozen=True)
class LawFit:
    """One law fitted to one group of cells, or the reason it was not."""

    task: str
    method: str
    model: str  # joint_label(family) for a law fitted across model sizes
    n_params: float
    x: str | None  # the axis standing for N in a joint law (capability.AXES); None for a budget curve
    law: Law
    metric: str
    points: Points
    excluded: Exclusions
    fit: Fit | None
    boot: Bootstrap | None
    message: str
    holdout: str
    holdout_error: float
    family: str = ""  # the family a joint law was fitted within; "" when pooled, and for a budget curve
    held_models: tuple[str, ...] = ()  # a joint law's models at the top of its axis, which its holdout error leaves out

    @property
    def ok(self) -> bool:
        return self.fit is not None

    @property
    def joint(self) -> bool:
        """A law in (N, D) across models, rather than one model's budget curve."""
        return self.x is not None

    def asymptote_samples(self) -> np.ndarray:
        """The metric's value as D (and N) → ∞, per bootstrap resample."""
        return from_loss(self.boot.params()["E"], self.metric) if self.boot else np.array([])

    def bound_notes(self) -> list[str]:
        """Parameters the fit pushed to a limit: the data do not pin them down, so read them as such.

        An exponent at its bound is a flat curve (0) or a step (the upper bound); a floor E at the
        loss floor is a curve still falling where the data end, whose asymptote is the metric's limit.
        An exponent that is not identified (`unidentified`) is noted as that instead: any value fits as
        well, so where it landed says nothing, and its flat curve's level is measured.
        """
        notes = [
            f"{name}={self.fit.params[name]:.3g} at its {'lower' if side == 0 else 'upper'} bound" for name, side in self.exponents_at_bounds().items()
        ]
        if self.floor_asymptote():
            notes.append("E at the loss floor (asymptote = the metric's limit)")
        notes += [f"{name} at its upper bound (e^{LOG_COEF_BOUNDS[1]:g}; the exponent with it is capped)" for name in self.capped_coefficients()]
        return notes

    def exponents_at_bounds(self) -> dict[str, int]:
        """Identified exponents the fit left at a bound: 0 the lower (a flat curve), 1 the upper (a step)."""
        if not self.fit:
            return {}
        lost = set(self.unidentified())
        return {
            name: side
            for name, bounds in zip(self.law.exponents, self.law.exponent_bounds)
            for side in (0, 1)
            if name not in lost and abs(self.fit.params[name] - bounds[side]) <= BOUND_TOLERANCE
        }

    def floor_asymptote(self) -> bool:
        """E at the loss floor: the curve still falls where the data end, and its asymptote is the metric's limit."""
        return bool(self.fit) and self.fit.params["E"] <= LOSS_FLOOR

    def capped_coefficients(self) -> list[str]:
        """Coefficients at e^30, which caps the exponent they multiply: at N ≈ 1e9 the multiplicative law's
        ln A ≈ 20.7·alpha + ..., so alpha stops near 1.3 whatever the data say."""
        if not self.fit:
            return []
        return [name for name, log_coef in zip(self.law.coefs, self.fit.theta) if log_coef >= LOG_COEF_BOUNDS[1] - BOUND_TOLERANCE]

    def unidentified(self) -> list[str]:
        """Exponents whose every term is ~0 over the data (fitting.negligible_terms): any value fits as well,
        so they have no interval and are not findings."""
        if not self.fit:
            return []
        lost = unidentified(self.law, self._negligible())
        return [name for name in self.law.exponents if lost[name][0]]

    def _negligible(self) -> np.ndarray:
        return negligible_terms(self.law, self.fit.params, {"N": self.points.n, "D": self.points.d})

    def unidentified_in_resamples(self) -> dict[str, float]:
        """Exponents the fit identifies but more than 1 − CI_LEVEL of the resamples do not, with that share:
        they have no interval (Bootstrap.intervals)."""
        if not self.boot:
            return {}
        lost = set(self.unidentified())
        shares = {name: float(gone.mean()) for name, gone in self.boot.unidentified_resamples().items()}
        return {name: share for name, share in shares.items() if name not in lost and share > 1 - CI_LEVEL}

    def no_spread(self) -> bool:
        """The metric does not move over the group's cells: only its level is measured."""
        return self.ok and bool(np.ptp(np.log(to_loss(self.points.value, self.metric))) < NEGLIGIBLE_SHARE)

    def identification_notes(self) -> list[str]:
        """What the data cannot say: a metric that does not move, each term ~0 over the data with the
        exponents it leaves unidentified (its coefficient, as fitted, is a bound, not a size), and an
        exponent left without an interval because its term vanishes in too many resamples."""
        if not self.fit:
            return []
        notes = []
        if self.no_spread():
            lo, hi = np.min(self.points.value), np.max(self.points.value)
            notes.append(f"no spread in {self.metric} ({lo:.3g} to {hi:.3g} over {len(self.points.value)} cells): only its level is measured")
        lost = set(self.unidentified())
        for term, negligible in zip(self.law.terms, self._negligible()[0]):
            exponents = [name for _, name in term.powers if name in lost]
            if negligible and exponents:
                notes.append(f"{term.coef}≈0: {', '.join(exponents)} not identified")
        notes += [f"{name} not identified in {share:.1%} of resamples: no interval" for name, share in self.unidentified_in_resamples().items()]
        return [*filter(None, [self.worsening]), *notes]

    @functools.cached_property
    def worsening(self) -> str:
        """Why the law does not describe a budget curve whose metric worsens with the budget ('' where it does: the
        cells' least-squares slope against log D is not past its 95 % t interval on the worse side, or the fit misses
        the means at the ends by no more than the metric's step, a question). The law only improves with data, so
        it fits such cells as a flat line at their mean, its asymptote's interval the seeds' noise about it; data
        efficiency then said the whole gain was "reached before the data start" (helper-127)."""
        d, loss = self.points.d, to_loss(self.points.value, self.metric)
        if not self.fit or self.joint or len(np.unique(d)) < 3 or len(d) < 4 or not (d > 0).all() or self.no_spread():
            return ""
        slope = stats.linregress(np.log10(d), loss)
        low = slope.slope - stats.t.ppf(0.5 + CI_LEVEL / 2, len(d) - 2) * slope.stderr
        ends = np.array([d.min(), d.max()])
        first, last = (float(np.mean(self.points.value[d == budget])) for budget in ends)
        missed = np.abs(np.array([first, last]) - self.predict(np.full(2, self.n_params), ends)).max()
        if not low > 0 or missed <= step(self.points.value):
            return ""
        return (f"{self.metric} worsens as the budget grows ({first:.3g} at D={d.min():g}, {last:.3g} at D={d.max():g}; past "
                "noise): the law only improves with data, so it does not describe these cells")

    def asymptote_notes(self) -> list[str]:
        """A budget curve whose asymptote E lies farther beyond the data than the data's own range: still
        further from E at 100× the largest budget than it moved over the measured budgets. A flat curve
        fits about as well with a far floor and a tiny exponent, and its "asymptote" then read as a score
        near 1, interval and all, for scores level at .5 (β = 0.003, just clear of the bound note). A curve
        whose B term is ≈ 0 over the data, or whose data do not move, is at its level throughout: there both
        distances are rounding errors, and comparing them noted a far asymptote of a flat curve."""
        if not self.fit or self.joint or not len(self.points.d) or self.unidentified() or self.no_spread():
            return []
        budgets = np.array([self.points.d.min(), self.points.d.max(), 100 * self.points.d.max()])
        first, last, far = self.fit.predict({"N": np.full(3, self.n_params), "D": budgets})
        e = self.fit.params["E"]
        if abs(far - e) <= abs(first - last):
            return []
        value = from_loss(np.array([far]), self.metric).item()
        return [f"asymptote far past the data (at 100× the largest budget the curve is at {value:.3g})"]

    @property
    def note(self) -> str:
        """Why the group was not fitted, what the data cannot identify, which parameters sit at a bound, or
        an asymptote far past the data ('' for a clean fit)."""
        return self.message or "; ".join([*self.identification_notes(), *self.bound_notes(), *self.asymptote_notes()])

    def predict(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The fitted metric (not loss) at (N, D)."""
        return from_loss(self.fit.predict({"N": n, "D": d}), self.metric)

    def record(self) -> dict[str, object]:
        """A flat row for fits.parquet: parameters with percentile CIs, counts, validation."""
        row: dict[str, object] = {
            "task": self.task, "method": self.method, "kind": method_kind(self.method),
            "model": self.model, "n_params": self.n_params, "x": self.x, "law": self.law.name,
            "formula": self.law.formula, "metric": self.metric, "status": "ok" if self.ok else "not fitted",
            "message": self.message, "bounds": "; ".join(self.bound_notes()),
            "identification": "; ".join(self.identification_notes()), "asymptote_note": "; ".join(self.asymptote_notes()),
            "n_points": len(self.points.value),
            "n_failed": self.excluded.failed, "n_nan": self.excluded.nan, "n_no_x": self.excluded.no_x, "n_no_budget": self.excluded.no_budget,
            "objective": self.fit.objective if self.fit else np.nan,
            "n_bootstrap": len(self.boot.thetas) if self.boot else 0,
            "n_questions_redrawn": self.boot.questions if self.boot else 0,  # 0: the resamples redrew seeds only
            "holdout": self.holdout, "holdout_error": self.holdout_error,
        }  # fmt: skip
        params = self.fit.params if self.fit else {}
        intervals = self.boot.intervals() if self.boot else {}
        intervals.update({name: (np.nan, np.nan) for name in self.unidentified()})
        for name in ALL_PARAMS:
            row[name] = params.get(name, np.nan)
            row[f"{name}_lo"], row[f"{name}_hi"] = intervals.get(name, (np.nan, np.nan))
        row["asymptote"] = from_loss(params["E"], self.metric).item() if self.fit else np.nan
        row["asymptote_lo"], row["asymptote_hi"] = sorted(percentile_interval(self.asymptote_samples()))
        return row


def exclusions(rows: pd.DataFrame, metric: str, n_column: str | None) -> tuple[pd.DataFrame, Exclusions]:
    """Split a group's rows into usable ones and counts of why the others were left out.

    `n_column` is where a joint law reads N; a budget curve (None) does not use N, so a row without
    one (params_nonembed not recorded) still belongs on it.
    """
    ok = rows["status"] == "ok"
    measured = ok & np.isfinite(rows[metric].astype(float))
    placed = measured & np.isfinite(rows[n_column].astype(float)) if n_column else measured
    budget = placed & (rows["budget"].astype(float) > 0)
    counts = Exclusions(failed=int((~ok).sum()), nan=int((ok & ~measured).sum()), no_x=int((measured & ~placed).sum()),
                        no_budget=int((placed & ~budget).sum()))  # fmt: skip
    return rows[budget], counts


def _fit(law: Law, points: Points, metric: str) -> Fit:
    x = {"N": points.n, "D": points.d}
    return fit_law(LawData.build(law, x, to_loss(points.value, metric)))


def _holdout_error(law: Law, points: Points, metric: str, held: np.ndarray) -> float:
    """Mean absolute error, in metric units, on held-out points of a fit made without them."""
    train = Points(points.n[~held], points.d[~held], points.value[~held])
    try:
        fit = _fit(law, train, metric)
    except FitError:
        return np.nan
    predicted = from_loss(fit.predict({"N": points.n[held], "D": points.d[held]}), metric)
    return float(np.mean(np.abs(predicted - points.value[held])))


def all_failed(rows: pd.DataFrame) -> str:
    """Why a group none of whose cells is ok has no fit: their count and the first error's first line,
    which is often the one cause they share (a model that cannot be loaded fails every cell)."""
    errors = [str(e).strip() for e in rows.get("error", pd.Series(dtype=object)).dropna() if str(e).strip()]
    return f"all {len(rows)} cells failed" + (f" (first error: {errors[0].splitlines()[0]})" if errors else "")


@dataclass(frozen=True)
class GroupJob:
    """One law to fit to one group of rows, as a worker process receives it (the axis by name)."""

    task: str
    method: str
    model: str  # joint_label(family) for a joint law across models
    law: Law
    rows: pd.DataFrame
    metric: str
    axis: str | None  # where a joint law takes N from; None for a budget curve
    bootstrap: int
    seed: int
    family: str = ""  # a joint law fitted within one family; "" when pooled

    def rng(self) -> np.random.Generator:
        """The group's own stream, from the study's seed and the group's name: the same numbers
        whichever order, or process, the groups are fitted in."""
        name = "/".join((self.task, self.method, self.model, self.law.name, self.axis or ""))
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])


OUTCOME_COLUMNS = {"score": "score_outcomes"}  # metric -> the column of each test question's outcome behind it


def outcome_matrix(rows: pd.DataFrame, metric: str) -> np.ndarray | None:
    """The rows' test-question outcomes behind `metric` (rows, questions), 1 solved / 0 not; None where a
    row lacks them (an older row, a metric that has none) or the rows disagree on the number of questions."""
    column = OUTCOME_COLUMNS.get(metric)
    if column is None or column not in rows or not len(rows):
        return None
    outcomes = [o if isinstance(o, (list, tuple, np.ndarray)) else None for o in rows[column]]
    sizes = {len(o) for o in outcomes if o is not None}
    if any(o is None for o in outcomes) or len(sizes) != 1 or 0 in sizes:
        return None
    matrix = np.stack([np.asarray(o, dtype=float) for o in outcomes])
    return matrix if np.isfinite(matrix).all() else None  # a null among a row's outcomes: none to redraw


def redrawn_scores(rows: pd.DataFrame, metric: str, task: str, n_resamples: int, seed: int) -> tuple[np.ndarray, int] | None:
    """Each row's metric on each resample's redrawn test questions (B, rows), the same draws for every
    group of the task (`question_counts`), and the number of questions; None where `outcome_matrix` has none."""
    outcomes = outcome_matrix(rows, metric)
    if outcomes is None:
        return None
    questions = outcomes.shape[1]
    return question_counts(task, questions, n_resamples, seed) @ outcomes.T / questions, questions


def question_draws(job: GroupJob, usable: pd.DataFrame) -> QuestionDraws | None:
    """The usable cells' losses on each resample's redrawn questions, for `bootstrap_fit`."""
    redrawn = redrawn_scores(usable, job.metric, job.task, job.bootstrap, job.seed)
    if redrawn is None:
        return None
    scores, questions = redrawn
    return QuestionDraws(to_loss(scores, job.metric), questions, job.seed)


def fit_group(job: GroupJob) -> LawFit:
    """Fit `job.law` to a group of rows, with bootstrap CIs and a leave-the-top-out error.

    A joint law takes N from the axis (rows carry it in X_COLUMN) and leaves out the model at the top
    of that axis; a budget curve leaves out the largest budget and records the model's parameters.
    """
    task, method, model, law, rows, metric = job.task, job.method, job.model, job.law, job.rows, job.metric
    axis = get_axis(job.axis) if job.axis else None
    joint = "N" in law.inputs
    n_column = X_COLUMN if joint else "params_nonembed"
    usable, excluded = exclusions(rows, metric, n_column if joint else None)
    points = Points(usable[n_column].to_numpy(float), usable["budget"].to_numpy(float), usable[metric].to_numpy(float))
    x = axis.name if joint else None
    known = points.n[np.isfinite(points.n)]
    n_params = float(np.median(known)) if not joint and len(known) else np.nan
    top_of = points.n if joint else points.d
    held = top_of == top_of.max() if len(top_of) else np.zeros(0, bool)
    top = tuple(sorted(usable.loc[held, "model"].astype(str).unique())) if joint else ()
    if joint:
        holdout = f"{axis.held_out} ({', '.join(top)})" if top else axis.held_out
    else:
        holdout = "largest budget"

    def unfitted(message: str) -> LawFit:
        return LawFit(task, method, model, n_params, x, law, metric, points, excluded, None, None, message, holdout, np.nan, job.family, top)

    ok = rows["status"] == "ok"
    if len(rows) and not ok.any():  # "needs at least 4 distinct budgets, got 0" hid why: a model that never loaded, say
        return unfitted(all_failed(rows))
    if joint and ok.any() and not np.isfinite(rows.loc[ok, X_COLUMN].astype(float)).any():
        return unfitted(f"no ok row has a usable {axis.column}, which x={axis.name} needs")
    try:
        data = LawData.build(law, {"N": points.n, "D": points.d}, to_loss(points.value, metric))
    except FitError as err:
        return unfitted(str(err))
    try:
        fit = fit_law(data)
        boot = bootstrap_fit(fit, data, job.bootstrap, job.rng(), redrawn=question_draws(job, usable)) if job.bootstrap > 0 else None
    except FIT_FAILURES as err:  # one bad group must not sink the rest
        return unfitted(f"fit failed: {err}")
    error = _holdout_error(law, points, metric, held)
    return LawFit(task, method, model, n_params, x, law, metric, points, excluded, fit, boot, "", holdout, error, job.family, top)


def fitted_groups(frame: pd.DataFrame) -> Iterator[tuple[str, str, pd.DataFrame]]:
    """(task, method, rows) for every group with a budget axis; `base` is a reference level only."""
    for (task, method), rows in frame.groupby(["task", "method"], sort=True):
        if method_kind(method) == "reference" and not (rows["budget"].astype(float) > 0).any():
            continue
        yield task, method, rows


def joint_jobs(
    task: str, method: str, rows: pd.DataFrame, *, metric: str, axis: Axis, bootstrap: int, seed: int, by_family: bool
) -> list[GroupJob]:
    """The joint laws in (N, D) of one (task, method), N taken from `axis` (rows already `with_x`):
    over all rows, or `by_family` one set per family, each leaving out its own family's top model."""
    groups = list(rows.groupby(family_of(rows), sort=True)) if by_family else [("", rows)]
    return [GroupJob(task, method, joint_label(family), law, family_rows, metric, axis.name, bootstrap, seed, family)
            for family, family_rows in groups for law in axis.joint_laws]  # fmt: skip


def joint_fits(
    frame: pd.DataFrame, *, metric: str, axis: Axis, bootstrap: int, seed: int, pool: Executor | None = None, pooled: bool = False
) -> list[LawFit]:
    """The joint laws in (N, D) per (task, method), N taken from `axis`: per family where the axis cannot
    pool the sweep's families (capability.split_by_family), unless `pooled` asks for one law over them all."""
    by_family = not pooled and split_by_family(axis, frame)
    groups = fitted_groups(with_x(frame, axis))
    jobs = [job for task, method, rows in groups
            for job in joint_jobs(task, method, rows, metric=metric, axis=axis, bootstrap=bootstrap, seed=seed, by_family=by_family)]  # fmt: skip
    return parallel_map(fit_group, jobs, pool=pool, desc=f"joint laws, N = {axis.name}")


def by_size(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(model, its rows), smallest model first (by non-embedding parameters; unknown sizes last): the tables' order."""
    groups = list(rows.groupby("model", sort=False))
    size = {model: float(pd.to_numeric(g["params_nonembed"], errors="coerce").median()) for model, g in groups}
    return sorted(groups, key=lambda group: (np.isnan(size[group[0]]), np.nan_to_num(size[group[0]]), str(group[0])))


def fit_curves(
    frame: pd.DataFrame, *, metric: str, bootstrap: int, seed: int, x: str = "params", pool: Executor | None = None
) -> list[LawFit]:
    """Per (task, method): a budget curve for each model, then the joint laws in (N, D) with N from `x`
    (per family where `x` cannot pool the sweep's families).

    With a `pool` (analysis/parallel.py), groups are fitted in its worker processes.
    """
    axis = get_axis(x)
    framed = with_x(frame, axis)
    by_family = split_by_family(axis, frame)
    jobs = []
    for task, method, rows in fitted_groups(framed):
        jobs += [GroupJob(task, method, model, POWER_D, model_rows, metric, None, bootstrap, seed) for model, model_rows in by_size(rows)]
        jobs += joint_jobs(task, method, rows, metric=metric, axis=axis, bootstrap=bootstrap, seed=seed, by_family=by_family)
    return parallel_map(fit_group, jobs, pool=pool, desc=f"budget curves and joint laws, N = {axis.name}")
