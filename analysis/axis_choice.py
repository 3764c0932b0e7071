"""Which x makes the tighter law: the joint laws and the crossover trend fitted against every axis.

Tightness of a joint law is the leave-the-top-out error the fits already report: a law that really
says how post-training scales with the base model should predict the best model from the others.
Each axis leaves out the model at its own top (the extrapolation a user of that axis would make)
and names it, since axes can disagree on which model that is. The crossover trend D* ∝ x^gamma is
judged by leaving out every model in turn (crossover.CrossoverScaling). Errors are compared only
within one group (same task, method and law), where they share units; the axis with the most wins
is the verdict.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.capability import AXES
from analysis.crossover import Crossover, CrossoverScaling, crossover_scaling
from analysis.curves import LawFit, joint_fits

TREND = "D* ∝ x^gamma"


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
    message: str

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AxisVerdict:
    x: str
    fitted: int  # groups where this axis produced a held-out error
    wins: int  # groups (with two or more axes fitted) where its error was the smallest
    median_error: float  # over the joint-law groups every usable axis fitted; metric units
    note: str  # why an axis could not be used at all

    def record(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AxisComparison:
    scores: list[AxisScore]
    verdicts: list[AxisVerdict]
    best: str | None  # most wins, ties broken by the smaller median error; None if nothing compared
    trends: list[CrossoverScaling]  # D* against every usable axis, for the plot

    def record(self) -> dict[str, object]:
        return {"best": self.best, "verdicts": [v.record() for v in self.verdicts], "scores": [s.record() for s in self.scores]}

    def error_table(self) -> list[tuple[str, str, str, dict[str, float], str]]:
        """(task, subject, law, {x: finite held-out error}, tightest x or "-") per group that any axis fitted."""
        groups: dict[tuple[str, str, str], dict[str, float]] = {}
        for s in self.scores:
            errors = groups.setdefault((s.task, s.subject, s.law), {})
            if np.isfinite(s.holdout_error):
                errors[s.x] = s.holdout_error
        return [(*key, e, min(e, key=e.get) if len(e) >= 2 else "-") for key, e in groups.items() if e]


def _law_score(f: LawFit) -> AxisScore:
    exponent = f.fit.params["alpha"] if f.ok else np.nan
    return AxisScore(f.task, f.method, f.law.name, str(f.x), exponent, f.holdout, f.holdout_error, f.message)


def compare_axes(
    frame: pd.DataFrame, *, metric: str, fits: list[LawFit], crossovers: list[Crossover],
    capabilities: pd.DataFrame, seed: int, pool: Executor | None = None,
) -> AxisComparison:  # fmt: skip
    """Every axis' joint laws (reusing `fits` where they were fitted on that axis) and trends."""
    scores, trends, notes = [], [], {}
    for name, axis in AXES.items():
        if not (len(capabilities) and np.isfinite(capabilities[name].to_numpy(float)).any()):
            notes[name] = f"no ok row has a usable {axis.column}"
            continue
        done = [f for f in fits if f.x == name]
        laws = done or joint_fits(frame, metric=metric, axis=axis, bootstrap=0, seed=seed, pool=pool)
        scores += [_law_score(f) for f in laws]
        for t in crossover_scaling(crossovers, capabilities, axis):
            trends.append(t)
            scores.append(AxisScore(t.task, f"{t.steering} -> {t.finetuning}", TREND, name, t.gamma, "each model", t.holdout_error, ""))
    return AxisComparison(scores, *_verdicts(scores, notes), trends)


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
