"""Composition gain: does `A+B` on the same data beat the better of A and B alone?

Compared cell-mean against cell-mean at each matched (task, model, budget), since a composition
has no law of its own to compare. A sweep has two to five seeds a side, and a bootstrap of so few
cells is far too narrow (with three seeds and no true gain its 95 % interval excluded 0 in about a
fifth of cases), so the interval is Welch's t over the seeds: one per part, at level
1 − (1 − CI_LEVEL)/k for k parts, and the gain over the better part, min over parts of
(composition − part), lies between the smallest lower and the smallest upper end. No part is
chosen as "the better" in advance, so the choice cannot favour either side. `p_value` is the
interval's dual (the level at which it would just touch 0): the report corrects it for the number
of gains it could state (Holm).

Every seed is scored on the same test questions, so the seeds carry no test-set noise. Where the
rows store each question's outcome, the variance the questions add to a difference of two methods
on them is added to Welch's (`question_noise`): the variance over questions of the per-question
difference, over their number — paired, as both sides answered the same questions. With two seeds a
side a simulation (a review's, 2026-12-03) covered at about 93 %, not 95 %: the term's Q − 1 degrees
of freedom lift Satterthwaite's when the seeds' variance is small by chance; three seeds covered 95 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.bootstrap import CI_LEVEL
from analysis.curves import outcome_matrix
from analysis.methods import components, method_kind
from analysis.metrics import clip_difference, improvement

MIN_SEEDS = 2  # cells of the composition and of each part before the gain gets an interval (a variance needs two)


@dataclass(frozen=True)
class CompositionGain:
    task: str
    model: str
    budget: float
    composition: str
    best_single: str
    gain: float  # positive: the composition is better (in the metric's direction)
    gain_lo: float  # NaN without an interval (see `note`)
    gain_hi: float
    n_cells: int
    seeds: int  # the fewest cells of any one side (the composition or a part)
    p_value: float = np.nan  # two-sided, for "the gain is 0"; NaN without an interval
    note: str = ""  # why there is no interval ('' when there is one, or when none was asked for)
    as_a_part: int = 0  # composition cells that scored as one part alone on their seed, to the bit (`copies_of_a_part`)
    composition_cells: int = 0

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QuestionNoise:
    """The variance the test questions add to a difference of two cell means, and their number."""

    variance: float = 0.0
    questions: int = 0


def question_noise(a: np.ndarray | None, b: np.ndarray | None) -> QuestionNoise:
    """For the outcome matrices (cells, questions) of two sides scored on the same questions: the variance
    over questions of (side a's mean outcome − side b's), over their number; none without both.

    A side's mean outcome on a question also carries its seeds' disagreement there, which Welch's seed
    term already counts (a seed's score is its outcomes' mean), so that part, each question's variance
    over the side's seeds over their number, averaged over questions, is taken out once.
    """
    if a is None or b is None or a.shape[1] != b.shape[1] or a.shape[1] < 2:
        return QuestionNoise()
    per_question = a.mean(axis=0) - b.mean(axis=0)
    seeds = sum(float(side.var(axis=0, ddof=1).mean()) / len(side) for side in (a, b) if len(side) > 1)
    variance = max(float(per_question.var(ddof=1)) - seeds, 0.0) / len(per_question)
    return QuestionNoise(variance, len(per_question)) if np.isfinite(variance) else QuestionNoise()


def same_on_every_question(outcomes: np.ndarray | None) -> bool:
    """Every cell (seed) of a side answered every question alike: a method the seeds do not move, whose
    seed variance of 0 is a measurement, not a tie by chance that would leave the seeds' noise out."""
    return outcomes is not None and bool((outcomes == outcomes[0]).all())


def paired_noise(a: np.ndarray, b: np.ndarray, a_outcomes: np.ndarray | None, b_outcomes: np.ndarray | None) -> QuestionNoise:
    """`question_noise` for two sides' scores and outcomes, except where every seed of both scored alike
    without answering alike: a tie by chance, whose seeds' noise is unknown, not 0, and which the
    questions alone (Q − 1 degrees of freedom) would hide behind a narrow interval."""
    tied_by_chance = np.ptp(a) == 0 and np.ptp(b) == 0 and not (same_on_every_question(a_outcomes) and same_on_every_question(b_outcomes))
    return QuestionNoise() if tied_by_chance else question_noise(a_outcomes, b_outcomes)


@dataclass(frozen=True)
class Welch:
    """Difference of two means, its standard error and Welch–Satterthwaite degrees of freedom, over the
    seeds and, where given, the test questions (`QuestionNoise`, one more term of the sum)."""

    diff: float
    se: float
    df: float

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, questions: QuestionNoise = QuestionNoise()) -> Welch:
        va, vb, vq = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b), questions.variance
        se2 = va + vb + vq
        with np.errstate(invalid="ignore", divide="ignore"):  # no spread: se 0, df NaN, refused by the caller
            df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1) + (vq**2 / (questions.questions - 1) if vq else 0.0))
        return cls(float(a.mean() - b.mean()), float(np.sqrt(se2)), float(df))

    def interval(self, level: float) -> tuple[float, float]:
        half = stats.t.ppf(0.5 + level / 2, self.df) * self.se
        return self.diff - half, self.diff + half

    def p_value(self) -> float:
        return float(2 * stats.t.sf(abs(self.diff) / self.se, self.df))


def gain_interval(
    composition: np.ndarray, parts: list[np.ndarray], noise: list[QuestionNoise] | None = None, level: float = CI_LEVEL
) -> tuple[float, float, float]:
    """Interval for min over parts of (mean composition − mean part), values in "better" units, and its
    two-sided p-value: the parts' Welch intervals (with each comparison's question `noise`) at level
    1 − (1 − level)/k hold together with probability ≥ level (Bonferroni), and the minimum of the
    differences lies between their minima."""
    k = len(parts)
    tests = [Welch.of(composition, part, questions) for part, questions in zip(parts, noise or [QuestionNoise()] * k)]
    ends = np.array([t.interval(1 - (1 - level) / k) for t in tests])
    p = np.array([t.p_value() for t in tests])
    diffs = np.array([t.diff for t in tests])
    # excluded above 0 only when every part's interval is (the largest p decides); below 0 when any one is
    p_gain = p.max() if (diffs > 0).all() else p[diffs < 0].min(initial=1.0)
    return float(ends[:, 0].min()), float(ends[:, 1].min()), float(min(1.0, k * p_gain))


def holm(p_values: np.ndarray, alpha: float = 1 - CI_LEVEL) -> np.ndarray:
    """Which hypotheses Holm's step-down procedure rejects at family-wise error `alpha`."""
    order = np.argsort(p_values)
    passed = p_values[order] <= alpha / (len(p_values) - np.arange(len(p_values)))
    stop = len(passed) if passed.all() else int(np.argmin(passed))  # the first hypothesis kept ends the procedure
    rejected = np.zeros(len(p_values), dtype=bool)
    rejected[order[:stop]] = True
    return rejected


def unmatched_compositions(ok: pd.DataFrame, *, metric: str) -> list[str]:
    """The compositions `composition_gains` passes over, each with the parts that have no ok cell with a
    finite `metric` beside it (same task, model and budget): said in the report, not dropped in silence."""
    usable = ok[np.isfinite(ok[metric].astype(float))]
    unmatched = []
    for (task, model, budget), cells in usable.groupby(["task", "model", "budget"], sort=True):
        present = set(cells["method"])
        for comp in sorted(m for m in present if method_kind(m) == "composition"):
            lacking = [p for p in dict.fromkeys(components(comp)) if p not in present]
            if lacking:
                unmatched.append(f"{comp} on {task}/{model} at D={float(budget):g} (no ok {' or '.join(lacking)} cell there)")
    return unmatched


def copies_of_a_part(cells: pd.DataFrame, composition: str, parts: list[str], metric: str) -> int:
    """The cells of `composition` whose numbers (`metric` and the test NLL) are those of one of its parts' cells on the
    same seed, to the bit: a part chose to do nothing there (a steering scale of 0 on validation), so the composition
    is its other part trained on the unchanged model. A gain of 0 there compares that part with itself, and says
    nothing about combining the two (a review found 86 of the demo's 120 such cells). Without the NLL, 0: a score
    alone (a count of questions) matches by chance."""
    if "nll" not in cells:
        return 0
    columns = list(dict.fromkeys(["seed", metric, "nll"]))

    def keys(method: str) -> list[tuple]:
        return [tuple(row) for row in cells.loc[cells["method"] == method, columns].itertuples(index=False)]

    of_parts = {key for part in parts for key in keys(part)}
    return sum(key in of_parts for key in keys(composition))


def composition_gains(ok: pd.DataFrame, *, metric: str, intervals: bool = True) -> list[CompositionGain]:
    """Gain of every composition over its best part wherever all parts were run; `intervals` False
    (--bootstrap 0) gives the point estimates only."""
    usable = ok[np.isfinite(ok[metric].astype(float))]
    gains = []
    for (task, model, budget), cells in usable.groupby(["task", "model", "budget"], sort=True):
        by_method = {m: improvement(g[metric].to_numpy(float), 0.0, metric) for m, g in cells.groupby("method")}
        outcomes = {m: outcome_matrix(g, metric) for m, g in cells.groupby("method")}
        for comp in sorted(m for m in by_method if method_kind(m) == "composition"):
            parts = list(dict.fromkeys(components(comp)))
            if not all(p in by_method for p in parts):
                continue
            best = max(parts, key=lambda p: by_method[p].mean())
            sides = [by_method[m] for m in [comp, *parts]]
            seeds = min(len(v) for v in sides)
            noise = [paired_noise(by_method[comp], by_method[q], outcomes[comp], outcomes[q]) for q in parts]
            # each comparison needs a variance: from the seeds, or from the questions (`paired_noise`)
            spread = all(np.ptp(by_method[comp]) > 0 or np.ptp(by_method[q]) > 0 or n.variance > 0 for q, n in zip(parts, noise))
            note = "" if not intervals else f"no interval: {seeds} seed(s) on a side, {MIN_SEEDS} needed" if seeds < MIN_SEEDS else \
                   "" if spread else "no interval: the seeds of a compared pair all scored the same, so they say nothing about the noise"  # fmt: skip
            lo, hi, p = gain_interval(by_method[comp], [by_method[q] for q in parts], noise) if intervals and not note else (np.nan,) * 3
            lo, hi = clip_difference(lo, hi, metric)
            gain = float(by_method[comp].mean() - by_method[best].mean())
            gains.append(CompositionGain(task, model, float(budget), comp, best, gain, lo, hi, sum(map(len, sides)), seeds, p, note,
                                         copies_of_a_part(cells, comp, parts, metric), len(by_method[comp])))  # fmt: skip
    return gains
