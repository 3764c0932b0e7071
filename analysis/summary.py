"""`fit_results`: every answer of the study from one results directory, saved beside the cells."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.axis_choice import TREND, AxisComparison, compare_axes
from analysis.bootstrap import CI_LEVEL
from analysis.capability import capability_table, get_axis
from analysis.composition import CompositionGain, composition_gains
from analysis.crossover import Crossover, CrossoverScaling, crossover_scaling, find_crossovers
from analysis.curves import LawFit, fit_curves
from analysis.efficiency import DataEfficiency, data_efficiency
from analysis.frontier import compute_frontier, frontier_by_compute, selectivity
from analysis.io import LoadedResults, Plan, load_rows_to_fit, mixed_pins_note, saved_before, unplanned_note, write_json, write_table
from analysis.link import SigmoidLink, fit_links
from analysis.metrics import check_metric, question_sampling_sd, whole_percent
from analysis.parallel import worker_pool
from analysis.unchanged import MOSTLY, Unchanged, idle_pairs, unchanged_cells

# A joint law's resamples redraw seeds (and questions) and keep its models, so they leave out how far each model sits
# off the law: at a 5 % scatter between 5 models, α's "95 %" interval held the truth in 25 % of simulations (helper-127)
JOINT_CI_NOTE = "95% bootstrap CIs (a joint law's resamples redraw its cells, not its models: narrower than its uncertainty across models)"


@dataclass(frozen=True)
class Analysis:
    """Everything derived from one set of rows; the report and the saved fits read from here."""

    loaded: LoadedResults
    metric: str
    bootstrap: int  # resamples behind every interval (0: point estimates only)
    x: str  # what stands for N in the joint laws and the crossover trend (capability.AXES)
    fits: list[LawFit]
    crossovers: list[Crossover]
    scaling: list[CrossoverScaling]
    compositions: list[CompositionGain]
    efficiency: list[DataEfficiency]
    frontier: pd.DataFrame
    frontier_levels: pd.DataFrame
    selectivity: pd.DataFrame
    links: list[SigmoidLink]
    capabilities: pd.DataFrame  # per (task, model): family and the value on every axis
    axes: AxisComparison
    unchanged: list[Unchanged]  # methods that mostly chose to do nothing, per task

    def fits_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.record() for f in self.fits])


def analyse(
    loaded: LoadedResults, *, metric: str = "score", bootstrap: int = 200, seed: int = 0, x: str = "params", workers: int = 1
) -> Analysis:
    """Every answer of the study; `workers` > 1 fits that many groups at once (analysis/parallel.py)."""
    check_metric(metric)
    axis = get_axis(x)
    ok = loaded.ok
    capabilities = capability_table(loaded.frame)
    with worker_pool(workers) as pool:
        fits = fit_curves(loaded.frame, metric=metric, bootstrap=bootstrap, seed=seed, x=x, pool=pool)
        both_idle = idle_pairs(ok)
        crossovers = [replace(c, idle=both_idle(c.task, c.model, c.steering, c.finetuning)) for c in find_crossovers(fits)]
        axes = compare_axes(loaded.frame, metric=metric, fits=fits, crossovers=crossovers, capabilities=capabilities, seed=seed, pool=pool)
    frontier = compute_frontier(ok, metric)
    return Analysis(
        loaded=loaded, metric=metric, bootstrap=bootstrap, x=x, fits=fits, crossovers=crossovers, scaling=crossover_scaling(crossovers, capabilities, axis),
        compositions=composition_gains(ok, metric=metric, intervals=bootstrap > 0),
        efficiency=data_efficiency(fits, ok), frontier=frontier,
        frontier_levels=frontier_by_compute(frontier, metric), selectivity=selectivity(ok, metric),
        links=fit_links(ok) if len(ok) else [], capabilities=capabilities, axes=axes, unchanged=unchanged_cells(ok),
    )  # fmt: skip


def _ci(value: float, lo: float, hi: float) -> str:
    if not np.isfinite(value):
        return "-"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{value:.3g}"
    return f"{value:.3g} [{lo:.3g}, {hi:.3g}]"


@dataclass(frozen=True)
class FitSummary:
    analysis: Analysis
    paths: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """The table `steerscale fit` prints: one line per fitted (or unfittable) curve."""
        a = self.analysis
        frame = a.loaded.frame
        n_failed = int((frame["status"] != "ok").sum()) if len(frame) else 0
        lines = [f"{len(frame)} rows ({n_failed} failed), {len(a.loaded.skipped)} unreadable files skipped; metric {a.metric}, "
                 f"N = {a.x} in the joint laws, " + (f"{a.bootstrap} resamples, {JOINT_CI_NOTE}" if a.bootstrap else "no CIs (--bootstrap 0)")]
        lines += [f"  skipped {s.path}: {s.reason}" for s in a.loaded.skipped]
        if a.loaded.unplanned or a.loaded.superseded or a.loaded.stale_data:
            lines.append(f"  {unplanned_note(a.loaded)}")
        if mixed := mixed_pins_note(a.loaded.frame):
            lines.append(f"  {mixed}")
        if a.bootstrap and (noise := question_noise_note(a)):
            lines.append(f"  {noise}")
        header = ("task", "method", "model", "law", "exponent", "asymptote", "n", "failed", "nan", "no N", "D=0", "holdout err", "note")
        table = [header]
        for f in a.fits:
            r = f.record()
            lost = f.unidentified()
            exponents = [f"{p}=not identified" if p in lost else f"{p}={_ci(r[p], r[p + '_lo'], r[p + '_hi'])}" for p in f.law.exponents] if f.ok else ["-"]
            table.append((
                f.task, f.method, f.model, f.law.name if f.x is None else f"{f.law.name}[{f.x}]", " ".join(exponents),
                _ci(r["asymptote"], r["asymptote_lo"], r["asymptote_hi"]), str(r["n_points"]), str(r["n_failed"]),
                str(r["n_nan"]), str(r["n_no_x"]), str(r["n_no_budget"]), "-" if not np.isfinite(r["holdout_error"]) else f"{r['holdout_error']:.3g}", f.note,
            ))  # fmt: skip
        lines += _aligned(table)
        if a.crossovers:
            lines.append("crossovers (where fine-tuning and steering swap places):")
            lines += [f"  {crossover_line(c)}" for c in a.crossovers]
        for s in a.scaling:
            held = f"; each model left out misses ln D* by {s.holdout_error:.2f} on average" if np.isfinite(s.holdout_error) else ""
            lines.append(f"  {s.describe()}{held}")
        if a.unchanged:  # after the crossovers and their trends, which are listed under the crossovers' header
            lines.append(f"methods that left the model as it was (test NLL the base model's to the bit) in {MOSTLY:.0%} or more of their "
                         "cells on a model: there the curve is the base model's, and a lead it holds is the other method's shortfall")  # fmt: skip
            lines += [f"  {u.task} {u.method}: {u.where()}" for u in a.unchanged]
        if a.compositions:
            lines.append("composition gains (over the best single part):")
            for g in a.compositions:
                few = f" ({g.note})" if g.note else ""
                lines.append(f"  {g.task} {g.model} D={g.budget:g}: {g.composition} vs {g.best_single}: {_ci(g.gain, g.gain_lo, g.gain_hi)}{few}")
        if a.links:
            lines.append("sigmoid links, score = floor + (ceiling - floor) / (1 + exp(slope (nll - midpoint))):")
            for k in a.links:
                flag = f"; {k.note}" if k.note else ""
                lines.append(
                    f"  {k.task}: floor {k.floor:.3g}, ceiling {k.ceiling:.3g}, slope {k.slope:.3g}, "
                    f"midpoint {k.midpoint:.3g} (n {k.n_points}, rmse {k.rmse:.3g}){flag}"
                )
        lines += axes_text(a)
        lines += [f"wrote {path}" for path in self.paths.values()]
        return "\n".join(lines)

    @property
    def report_page(self) -> Path:
        """report.html, when `write_report` made this summary."""
        if "report.html" not in self.paths:
            raise ValueError("no report was written with these fits (steerscale report writes one)")
        return Path(self.paths["report.html"])


def _aligned(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def axes_text(a: Analysis) -> list[str]:
    """Which x gives the tighter law: held-out error per group and axis, then the axis with the most wins (not a finding)."""
    groups = a.axes.error_table()
    if not groups:
        return [f"x-axis comparison: no axis has a held-out error to compare: {a.axes.why_no_errors()}"]
    names = [v.x for v in a.axes.verdicts]
    table = [("task", "method / pair", "law", *names, "tightest")]
    table += [(task, subject, law, *(f"{errors[x]:.3g}" if x in errors else "-" for x in names), tightest)
              for task, subject, law, errors, tightest in groups]  # fmt: skip
    lines = [f"x-axis comparison: held-out error (laws: the model at the top of each axis left out, in {a.metric} units; "
             "the D* trend: each model left out, mean |ln D*|):", *("  " + line for line in _aligned(table))]  # fmt: skip
    if a.axes.pooled:
        lines.append(f"  {a.axes.pooled_note()}")
    for v in a.axes.verdicts:
        median = f", median law error {v.median_error:.3g}" if np.isfinite(v.median_error) else ""
        lines.append(f"  {v.x}: not usable ({v.note})" if v.note else f"  {v.x}: tightest in {v.wins} of the groups it fits ({v.fitted}){median}")
    if not a.axes.best:
        return [*lines, f"  tighter law: {a.axes.why_no_best()}"]
    on_idle, won, _ = wins_on_idle_models(a)
    idle = (f"; {on_idle} of its {won} wins among the laws are on a held-out model the method left as it was, where the law "
            "predicts the base score task_score is made of") if on_idle and a.axes.best == "task_score" else ""
    return [*lines, f"  most wins: x = {a.axes.best} (not a finding: not like-for-like, each axis leaves out its own top model, and "
                    f"task_score reads the held-out model's base score off the test set{idle})"]  # fmt: skip


def crossover_line(c: Crossover) -> str:
    """One crossover as `fit` prints it: the claim, D*'s interval and the resamples' share, then its dispute
    (`Crossover.disputed`; after the interval, which read as the Welch interval's where it followed the dispute)."""
    ci = f" CI {c.interval()}" if c.interval() else ""
    firm = f" (under {CI_LEVEL:.0%}: not a finding)" if c.share < CI_LEVEL else " (not a finding: disputed)" if c.disputed else ""
    agree = f", {whole_percent(c.share)}% of resamples agree{firm}{c.resampled_note()}" if np.isfinite(c.share) else c.unresampled_note()
    idle = "; both methods left the model as it was in most cells both measured" if c.idle else ""
    dispute = f"; {c.disputed}" if c.disputed else ""
    return f"{c.task} {c.model}: {c.claim()}{ci}{agree}{idle}{dispute}"


def wins_on_idle_models(a: Analysis) -> tuple[int, int, list[str]]:
    """Of the most-winning axis' wins among the joint laws: how many are on a held-out model the method left as it was in
    half its cells or more (`unchanged`), out of how many, and the laws they span (a method wins once per law)."""
    idle = {(u.task, u.method, model) for u in a.unchanged for model, *_ in u.by_model}
    won = [(task, subject, law) for task, subject, law, _, tightest in a.axes.error_table() if tightest == a.axes.best and law != TREND]
    held = {(s.task, s.subject, s.law): s.held_models for s in a.axes.scores if s.x == a.axes.best}
    on_idle = sum(any((task, subject, model) in idle for model in held.get((task, subject, law), [])) for task, subject, law in won)
    return on_idle, len(won), sorted({law for _, _, law in won})


def question_noise_note(a: Analysis) -> str | None:
    """What the bootstrap leaves out for fits whose rows do not all store their questions' outcomes (older
    rows, a task that records none; every cell of a task is scored on the same test questions), or store
    them for test sets of different sizes (rows of two eval.test_size settings); of NLL fits, that no row stores
    its questions' NLLs. `fit` prints it as the report does (helper-179: the report alone said so)."""
    ok = a.loaded.ok
    if not len(ok):
        return None
    if a.metric == "nll":  # rows keep no per-question NLLs: no fit can redraw its questions (helper-139)
        return ("The rows store no per-question NLLs, so every NLL interval redraws seeds only, and every seed is scored on the "
                "same test questions: the intervals leave out how far the NLLs would move on another draw of questions from the "
                "task, and seeds that agree give an interval of no width. An interval is a statement about these questions.")  # fmt: skip
    parts, mixed = [], []
    for task, rows in ok.groupby("task"):
        boots = [f.boot for f in a.fits if f.task == task and f.boot is not None]
        seeds_only = sum(not boot.questions for boot in boots)
        sizes = sorted({len(o) for o in rows.get("score_outcomes", pd.Series(dtype=object)) if isinstance(o, (list, tuple, np.ndarray))})
        noise = question_sampling_sd(rows[a.metric].to_numpy(dtype=float))
        if seeds_only and len(sizes) > 1:
            mixed.append(f"`{task}` ({seeds_only} of its {len(boots)} fits; {' and '.join(map(str, sizes))} questions)")
        elif seeds_only and noise is not None:
            parts.append(f"`{task}` ({seeds_only} of its {len(boots)} fits) about {noise[0]} questions, ±{noise[1]:.2g} sd at its mean score")
    text = []
    if mixed:
        text.append("Some fits mix rows scored on test sets of different sizes (rows of another eval.test_size): "
                    + "; ".join(mixed) + ". Their curves pool scores on different questions, and their intervals redraw "
                    "seeds only (a resample cannot redraw two test sets as one); fit one setting's rows (`--planned-only`), or "
                    "rerun the others at one eval.test_size.")  # fmt: skip
    if parts:
        text.append("Some fits' rows do not all store their test questions' outcomes (rows from before schema 3, or a task that records "
                    "none), so their intervals redraw seeds only, and every seed is scored on the same questions: they leave out how far "
                    "the scores would move on another draw of questions from the task (binomial, judged from the step the scores move in: "
                    + "; ".join(parts) + "). Methods share the questions, so that noise moves their curves partly together; a larger "
                    "eval.test_size shrinks it, and `steerscale run CONFIG --force` reruns the cells to store the outcomes. An interval "
                    "narrower than it is a statement about these questions.")  # fmt: skip
    return " ".join(text) or None


def output_suffix(metric: str, x: str) -> str:
    """What the names of a fit's outputs add: nothing for the score on parameters, `-<metric>` for another metric and
    `-<x>` for another axis, so that fitting the NLL, or on another axis, never overwrites the default fits or report
    (nor the other way round: `fit --x neutral_loss` replaced the fits.json a report had been written from)."""
    return ("" if metric == "score" else f"-{metric}") + ("" if x == "params" else f"-{x}")


def fit_file(metric: str, x: str, extension: str) -> str:
    """The name of a fit's file beside the cells: `fits.<extension>`, or e.g. `fits-nll.<extension>` (`output_suffix`)."""
    return f"fits{output_suffix(metric, x)}.{extension}"


def save_fits(results_dir: str, analysis: Analysis) -> dict[str, str]:
    """fits.parquet (one row per law fit), crossovers.parquet (one row per steering × fine-tuning pair) and fits.json
    (the fits plus every derived answer); named with `output_suffix` for a metric other than the score or an axis other
    than params (fits-nll.json, crossovers-nll.parquet). Keyed by the score's names, whatever the metric."""
    frame = analysis.fits_frame()
    payload = {
        "metric": analysis.metric,
        "x": analysis.x,
        "bootstrap": analysis.bootstrap,  # what else can differ between two fits of one directory, so that a reader can tell
        "planned_only": analysis.loaded.planned_only,
        "rows": len(analysis.loaded.frame),
        "skipped_files": [s.__dict__ for s in analysis.loaded.skipped],
        "fits": frame.to_dict(orient="records"),
        "crossovers": [c.record() for c in analysis.crossovers],
        "crossover_scaling": [s.record() for s in analysis.scaling],
        "composition_gains": [g.record() for g in analysis.compositions],
        "data_efficiency": [e.record() for e in analysis.efficiency],
        "compute_frontier": analysis.frontier_levels.to_dict(orient="records"),
        "sigmoid_links": [k.record() for k in analysis.links],
        "capabilities": analysis.capabilities.to_dict(orient="records"),
        "axis_comparison": analysis.axes.record(),
        "unchanged": [{"task": u.task, "method": u.method, "by_model": [dict(zip(("model", "unchanged", "cells"), m)) for m in u.by_model]}
                      for u in analysis.unchanged],  # fmt: skip
    }
    return {"fits.parquet": write_table(results_dir, fit_file(analysis.metric, analysis.x, "parquet"), frame),
            "crossovers.parquet": write_table(results_dir, f"crossovers{output_suffix(analysis.metric, analysis.x)}.parquet", crossover_frame(analysis.crossovers)),
            "fits.json": write_json(results_dir, fit_file(analysis.metric, analysis.x, "json"), payload)}


def crossover_frame(crossovers: list[Crossover]) -> pd.DataFrame:
    """One row per (task, model, steering, fine-tuning) pair: D*, its interval (±inf kept as floats, where fits.json
    writes "inf"), the share of resamples that agree and the verdict: the study's answer as a table to load."""
    columns = [f.name for f in fields(Crossover) if f.name != "overtakes"]
    kinds = {"float": float, "bool": bool}  # typed even with no row (object columns read back); the annotations are strings here
    numbers = {f.name: kinds[f.type] for f in fields(Crossover) if f.type in kinds}
    return pd.DataFrame([c.record() for c in crossovers], columns=columns).astype(numbers)


def fit_results(
    results_dir: str, *, metric: str = "score", bootstrap: int = 200, seed: int = 0, x: str = "params", workers: int = 1,
    planned_only: bool = False, plan: Plan | None = None,
) -> FitSummary:
    """Load the cells, fit every curve and derived answer, write fits.parquet, crossovers.parquet and fits.json (`save_fits`;
    other names for a metric other than the score or an axis other than params) unless there is nothing to fit and an earlier fit to keep
    (`keeps_earlier`).

    `x` names what stands for N in the joint laws and the crossover trend: "params",
    "neutral_loss" or "task_score" (analysis/capability.py); every axis is compared regardless.
    `workers` > 1 fits that many groups at once, in worker processes; the numbers do not change.
    `plan` is the sweep's planned cells (`load_rows_to_fit`; default: the results' plan.json).
    """
    get_axis(x)  # a wrong name fails before any file is read
    analysis = analyse(load_rows_to_fit(results_dir, planned_only=planned_only, plan=plan), metric=metric, bootstrap=bootstrap, seed=seed, x=x, workers=workers)
    keep = keeps_earlier(analysis, saved_before(results_dir, fit_file(metric, x, "json")))
    return FitSummary(analysis, {} if keep else save_fits(results_dir, analysis))


def keeps_earlier(analysis: Analysis, earlier: bool) -> bool:
    """Whether an earlier fit's files (or report) stay as they were: nothing to fit (every row failed, the cells
    unreadable) does not replace what was fitted before with an empty one. Where there is none, the empty one
    is written: a sweep just started has a report that says so."""
    return earlier and not len(analysis.loaded.ok)

