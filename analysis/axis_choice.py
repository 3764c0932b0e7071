"""Which x makes the tighter law: the joint laws and the crossover trend fitted against every axis.

Tightness of a joint law is the leave-the-top-out error the fits already report: a law that really
says how post-training scales with the base model should predict the best model from the others.
Each axis leaves out the model at its own top (the extrapolation a user of that axis would make)
and names it, since axes can disagree on which model that is. The crossover trend D* ∝ x^gamma is
judged by leaving out every model in turn (crossover.CrossoverScaling). Errors are compared only
within one group (same task, method and law), where they share units; the axis with the most wins
is the verdict.

The comparison asks which x lets one law span every family, so every axis is scored pooled. Where the
fits split parameters by family (a sweep of several families: capability.split_by_family), the params
column is the pooled law and trend those fits do not state: the baseline a capability axis must beat,
not the per-family laws, which have a parameter set per family and leave out each family's own top
model. The plotted trends (`AxisComparison.trends`) are the ones the analysis states: per family there.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.capability import AXES, split_by_family
from analysis.crossover import MIN_TREND_MODELS, Crossover, CrossoverScaling, crossover_scaling
from analysis.curves import LawFit, joint_fits
from analysis.fitting import MIN_DISTINCT

TREND = "D* ∝ x^gamma"
# held-out errors within this fraction of each other are a tie: two axes whose laws fit the same curve (an exponent at
# 0, x unused) differ in the 13th digit, and a win on that named the tighter axis
TIE_FRACTION = 1e-3


@dataclass(frozen=True)
class AxisScore:
    """One joint law, or one crossover trend, fitted against one axis."""

    task: str
    subject: str  # the method of a joint law; "steering -> fine-tuning" for a crossover trend
    law: str  # additive | multiplicative | TREND
    x: str
    exponent: float  # alpha of a law, gamma of a trend
    held_out: str
    holdout_error: float  # metric units for a law; mean |ln D*| missed for a trend
    message: str  # why a law was not fitted
    models: int  # models a law had usable cells of; for a trend, models with a finite D*
    held_models: tuple[str, ...] = ()  # the models `held_out` names (ties: several); none for a trend ('each model')

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AxisVerdict:
    x: str
    fitted: int  # groups where this axis produced a held-out error
    wins: int  # groups (with two or more axes fitted) where its error was the smallest, by more than TIE_FRACTION
    median_error: float  # over the joint-law groups every usable axis fitted; metric units
    note: str  # why an axis could not be used at all

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AxisComparison:
    scores: list[AxisScore]
    verdicts: list[AxisVerdict]
    best: str | None  # most wins, ties broken by the smaller median error; None if nothing compared
    trends: list[CrossoverScaling]  # D* against every usable axis, as the analysis states it (per family on params), for the plot
    pooled: list[str] = field(default_factory=list)  # axes scored pooled although the fits split them by family

    def record(self) -> dict[str, object]:
        """The verdict and every score; `pooled` only where an axis was scored pooled against the fits' split."""
        pooled = {"pooled_across_families": self.pooled} if self.pooled else {}
        return {"best": self.best, "verdicts": [v.record() for v in self.verdicts], "scores": [s.record() for s in self.scores], **pooled}

    def pooled_note(self) -> str:
        """What the columns of `pooled` compare, for the report and the fit's text."""
        return (f"{', '.join(self.pooled)}: scored as one law and one trend over every family, which the fits split by family (a law in it cannot "
                "pool families): the baseline a capability axis must beat to span the families, not the per-family laws.")  # fmt: skip

    def error_table(self) -> list[tuple[str, str, str, dict[str, float], str]]:
        """(task, subject, law, {x: finite held-out error}, tightest x or "-") per group that any axis fitted."""
        groups: dict[tuple[str, str, str], dict[str, float]] = {}
        for s in self.scores:
            errors = groups.setdefault((s.task, s.subject, s.law), {})
            if np.isfinite(s.holdout_error):
                errors[s.x] = s.holdout_error
        return [(*key, e, _tightest(e)) for key, e in groups.items() if e]

    def why_no_best(self) -> str:
        """Why there is no verdict: too few axes to compare, or every comparison a tie."""
        if any(len(errors) >= 2 for *_, errors, _ in self.error_table()):
            return f"no axis beats another by more than {TIE_FRACTION:.1%} of the held-out error in any group (ties)"
        return "nothing to compare (needs two usable axes)"

    def why_no_errors(self) -> str:
        """Why no law or trend has a held-out error, in the sweep's own counts: with three models a joint law
        is fitted, but leaving its top model out leaves two, too few to fit it again."""
        laws = [s for s in self.scores if s.law != TREND]
        fitted = [s.models for s in laws if not s.message]
        if fitted:
            most = max(fitted)
            short = f": {most - 1} left, fewer than the {MIN_DISTINCT} a law needs" if most - 1 < MIN_DISTINCT else ""
            law = f"the joint laws were fitted over at most {most} models, but not again without the top one{short}"
        else:
            law = f"no joint law could be fitted ({laws[0].message})" if laws else "no axis has values to fit a joint law on"
        crossing = max((s.models for s in self.scores if s.law == TREND), default=0)
        finite = f"at most {crossing} models" if crossing else "fewer than two models"
        trend = (f"the D* trend has {finite} with a finite D* (fine-tuning overtaking inside the measured range), "
                 f"and leaving each out needs {MIN_TREND_MODELS}")  # fmt: skip
        return f"{law}; {trend}"


def _tightest(errors: dict[str, float]) -> str:
    """The axis with the smallest error, where it beats the runner-up by more than TIE_FRACTION; else "-"."""
    if len(errors) < 2:
        return "-"
    best, runner_up = sorted(errors, key=errors.get)[:2]
    return best if errors[runner_up] - errors[best] > TIE_FRACTION * errors[runner_up] else "-"


def _law_score(f: LawFit) -> AxisScore:
    exponent = f.fit.params["alpha"] if f.ok else np.nan
    models = len(np.unique(f.points.n))
    return AxisScore(f.task, f.method, f.law.name, str(f.x), exponent, f.holdout, f.holdout_error, f.message, models, f.held_models)


def compare_axes(
    frame: pd.DataFrame, *, metric: str, fits: list[LawFit], crossovers: list[Crossover],
    capabilities: pd.DataFrame, seed: int, pool: Executor | None = None,
) -> AxisComparison:  # fmt: skip
    """Every axis' pooled joint laws (reusing `fits` where they were fitted pooled on that axis) and pooled
    trends, scored; the trends as the analysis states them, for the plot."""
    scores, trends, notes, pooled = [], [], {}, []
    for name, axis in AXES.items():
        if not (len(capabilities) and np.isfinite(capabilities[name].to_numpy(float)).any()):
            notes[name] = f"no ok row has a usable {axis.column}"
            continue
        done = [f for f in fits if f.x == name and not f.family]
        laws = done or joint_fits(frame, metric=metric, axis=axis, bootstrap=0, seed=seed, pool=pool, pooled=True)
        scores += [_law_score(f) for f in laws]
        scored = crossover_scaling(crossovers, capabilities, axis, pooled=True)
        scores += [AxisScore(t.task, f"{t.steering} -> {t.finetuning}", TREND, name, t.gamma, "each model", t.holdout_error, "", t.n_models)
                   for t in scored]  # fmt: skip
        split = split_by_family(axis, capabilities)
        trends += crossover_scaling(crossovers, capabilities, axis) if split else scored
        pooled += [name] if split else []
    return AxisComparison(scores, *_verdicts(scores, notes), trends, pooled)


def _verdicts(scores: list[AxisScore], notes: dict[str, str]) -> tuple[list[AxisVerdict], str | None]:
    table = AxisComparison(scores, [], None, []).error_table()
    usable = [name for name in AXES if name not in notes]
    wins = {name: sum(tightest == name for *_, tightest in table) for name in AXES}
    common = [e for _, _, law, e, _ in table if law != TREND and all(name in e for name in usable)]
    verdicts = [
        AxisVerdict(
            name, sum(name in e for _, _, _, e, _ in table), wins[name],
            float(np.median([e[name] for e in common])) if common and name in usable else np.nan, notes.get(name, ""),
        )
        for name in AXES
    ]  # fmt: skip
    compared = any(tightest != "-" for *_, tightest in table)
    ranked = sorted(verdicts, key=lambda v: (-v.wins, np.nan_to_num(v.median_error, nan=np.inf)))
    return verdicts, ranked[0].x if compared else None
