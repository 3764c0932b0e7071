"""`write_report`: the fits, then report.md, a self-contained report.html and the PNGs under <results_dir>/report/
(report-nll/ for the NLL, report-<x>/ for another axis than params).

The report is built once as a list of blocks (headings, paragraphs, tables, images) and rendered
twice, so the Markdown and the HTML cannot drift apart. It must say something useful about any
results directory, including one with a single model size or only failed cells, so every
section states what could not be computed rather than disappearing.
"""

from __future__ import annotations

import base64
import html
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis.axis_choice import TREND
from analysis.bootstrap import CI_LEVEL
from analysis.capability import AXES, get_axis
from analysis.composition import CompositionGain, Welch, copies_of_a_part, holm, paired_noise, unmatched_compositions
from analysis.crossover import MIN_TREND_MODELS, Crossover
from analysis.curves import outcome_matrix
from analysis.decisions import Decisions, read_decisions
from analysis.efficiency import EXTRAPOLATION_LIMIT, DataEfficiency
from analysis.fitting import HUBER_DELTA
from analysis.io import Plan, load_rows_to_fit, mixed_pins_note, neutral_texts_of, resolve, saved_before, unplanned_note
from analysis.methods import PROMPT_METHODS, components
from analysis.metrics import HIGHER_IS_BETTER, ROUNDING, clip_difference, whole_percent
from analysis.plots import adaptive_plot, budget_curves_plot, crossover_plot, frontier_plot, selectivity_plot
from analysis.summary import Analysis, FitSummary, analyse, fit_file, keeps_earlier, output_suffix, question_noise_note, save_fits, wins_on_idle_models
from analysis.unchanged import MOSTLY, Unchanged, alike_method_pairs, alike_pairs, one_of_alike, unchanged_counts, unchanged_share


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    """A list: a legend of several terms is read term by term, and as one paragraph it was a 2,000-character block."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Image:
    path: Path
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image


def _num(value: float | None) -> str:
    """A number for a table; NaN, inf and None (a NaN that went through JSON, as in adaptive.jsonl) as "-"."""
    return f"{value:.3g}" if value is not None and np.isfinite(value) else "-"


def _ci(value: float, lo: float, hi: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.3g} [{_num(lo)}, {_num(hi)}]"


def _overview(a: Analysis) -> list[Block]:
    frame = a.loaded.frame
    failed = int((frame["status"] != "ok").sum()) if len(frame) else 0
    text = (
        f"{len(frame)} cells ({failed} failed) over {frame['task'].nunique()} task(s), "
        f"{frame['method'].nunique()} method(s) and {frame['model'].nunique()} model size(s); metric `{a.metric}`; "
        f"N in the joint laws is `{a.x}`. "
        + (f"Intervals are 95 % percentile bootstrap intervals over cells ({a.bootstrap} resamples): how they are drawn, and how "
           "often such intervals covered the truth in simulations, is under \"How the intervals are drawn\", before the plots."
           if a.bootstrap else "No intervals (--bootstrap 0).")
    )
    blocks: list[Block] = [Heading("Overview"), Paragraph(text)]
    if a.bootstrap and (noise := question_noise_note(a)):
        blocks.append(Paragraph(noise))
    if a.loaded.unplanned or a.loaded.superseded or a.loaded.stale_data:
        blocks.append(Paragraph(unplanned_note(a.loaded)))
    if mixed := mixed_pins_note(a.loaded.frame):
        blocks.append(Paragraph(mixed))
    if a.loaded.skipped:
        blocks.append(Paragraph(f"{len(a.loaded.skipped)} unreadable file(s) were skipped:"))
        blocks.append(Table(("file", "reason"), [(s.path, s.reason) for s in a.loaded.skipped]))
    return blocks


def _intervals(a: Analysis) -> list[Block]:
    """How the intervals were drawn, at the end of the page: the overview's first paragraph was 1,600 characters of it."""
    if not a.bootstrap:
        return []
    return [Heading("How the intervals are drawn"), Paragraph(
        "Each resample redraws the cells within each budget (each (N, D) for the joint laws). Where the questions are not "
        "redrawn (the overview names such fits), each resample's values spread about their point's mean by √(n/(n − 1)) for "
        "n seeds, so that they vary as much as n new seeds would (with 2 seeds a point, simulated 95 % intervals still covered the truth only "
        "82–91 % of the time); a point measured once moves by a seed deviation drawn from the other points', and a curve "
        "with too few seeds to lend is redrawn as a whole (one seed at each of 4 budgets: a resample then loses a budget 9 "
        "times in 10, and in simulations the exponent's intervals covered the truth 77–86 % of the time, 97–100 % at 7 "
        "budgets). Where the rows store each test question's outcome, every resample also redraws the task's test questions "
        "(one draw per resample for all its cells, so methods compared on it stay paired) and refits to the scores on them."),
        Paragraph("Composition gains and the best method's lead have Welch t-intervals over seeds, with the questions' own "
                  "variance added where the rows store their outcomes (paired: both sides answered the same questions) — "
                  "which also adds its degrees of freedom, so with 2 seeds a side such an interval is often narrower than the "
                  "seeds' alone, and covered the truth about 93 % of the time in simulations (95 % with 3 seeds).")]  # fmt: skip


def _findings(a: Analysis) -> list[Block]:
    """The short written summary: what the fits say, in sentences."""
    lines = []
    ok = a.loaded.ok
    for task in sorted({f.task for f in a.fits} | set(ok["task"] if len(ok) else ())):
        lines.append(best_measured(task, a.loaded.frame, a.metric))
    fitted = [f for f in a.fits if f.ok]
    bounded = sum(bool(f.bound_notes()) for f in fitted)
    if bounded:
        lines.append(f"{bounded} of the {len(fitted)} fits put a parameter at its bound (marked in the table of fits): there the data do "
                     "not pin the curve down, so its exponent and asymptote are not findings. A D* compares two curves only where "
                     "there are data; the share of resamples that agree with it says how firm it is.")
    unidentified = sum(bool(f.unidentified()) for f in fitted)
    if unidentified:
        flat = sum(f.no_spread() for f in fitted)
        lines.append(f"In {unidentified} of the {len(fitted)} fits a term is ≈ 0 over the data (marked 'not identified'): any value of its "
                     "exponent fits as well, so that exponent has no interval and is not a finding"
                     + (f"; in {flat} of them the metric does not move at all, so only its level is measured." if flat else "."))
    shaky = sum(bool(f.unidentified_in_resamples()) for f in fitted)
    if shaky:
        lines.append(f"In {shaky} of the {len(fitted)} fits a term is ≈ 0 in over {1 - CI_LEVEL:.0%} of the bootstrap resamples (marked "
                     "'not identified in … of resamples'): the exponent's value is shown, without an interval.")
    alike = alike_method_pairs(ok)
    shared = [c for c in a.crossovers if np.isfinite(c.share)]
    if len(shared) >= 10:  # a family of comparisons: say what the per-pair threshold means across it
        firm = [c for c in shared if c.share >= CI_LEVEL and not c.disputed]
        idle = sum(c.idle for c in firm)
        idle_note = f", {idle} of them between two methods that mostly left the model as it was (‡)" if idle else ""
        repeated = repeated_outcomes(firm, ok)
        repeats = (f"; {len(repeated)} of them {'repeats' if len(repeated) == 1 else 'repeat'} another through a method that scored "
                   f"as another to the bit there: {'; '.join(repeated)}") if repeated else ""  # fmt: skip
        lines.append(f"{len(firm)} of the {len(shared)} crossover outcomes are firm ({CI_LEVEL:.0%} of the resamples agreeing, neither the "
                     f"measured means nor a law that cannot follow its cells disputing them{idle_note}{repeats}). The share is each "
                     "pair's own, not corrected for the number of pairs (composition gains are, with Holm's correction): where "
                     "the truth is a tie, roughly one pair in ten to twenty still reaches it by chance (either side can), so a lone "
                     "firm outcome among many pairs is weaker evidence than its share says. "
                     f"The shares come from {a.bootstrap} resamples, so one near {CI_LEVEL:.0%} is itself uncertain by "
                     f"±{100 * (CI_LEVEL * (1 - CI_LEVEL) / a.bootstrap) ** 0.5:.1f} points (one standard error)"
                     + (": refit with more (`--bootstrap 1000`) before citing an outcome at the line." if a.bootstrap < 1000 else "."))  # fmt: skip
    trends = [s for s in a.scaling if s.enough_models]
    lines += [s.describe() + "." for s in trends if s.has_interval]
    bare = sum(not s.has_interval for s in trends)
    if bare:
        lines.append(f"{bare} D* trend(s) across models have no interval ({'--bootstrap 0' if not a.bootstrap else f'fewer than {CI_LEVEL:.0%} of the resamples give a slope'}), "
                     f"so they are not stated here (see the fit's text and {fit_file(a.metric, a.x, 'json')}).")  # fmt: skip
    if few := len(a.scaling) - len(trends):
        lines.append(f"{few} D* trend(s) go through fewer than {MIN_TREND_MODELS} models with a finite D* (a line through two fits them "
                     f"exactly), so they are not stated here either ({fit_file(a.metric, a.x, 'json')} keeps them).")  # fmt: skip
    lines += composition_findings(a.compositions)
    lines += [line for line in [unchanged_share(a.loaded.ok)] if line]
    after = [line for line in [alike_pairs(alike)] if line]
    if not a.crossovers:
        after.append("No crossover could be computed: it needs fitted budget curves for a steering and a fine-tuning method on the same task and model.")
    return [Heading("What the fits say"), *_crossover_table(a), *map(Paragraph, lines), *_unchanged_table(a.unchanged, a.loaded.ok), *map(Paragraph, after)]


def repeated_outcomes(crossovers: list[Crossover], ok: pd.DataFrame) -> list[str]:
    """The crossovers whose outcome another of `crossovers` gives already through a method that scored as its copy, to
    the bit, on that task and model (`alike_method_pairs` there, `one_of_alike`), each as 'task_vector as full_ft on
    arith ladder:s': one finding, not two. Pairs are judged per task and model: pooled over every model, two methods
    alike on some were merged on a model where they never scored alike (helper-178)."""
    stand_ins = {}
    for task, model in {(c.task, c.model) for c in crossovers}:
        cells = ok[(ok["task"] == task) & (ok["model"] == model)] if {"task", "model"} <= set(ok.columns) else ok.iloc[:0]
        stand_ins[(task, model)] = one_of_alike(alike_method_pairs(cells))
    first: dict[tuple[str, ...], Crossover] = {}
    repeats = []
    for c in crossovers:
        stand_in = stand_ins[(c.task, c.model)]
        key = (c.task, c.model, stand_in(c.steering), stand_in(c.finetuning), c.outcome)
        if key not in first:
            first[key] = c
            continue
        copies = [f"{copy} as {original}" for original, copy in ((first[key].steering, c.steering), (first[key].finetuning, c.finetuning))
                  if copy != original]  # fmt: skip
        repeats.append(f"{', '.join(copies)} on {c.task} {c.model}")
    return repeats


def _unchanged_table(unchanged: list[Unchanged], ok: pd.DataFrame) -> list[Block]:
    """The (task, method)s that left the model as it was in half or more of their cells on a model, one row each and a
    column per model: the quickstart's seventeen sentences of the same form made the page's summary a wall of text."""
    if not unchanged:
        return []
    sizes = pd.to_numeric(ok["params_nonembed"], errors="coerce").groupby(ok["model"]).median() if "params_nonembed" in ok else pd.Series(dtype=float)
    models = sorted({model for u in unchanged for model, *_ in u.by_model}, key=lambda m: (np.nan_to_num(sizes.get(m, np.nan), nan=np.inf), m))
    rows = [(u.task, u.method, *(next((f"{n} of {total}" for m, n, total in u.by_model if m == model), "") for model in models))
            for u in unchanged]  # fmt: skip
    return [Paragraph(f"Where a method left the model as it was (its test NLL the base model's to the bit: it chose, or was set, "
                      f"to do nothing) in {MOSTLY:.0%} or more of its cells on a model (positive budgets), the table counts them: "
                      "there its curve is the base model's, and a lead it holds is the other method's shortfall against doing nothing."),
            Table(("task", "method", *models), rows)]  # fmt: skip


MEASURED_FILE = "measured.csv"


def measured_points(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Every measured point: `metric`'s mean, seed standard deviation, count, min and max over the ok cells of each
    (task, model, method, budget), models smallest first — what the fits were fitted to, for a reader's own plot or
    table without reading the cells back (one CSV beside the report: `MEASURED_FILE`)."""
    columns = ["task", "model", "params_nonembed", "method", "budget", "cells", "mean", "sd", "min", "max"]
    rows = ok[np.isfinite(ok[metric].astype(float))] if len(ok) else ok
    if not len(rows):
        return pd.DataFrame(columns=columns)
    rows = rows.assign(value=rows[metric].astype(float), budget=rows["budget"].astype(float),
                       params_nonembed=pd.to_numeric(rows["params_nonembed"], errors="coerce"))  # fmt: skip
    size = rows.groupby("model")["params_nonembed"].median().rename("params_nonembed")
    points = rows.groupby(["task", "model", "method", "budget"])["value"].agg(cells="count", mean="mean", sd="std", min="min", max="max")
    points = points.reset_index().join(size, on="model")
    return points.sort_values(["task", "params_nonembed", "model", "method", "budget"], na_position="last")[columns].reset_index(drop=True)


def _measured(a: Analysis) -> list[Block]:
    """Per task, each method's mean at each budget on the largest model (the one `best_measured` compares on); the
    other models' are in the CSV."""
    points = measured_points(a.loaded.ok, a.metric)
    blocks: list[Block] = [Heading("Measured"), Paragraph(
        f"Every measured point — `{a.metric}`'s mean, seed standard deviation, count, min and max per task, model, method and "
        f"budget, {len(points)} in all — is in `{MEASURED_FILE}` beside this report. Below, each task's largest model: the "
        "mean over its cells (seeds) at each budget; — where the method was not measured.")]  # fmt: skip
    for task, group in points.groupby("task", sort=True):
        largest = group.sort_values(["params_nonembed", "model"], na_position="first")["model"].iloc[-1]
        on = group[group["model"] == largest]
        means = {(m, d): v for m, d, v in zip(on["method"], on["budget"], on["mean"])}
        alone = sorted(set(on["method"]) - set(on.loc[on["budget"] > 0, "method"]))  # measured at D=0 only (base): in the title
        rows = on[~on["method"].isin(alone)]
        budgets = sorted(rows["budget"].unique())
        title = "".join(f", {m} {means[(m, 0.0)]:.3g}" for m in alone)
        blocks.append(Paragraph(f"{task}, on {largest}{title}:"))
        if len(rows):
            blocks.append(Table(("method", *(f"D={d:g}" for d in budgets)),
                                [(m, *(f"{means[(m, d)]:.3g}" if (m, d) in means else "—" for d in budgets)) for m in sorted(rows["method"].unique())]))  # fmt: skip
    return blocks


def best_measured(task: str, stored: pd.DataFrame, metric: str) -> str:
    """Which method measured best on the largest model: cell means of every method measured there (ok rows at
    a positive budget), fitted or not, and not an extrapolated asymptote. `stored` holds every row, ok or
    failed: a method none of whose cells there is ok is named as such, not left out in silence.

    Methods are compared at one budget, the largest every method on that model was measured at (each
    at its own largest would credit whichever had the larger budget). Where no budget is shared by
    all, the largest shared by the most methods, naming those it leaves out.
    """
    attempted = stored[(stored["task"] == task) & (stored["budget"].astype(float) > 0)] if len(stored) else stored
    rows = attempted[(attempted["status"] == "ok") & np.isfinite(attempted[metric].astype(float))] if len(attempted) else attempted
    if rows.empty:
        return f"On {task}, no cell is ok with a finite {metric} at a positive budget, so no method is compared."
    size = {m: float(pd.to_numeric(g["params_nonembed"], errors="coerce").median()) for m, g in rows.groupby("model")}
    largest = max(size, key=lambda m: (np.nan_to_num(size[m], nan=-np.inf), m))  # a model without params_nonembed: unknown size
    cells = {method: g for method, g in rows[rows["model"] == largest].groupby("method")}
    budgets = {method: set(g["budget"].astype(float)) for method, g in cells.items()}
    shared = {d: sum(d in b for b in budgets.values()) for d in set().union(*budgets.values())}
    budget = max(shared, key=lambda d: (shared[d], d))
    intro = f"On {task}, {_which_model(largest, size)}"
    lost = attempted[(attempted["model"] == largest) & ~attempted["method"].isin(list(cells))]
    unmeasured = "".join(f"; {m}: none of its {len(g)} cells there is ok with a finite {metric}" for m, g in lost.groupby("method"))
    if len(cells) == 1:
        only = next(iter(cells))
        d = max(budgets[only])
        return f"{intro}, only {only} was measured ({metric} {at_budget(cells[only], metric, d).mean():.3g} at D={d:g}){unmeasured}."

    def rows_at(method: str, d: float) -> pd.DataFrame:
        return cells[method][cells[method]["budget"].astype(float) == d]

    def at(method: str, d: float) -> pd.Series:
        return at_budget(cells[method], metric, d)

    if shared[budget] < min(2, len(cells)):
        own = ", ".join(f"{m} {at(m, max(budgets[m])).mean():.3g} at D={max(budgets[m]):g}" for m in cells)
        return f"{intro}, no two methods were measured at the same budget, so none is compared: {own}{unmeasured}."
    levels = [(float(at(m, budget).mean()), m, len(at(m, budget))) for m in cells if budget in budgets[m]]
    levels.sort(key=lambda level: (-level[0] if HIGHER_IS_BETTER[metric] else level[0], level[1]))
    (value, method, n_cells), *rest = levels
    tied = [m for v, m, _ in rest if _level(v, value)]
    rest = [level for level in rest if not _level(level[0], value)]
    copies = "".join(_copy_note(m, method, rows_at(m, budget), rows_at(method, budget), metric) for m in tied)
    who = f"{method} measured best" if not tied else f"{' and '.join([method, *tied])} measured best (tied{copies})"
    left_out = sorted(set(budgets) - {m for _, m, _ in levels})
    where = (f"at the largest budget all its methods share (D={budget:g})" if not left_out else
             f"at D={budget:g}, the largest budget shared by {len(levels)} of its {len(cells)} methods ({', '.join(left_out)} not measured there)")  # fmt: skip
    sentence = f"{intro}, {who} {where}: {metric} {value:.3g} ({f'mean of {n_cells} cells' if n_cells > 1 else 'one cell'})"
    if rest:
        runner_up = rest[0][1]
        sentence += f", {_lead(rows_at(method, budget), rows_at(runner_up, budget), runner_up, metric)}"
        sentence += "; then " + ", ".join(f"{m} {v:.3g}" for v, m, _ in rest[:3])
    return sentence + unmeasured + "." + _against_base(value, rows_at(method, budget), metric)


def _against_base(best: float, cells: pd.DataFrame, metric: str) -> str:
    """' No method measured there did better than the base model: the best did worse than it (score 0.38 …) …' where
    the best did no better than the base model on its own cells' test questions: "FT ahead" on such a model means
    fine-tuning hurt less (helper-176: on the quickstart's facts s every method's mean was below the base model's). ''
    where it did better, for a metric whose base is no plain base model's number (score_elicited's is the prompted base
    model itself), or without the column."""
    column = {"score": "score_base", "nll": "nll_base"}.get(metric)
    base = pd.to_numeric(cells[column], errors="coerce").mean() if column in cells else np.nan
    if not np.isfinite(base) or (not _level(best, base) and (best > base) == HIGHER_IS_BETTER[metric]):
        return ""
    how = "as well as, not better than" if _level(best, base) else "worse than"
    return (f" No method measured there did better than the base model: the best did {how} it ({metric} {base:.3g} on the "
            "same questions), so a method ahead there is one that hurt less.")


def _copy_note(method: str, other: str, cells: pd.DataFrame, others: pd.DataFrame, metric: str) -> str:
    """'; a scored as b, to the bit, in 2 of 2 cells' where `method`'s cells equal `other`'s on the same seed in `metric`
    and the NLL (`copies_of_a_part`): a tie of a composition with its part that chose to add nothing is one method's
    result, not two."""
    same = copies_of_a_part(pd.concat([cells, others]), method, [other], metric)
    paired = int(cells["seed"].isin(others["seed"]).sum())  # a seed only one of them ran cannot be a copy, nor counted as one
    return f"; {method} scored as {other}, to the bit, in {same} of {paired} cells on the same seeds" if same else ""


def _unrounded(value: float) -> float:
    """0 for a mean difference within float rounding of it (an off-task Δ of -1.39e-17 read as damage)."""
    return 0.0 if abs(value) < ROUNDING else value


def _level(a: float, b: float) -> bool:
    """Equal means, up to float rounding: means of k/n scores that are equal can differ in the last bit."""
    return bool(np.isclose(a, b, rtol=0, atol=ROUNDING))


def at_budget(cells: pd.DataFrame, metric: str, budget: float) -> pd.Series:
    """`metric` of the cells at one budget."""
    return cells[cells["budget"].astype(float) == budget][metric].astype(float)


def _which_model(model: str, size: dict[str, float]) -> str:
    """The model `best_measured` compared, named as what it is: the largest, or where no row recorded a size
    (params_nonembed) the last by name, which was called the largest all the same."""
    if np.isfinite(size[model]):
        return f"on the largest model measured ({model})"
    return f"on the model {model} (sizes unknown" + (f": the last of {len(size)} models by name)" if len(size) > 1 else ")")


def _lead(best_rows: pd.DataFrame, runner_up_rows: pd.DataFrame, name: str, metric: str) -> str:
    """The best method's lead over the runner-up with a Welch interval over their cells (seeds) and, where
    the rows store them, the test questions both answered, and whether that interval tells them apart:
    a lead of .01 with 100 test questions and 2 seeds often does not."""
    best, runner_up = best_rows[metric].astype(float), runner_up_rows[metric].astype(float)
    lead = abs(float(best.mean()) - float(runner_up.mean()))
    if min(len(best), len(runner_up)) < 2:
        return f"ahead of {name} by {lead:.3g} (one cell on a side: no interval)"
    noise = paired_noise(best.to_numpy(), runner_up.to_numpy(), outcome_matrix(best_rows, metric), outcome_matrix(runner_up_rows, metric))
    welch = Welch.of(best.to_numpy(), runner_up.to_numpy(), noise)
    if not welch.se > 0:
        return f"ahead of {name} by {lead:.3g} (every cell of both the same: no interval)"
    sign = 1.0 if welch.diff >= 0 else -1.0  # a loss metric's best is the lower: report the lead as a size
    raw = sorted(sign * bound for bound in welch.interval(CI_LEVEL))
    lo, hi = clip_difference(*raw, metric)
    over = "their cells and questions" if noise.questions else "their cells"
    if (lo, hi) != tuple(raw) and lo <= -1 and hi >= 1:  # every difference a score can take: "[-1, 1]" read as an interval
        return (f"ahead of {name} by {lead:.3g} (no information: the {100 * CI_LEVEL:.0f} % Welch interval over {over}, "
                f"{len(best)} and {len(runner_up)} cells, spans every difference a {metric} can take)")  # fmt: skip
    verdict = "within noise" if lo <= 0 else "clear of 0"
    return f"ahead of {name} by {lead:.3g} [{lo:.3g}, {hi:.3g}] ({verdict}: {100 * CI_LEVEL:.0f} % Welch interval over {over})"


CROSSOVER_CELLS = {"finetuning_ahead": "FT ahead", "steering_ahead": "steering ahead", "tied": "tied", "no_overlap": "no shared budgets", "not_finite": "not finite"}
# an outcome in few words, for "most resamples: …" where the resamples' commonest outcome is not the fit's
RESAMPLED_WORDS = {**CROSSOVER_CELLS, "crosses": "FT overtakes", "steering_overtakes": "steering overtakes", "crosses_twice": "cross twice"}


def composition_finding(g: CompositionGain, compared: int) -> str:
    """One sentence for a composition whose gain is clear of zero after Holm's correction over the `compared`
    gains with an interval; the margin is a size, so a loss reads "worse ... by 0.1 [0.05, 0.2]" rather than "worse ... by -0.1"."""
    sign = 1.0 if g.gain > 0 else -1.0
    lo, hi = sorted((sign * g.gain_lo, sign * g.gain_hi))
    verdict = "better" if g.gain > 0 else "worse"
    return (f"{g.task}, {g.model}, D={g.budget:g}: {g.composition} is {verdict} than {g.best_single} alone by {_ci(sign * g.gain, lo, hi)} "
            f"(p = {g.p_value:.2g}, significant after Holm's correction over the {compared} composition comparison(s) with an interval).")  # fmt: skip


def composition_findings(gains: list[CompositionGain]) -> list[str]:
    """The gains that are findings: their 95 % interval clears 0 even after Holm's correction for the number
    compared (with dozens of (task, model, budget) cells, some would clear it by chance); the others, counted."""
    tested = [g for g in gains if np.isfinite(g.p_value)]
    found = holm(np.array([g.p_value for g in tested]))
    lines = [composition_finding(g, len(tested)) for g, kept in zip(tested, found) if kept]
    chance = sum(g.p_value < 1 - CI_LEVEL for g, kept in zip(tested, found) if not kept)
    if chance:
        lines.append(f"{chance} more composition gain(s) have a 95 % interval that excludes 0 but do not survive Holm's correction over the "
                     f"{len(tested)} comparisons, so they are not stated as findings (see Composition gain).")  # fmt: skip
    bare = sum(bool(g.note) for g in gains)
    if bare:
        lines.append(f"{bare} of the {len(gains)} composition gains have no interval (too few seeds, or seeds that all scored the same and no questions to tell them apart), "
                     "so none of them is stated as a finding (see Composition gain).")  # fmt: skip
    return lines


def _crossover_table(a: Analysis) -> list[Block]:
    """D* of every steering → fine-tuning pair on every model, smallest model left: the study's answer at a glance."""
    if not a.crossovers:
        return []
    sizes = {c.model: c.n_params for c in a.crossovers}
    models = sorted(sizes, key=lambda m: (np.nan_to_num(sizes[m], nan=np.inf), m))
    cells = {(c.task, c.steering, c.finetuning, c.model): c for c in a.crossovers}
    pairs = sorted({(c.task, c.steering, c.finetuning) for c in a.crossovers})

    def cell(c: Crossover | None) -> str:
        if c is None:
            return ""
        text = CROSSOVER_CELLS.get(c.outcome, "")
        if c.outcome == "crosses_twice":
            text = f"crosses twice: {_num(c.d_star)}, {_num(c.d_star_2)}"
        elif np.isfinite(c.d_star):
            interval = f" {c.interval()}" if c.interval() else ""
            text = ("steering from " if c.outcome == "steering_overtakes" else "") + _num(c.d_star) + interval
        mode = f"; most resamples: {RESAMPLED_WORDS[c.resampled_outcome]}, {whole_percent(c.resampled_share)}%" if c.resampled_outcome else ""
        agree = f" ({whole_percent(c.share)}%{mode})" if np.isfinite(c.share) else c.unresampled_note()
        return text + agree + (" †" if c.disputed else "") + (" ‡" if c.idle else "")

    rows = [(task, f"{s} → {f}", *(cell(cells.get((task, s, f, m))) for m in models)) for task, s, f in pairs]
    legend = Bullets((
        "a number — D*: the budget (training examples) at which the fine-tuning method overtakes the steering method, with "
        "its 95 % bootstrap interval over every resample not tied over the whole range, an end `< D` or `> D` where resamples "
        "put it outside the measured range (the winner ahead throughout, or still behind at the largest budget)",
        "`steering from D*`: the reverse, fine-tuning is ahead at the smallest shared budget and steering overtakes it",
        "`FT ahead`: fine-tuning is ahead of steering wherever they differ over the measured range; `steering ahead`: "
        "fine-tuning never catches up there",
        "`crosses twice: D1, D2`: one method is ahead only between D1 and D2, the other below and above (see the fit's text "
        "for which)",
        "`tied`: the two fitted curves stay within half the step the metric is measured in (half a test question for a "
        "score) of each other: too close to tell apart",
        "`no shared budgets`: the two were measured on budget ranges that do not overlap; blank: one of the two curves "
        "could not be fitted",
        "in brackets, the share of bootstrap resamples with the same outcome: under 95 % the outcome is not a finding (as "
        "`steerscale fit` marks it), and near one half it is a coin flip (the curves are tied), not only where D* falls; "
        "where most resamples give another outcome, that one follows with its share (`tied (6%; most resamples: FT ahead, "
        "80%)`: the fitted curves tie, but resamples of the cells mostly do not)",
        "†: at a budget measured either side of D*, the side the fitted curves put behind leads by more than the scores' "
        "resolution and past its 95 % Welch interval — or, with no crossing (ahead throughout, tied), the means at a "
        "budget both measured contradict the outcome so (`steerscale fit` says where); a lead within noise is no † (means "
        "that merely fail to show a swap, on 2 seeds, are the rule near D*); or one of the two curves worsens with the "
        "budget past noise, which its law cannot follow (the table of fits says so): a law that does not describe its "
        "data gives an outcome every resample agrees with, so such an outcome is not a finding whatever its share",
        "‡: both methods left the model as it was (chose, or were set, to do nothing) in at least half of the cells "
        "(budget and seed) both measured on that model: the outcome mostly compares the base model with itself, not "
        "steering with fine-tuning, and a D* there joins no trend",
    ))
    return [Table(("task", "steering → fine-tuning", *models), rows), legend]


def _fits_table(a: Analysis) -> list[Block]:
    rows = []
    for f in a.fits:
        r = f.record()
        lost = f.unidentified()
        exponents = ", ".join(f"{p} not identified" if p in lost else f"{p} {_ci(r[p], r[p + '_lo'], r[p + '_hi'])}" for p in f.law.exponents) if f.ok else "-"
        rows.append((f.task, f.method, f.model, f.law.name if f.x is None else f"{f.law.name}[{f.x}]", exponents, _ci(r["asymptote"], r["asymptote_lo"], r["asymptote_hi"]),
                     str(r["n_points"]), f"{r['n_failed']}/{r['n_nan']}/{r['n_no_x']}/{r['n_no_budget']}", _num(r["holdout_error"]), f.note or "ok"))  # fmt: skip
    header = ("task", "method", "model", "law", "exponents", "asymptote", "n", "left out: failed/NaN/no N/D=0", "holdout err", "status")
    per_family = any(f.family for f in a.fits)
    rows_are = ("`* (family)` rows are joint laws in (N, D) fitted within one family (parameters do not compare across families)"
                if per_family else "`*` rows are joint laws in (N, D)")  # fmt: skip
    note = Paragraph(f"Budget laws are fitted per model to every cell (not to seed means) with Huber loss on log loss (δ = "
                     f"{HUBER_DELTA:g}, as Chinchilla's approach 3): near a median fit, so where two seeds of a budget differ "
                     "widely a curve may pass by one of them rather than their mean (the budget plots show each cell); "
                     f"{rows_are} with N = `{a.x}`, "
                     f"validated by leaving out the {get_axis(a.x).held_out}{' of the family' if per_family else ''} "
                     f"(named in the holdout column of {fit_file(a.metric, a.x, 'parquet')}); a budget law's holdout leaves out its largest budget. "
                     "Rows a law cannot use are counted under \"left out\"; D=0 rows (the model before post-training) "
                     "have no place on a log-budget axis. "
                     "A holdout error of - means what was left could not fit the law (a budget law needs 5 budgets for one: "
                     "the 3 left by 4 cannot pin down 3 parameters). A joint law's intervals redraw seeds and keep its models: "
                     "they carry seed noise, not how far each model sits off the law, and with 3–5 models are narrower than "
                     "the law's uncertainty across models.")  # fmt: skip
    return [Heading("Fits"), note, Table(header, rows) if rows else Paragraph("No group of cells could be fitted.")]


def _capability(a: Analysis) -> list[Block]:
    """Parameters against base-model capability as N: the models on each axis, then which is tighter."""
    blocks: list[Block] = [Heading("Capability as the x-axis"), Paragraph(
        "Families differ, so N may also be the base model's capability: `neutral_loss` is 1 / (its NLL per byte on neutral, "
        "pretraining-like text), `task_score` is 1 / (1 − its score on the task). Both are reciprocals of a base-model loss, "
        "so a law's A/x^alpha term reads A·loss^alpha (a loss-to-loss power law; alpha is an elasticity). Every joint law and "
        "the crossover trend are fitted on each axis; a law is judged by its error on the model at the top of that axis when that "
        "model is left out, the trend D* ∝ x^gamma by leaving out each model in turn.")]  # fmt: skip
    caps = a.capabilities
    if len(caps):
        rows = [(r["task"], r["model"], r["family"], *(_num(r[name]) for name in AXES)) for _, r in caps.iterrows()]
        blocks.append(Table(("task", "model", "family", *(f"{name} ({axis.label})" for name, axis in AXES.items())), rows))
        blocks += [Paragraph(line) for line in [*capability_out_of_size_order(caps), synthetic_neutral_text(a.loaded.ok)] if line]
    groups = a.axes.error_table()
    if not groups:
        return [*blocks, Paragraph(f"No axis has a held-out error to compare: {a.axes.why_no_errors()}.")]
    rows = [(task, subject, law, *(_num(errors.get(x, np.nan)) for x in AXES), tightest) for task, subject, law, errors, tightest in groups]
    blocks.append(Paragraph(f"Held-out error per axis: laws in `{a.metric}` units, the trend {TREND} in mean |ln D*| missed."))
    blocks.append(Table(("task", "method / pair", "law", *AXES, "tightest"), rows))
    if a.axes.pooled:
        blocks.append(Paragraph(a.axes.pooled_note()))
    for v in a.axes.verdicts:
        blocks.append(Paragraph(f"`{v.x}`: not usable ({v.note})." if v.note else
                                f"`{v.x}`: tightest in {v.wins} of the {v.fitted} groups it fits; median law error {_num(v.median_error)}."))  # fmt: skip
    verdict = f"Most wins: `{a.axes.best}` (not a verdict; below)." if a.axes.best else f"Verdict: {a.axes.why_no_best()}."
    return [*blocks, Paragraph(verdict), *([Paragraph(axis_caveat(a))] if a.axes.best else [])]


def synthetic_neutral_text(ok: pd.DataFrame) -> str:
    """Where rows of models other than the offline ladder's measured neutral text on the offline world's grammar
    (`workers.tasks.neutral_texts` without `eval.neutral_source`): their neutral KL, perplexity ratio and
    `neutral_loss` are not measured on natural text ('' where none did: the ladder was pretrained on that grammar)."""
    texts = neutral_texts_of(ok)
    on_grammar = ok.loc[texts.index[texts == "the world's grammar"]]
    models = sorted(m for m in on_grammar.get("model", pd.Series(dtype=str)).dropna().unique() if not str(m).startswith("ladder:"))
    if not models:
        return ""
    return (f"Neutral text is the offline world's general-text grammar for {', '.join(models[:4])}"
            f"{' and others' if len(models) > 4 else ''}, so their neutral KL, perplexity ratio and `neutral_loss` are measured "
            "on synthetic text these models were not trained on, not on natural text: read them as a shift on that text alone "
            "(`eval.neutral_source` names natural text to measure on).")


def capability_out_of_size_order(caps: pd.DataFrame) -> list[str]:
    """Per family, where a larger model is less capable on neutral text than the next smaller one (and per task, where
    its base score is lower): there `params` and `neutral_loss` (`task_score`) order the models differently, so a law or D* trend over N says different things on the two axes.
    A reader of the table alone would take "bigger" for "better" (the offline ladder's `l` sits below `m` as built on
    some CPUs: README)."""
    lines = []
    models = caps.drop_duplicates("model").dropna(subset=["params", "neutral_loss"])
    for family, group in models.groupby("family", sort=True):
        if inverted := _inversions(group, "neutral_loss"):
            lines.append(f"On {family}, capability on neutral text does not rise with size at every step: {'; '.join(inverted)} "
                         "(neutral_loss, the larger model first). Ordered by `params` and by `neutral_loss` these models stand in "
                         "different places, so a law or D* trend over N reads differently on the two axes; fit with `--x neutral_loss` "
                         "to see it by capability.")  # fmt: skip
    # and per task, the base models' own scores: "on the largest model" is then not where the task is done best
    for (task, family), group in caps.dropna(subset=["params", "score_base"]).groupby(["task", "family"], sort=True):
        if inverted := _inversions(group, "score_base", lambda score: f"{score:.4g}"):  # 0.9995 below 1, not "1 below 1"
            largest, best = group.loc[group["params"].idxmax()], group.loc[group["score_base"].idxmax()]
            not_largest = (f"; and {best['model']} ({_num(best['score_base'])}), not the largest model measured ({largest['model']}, "
                           f"{_num(largest['score_base'])}), does the task best before post-training") if best["score_base"] > largest["score_base"] else ""
            lines.append(f"On {task}, the {family} base models' score does not rise with size at every step: {'; '.join(inverted)} "
                         "(score_base, the larger model first): there a law over `params` and one over `task_score` order the models "
                         f"differently{not_largest}.")  # fmt: skip
    return lines


def _inversions(group: pd.DataFrame, column: str, show: Callable[[float], str] = _num) -> list[str]:
    """'l (3.85) below m (4.09)' for each step up in `params` where `column` falls, each value as `show` writes it."""
    group = group.sort_values("params")
    return [f"{big} ({show(big_value)}) below {small} ({show(small_value)})"
            for (small, small_value), (big, big_value) in itertools.pairwise(zip(group["model"], group[column])) if big_value < small_value]


def axis_caveat(a: Analysis) -> str:
    """Why the axis verdict is not a finding: each axis leaves out its own top model, and `task_score` reads
    the held-out model's base score off the test set its post-trained cells are scored on."""
    held: dict[str, set[str]] = {}
    by_group: dict[tuple[str, str, str], set[frozenset[str]]] = {}  # per group, each axis' held-out models: labels aside
    for s in a.axes.scores:
        if s.law != TREND and np.isfinite(s.holdout_error):
            held.setdefault(s.x, set()).add(s.held_out)
            by_group.setdefault((s.task, s.subject, s.law), set()).add(frozenset(s.held_models))
    named = "; ".join(f"{x}: {', '.join(sorted(texts))}" for x, texts in held.items())
    where = (f"the held-out model differs between axes ({named}), so their errors are on different models"
             if any(len(models) > 1 for models in by_group.values()) else "each axis leaves out the model at its own top, which can differ between axes")
    on_idle, won, laws = wins_on_idle_models(a)
    idle_note = (f" In {on_idle} of its {won} wins among the laws the method left the held-out model as it was in half its cells "
                 "or more: there a law's error is how well it predicts the base model's score, which `task_score` is made of."
                 if on_idle and a.axes.best == "task_score" else "")
    twice = f" Each method's group counts once per law ({', '.join(laws)}), so a method can give a win twice." if len(laws) > 1 else ""
    return (f"Not a like-for-like comparison, so not stated as a finding: {where}; and `task_score` places the held-out model by its "
            "own base score on the task's test set, the set its post-trained cells are scored on, so that law is told part of what it "
            f"predicts.{idle_note}{twice}")  # fmt: skip


def _examples_needed(e: DataEfficiency) -> str:
    """D_x with its interval; outside the measured budgets it is marked extrapolated, and below the smallest
    or past EXTRAPOLATION_LIMIT × the largest only the side is said (the law's number there means nothing);
    one the fit's bounds set is said to be no finding."""
    # NaN: no resamples; 0 beside a point D_x: the point fit beats the base model but no resample does, so it is no finding
    shown = 0 < e.finite_share < 1 or (e.finite_share == 0 and not np.isnan(e.examples))
    share = f"; D_x exists in {whole_percent(e.finite_share)}% of resamples" if shown else ""  # 199 of 200 is not "100%"
    if np.isnan(e.examples):  # +inf (past float range) is a D_x, said as the side it is on below
        return f"none: the asymptote does not beat the base model{share}"
    limit = EXTRAPOLATION_LIMIT * e.largest_budget
    caveat = f" — not a finding: {e.caveat}" if e.caveat else ""
    if e.examples > limit:
        return f"> {EXTRAPOLATION_LIMIT:g}× the largest budget measured ({e.largest_budget:g}): not measurable here{share}"

    def end(value: float) -> str:  # an interval end outside what the report prints, as a side: the order is kept
        return f"< {e.smallest_budget:g}" if value < e.smallest_budget else f"> {_num(limit)}" if value > limit else _num(value)

    lo, hi = end(e.examples_lo), end(e.examples_hi)
    interval = "" if not np.isfinite(e.examples_lo) else f" [{lo}]" if lo == hi else f" [{lo}, {hi}]"
    if e.examples < e.smallest_budget:  # its interval, unless that is below the data too
        interval = "" if hi == end(e.examples) else interval
        return f"< {e.smallest_budget:g}{interval}, the smallest budget measured: reached before the data start (extrapolated){share}{caveat}"
    past = (f" (extrapolated past the largest budget measured, {e.largest_budget:g})" if e.extrapolated else
            f" (the interval reaches past the largest budget measured, {e.largest_budget:g})" if interval and e.examples_hi > e.largest_budget else "")  # fmt: skip
    return f"{_num(e.examples)}{interval}{past}{share}{caveat}"


def _efficiency(a: Analysis) -> list[Block]:
    rows = [(e.task, e.method, e.model, f"{e.fraction:.0%}", _examples_needed(e)) for e in a.efficiency]
    if not rows:
        return [Heading("Data efficiency"), Paragraph("Needs fitted budget curves and the base model's score.")]
    note = Paragraph("Examples needed: the budget at which the fitted curve reaches that share of the gain over the base model it "
                     "tends to, with its 95 % bootstrap interval over every resample (one that never reaches it counts as needing more than any "
                     "budget). Outside the budgets the curve "
                     "was measured on it is the law's extrapolation and marked as such.")  # fmt: skip
    return [Heading("Data efficiency"), note, Table(("task", "method", "model", "share of asymptotic gain", "examples needed"), rows)]


def composition_gain(g: CompositionGain, metric: str = "score") -> str:
    """The gain with its interval, or why it has none; an interval cut to every difference a score can take says so
    (a bare "[-1, 1]" read as a measured interval, as the best method's lead did: `_lead`)."""
    if g.note:
        return f"{_num(g.gain)} ({g.note})"
    if not np.isfinite(g.gain_lo):  # --bootstrap 0: none asked for
        return _num(g.gain)
    everything = HIGHER_IS_BETTER[metric] and g.gain_lo <= -1 and g.gain_hi >= 1
    return _ci(g.gain, g.gain_lo, g.gain_hi) + (" (no information: every difference a score can take)" if everything else "")


def _compositions(a: Analysis) -> list[Block]:
    rows = [(g.task, g.model, f"{g.budget:g}", g.composition, g.best_single, composition_gain(g, a.metric), f"{g.p_value:.2g}" if np.isfinite(g.p_value) else "-",
             f"{g.as_a_part} of {g.composition_cells}") for g in a.compositions]  # fmt: skip
    unmatched = unmatched_compositions(a.loaded.ok, metric=a.metric) if len(a.loaded.ok) else []
    passed_over = ([Paragraph(f"Not compared, {len(unmatched)} composition cell group(s) without all of their parts beside them: "
                              + "; ".join(unmatched[:8]) + ("; …" if len(unmatched) > 8 else "") + ".")] if unmatched else [])  # fmt: skip
    if not rows:
        return [Heading("Composition gain"), Paragraph("No composition was run alongside all of its parts."), *passed_over]
    note = Paragraph("Gain of the composition over its better part, cell mean against cell mean, with a 95 % interval from Welch's t "
                     "over the seeds of each side, plus the test questions' paired variance where the rows store their outcomes (one per "
                     "part, Bonferroni over the parts, so no part is picked as the better one in advance); it needs two seeds a side and "
                     "some spread among them or among the questions. p: for a gain of 0, corrected for the parts, not across gains; only gains "
                     "that stay clear of 0 after Holm's correction over every gain with an interval are stated in \"What the fits say\". "
                     "As a part: the composition's cells whose numbers are, to the bit, those of one of its parts alone on the same seed.")  # fmt: skip
    return [Heading("Composition gain"), note, *_copies_of_a_part(a.compositions),
            Table(("task", "model", "budget", "composition", "best part", "gain", "p", "as a part"), rows), *passed_over]


def _copies_of_a_part(gains: list[CompositionGain]) -> list[Block]:
    """How many composition cells are one part alone (`copies_of_a_part`): a gain of 0 there is that part compared with
    itself, which the table's "tied" gains would otherwise pass off as a finding about combining."""
    copies, cells = sum(g.as_a_part for g in gains), sum(g.composition_cells for g in gains)
    if not copies:
        return []
    whole = sum(g.as_a_part == g.composition_cells for g in gains)
    return [Paragraph(f"In {copies} of the {cells} composition cells the composition scored, to the bit, as one of its parts alone on "
                      "the same seed: a part chose to do nothing there on validation (a steering scale of 0, say), so the composition is its "
                      f"other part on the unchanged model. In {whole} of the {len(gains)} comparisons every cell is such a copy: their "
                      "gain of 0 compares that part with itself and says nothing about combining the two.")]  # fmt: skip


def _links(a: Analysis) -> list[Block]:
    rows = [(k.task, _num(k.floor), _num(k.ceiling), _num(k.slope), _num(k.midpoint), str(k.n_points), _num(k.rmse), k.note or "ok")
            for k in a.links]  # fmt: skip
    if not rows:
        return [Heading("From loss to score"), Paragraph("Too few cells per task to fit a sigmoid link.")]
    return [Heading("From loss to score"),
            Paragraph("score = floor + (ceiling − floor) / (1 + exp(slope · (nll − midpoint))), fitted per task over every ok cell: "
                      "how a fitted NLL curve translates into the bounded score, and how tightly score follows loss (rmse). "
                      "A link with its floor above its ceiling is inverted (the score rises with the loss over these cells) and "
                      "is marked: it does not translate a loss into a score. One with fewer than 2 cells inside its 10–90 % rise "
                      "is marked too: its slope, a step's or a tail's, is the fit's guess, not the cells'."),
            Table(("task", "floor", "ceiling", "slope", "midpoint", "n", "rmse", "status"), rows)]  # fmt: skip


def _selectivity(a: Analysis) -> list[Block]:
    """What each method buys and what it costs elsewhere on each task's largest model, at the largest budget
    every method there was measured at (each method's own largest where they share none: the budget column
    says which), so that no method is credited with a larger budget than another's."""
    heading = Heading("Selectivity and the elicitation gap")
    points = a.selectivity
    if points.empty:
        return [heading, Paragraph("No ok cells.")]
    size = a.loaded.ok.groupby("model")["params_nonembed"].max()
    idle = unchanged_counts(a.loaded.ok)
    rows = []
    for task, on_task in points.groupby("task", sort=True):
        model = max(on_task["model"].unique(), key=lambda m: (np.nan_to_num(size.get(m, np.nan), nan=-1.0), m))
        on_model = on_task[on_task["model"] == model]
        paid = on_model[on_model["budget"] > 0].groupby("method")["budget"]  # base/prompt-free points have budget 0
        shared = set.intersection(*map(set, paid.unique())) if paid.ngroups else set()
        for method, at in on_model.groupby("method", sort=True):
            at_shared = at[at["budget"] == max(shared)] if shared else at.iloc[:0]
            pick = at_shared if len(at_shared) else at
            r = pick.loc[pick["budget"].idxmax()]
            same, cells = idle.get((task, model, method, float(r["budget"])), (0, 0))
            rows.append((task, model, method, f"{r['budget']:g}", *(_num(_unrounded(r[c])) for c in ("gain", "gap_closed", "neutral_kl", "offtask_score_delta")),
                         f"{same}/{cells}" if cells else "-"))  # fmt: skip
    note = Paragraph("Gain: score over the base model. Gap closed: that gain over what the base model scores when asked "
                     "explicitly (the elicited prompt), 1 = all of it (past 1: beyond it); - when the task has no elicited prompt or that gap is "
                     "negative or under two questions of the test set (a share of it would be noise). Neutral KL: "
                     "shift of the next-token distribution on neutral text (nats per token). Off-task: score change on the "
                     "sweep's other tasks. Means over seeds, on each task's largest model only (the model column), each method at "
                     "the largest budget all of them share on that model (else its own largest); every model and budget is in the "
                     "selectivity plots. Unchanged: of those cells, how many left the model as it was (test NLL the base model's to the "
                     "bit: the method chose to do nothing), whose 0 gain, KL and off-task Δ are no sign of a selective method.")  # fmt: skip
    blocks: list[Block] = [heading, note, *[Paragraph(line) for line in [synthetic_neutral_text(a.loaded.ok)] if line],
                           Table(("task", "model", "method", "budget", "gain", "gap closed", "neutral KL", "off-task Δ", "unchanged"), rows)]
    if prompted := sorted({row[2] for row in rows if set(components(row[2])) & set(PROMPT_METHODS)}):
        blocks.append(Paragraph(
            f"{', '.join(prompted)}: the neutral text is read after the demonstrations, so the neutral KL includes what that "
            "context does to the text after it, beside any change of the model (few-shot prompting changes none). A model "
            "pretrained on single documents (the offline ladder's) reads any text after a few examples badly; a model "
            "pretrained on packed documents does not (workers/world/NOTES.md)."))  # fmt: skip
    return blocks


def _frontier(a: Analysis) -> list[Block]:
    levels = a.frontier_levels
    if levels.empty:
        return [Heading("Compute frontier"), Paragraph("No cells record positive post-training FLOPs.")]
    rows = [(r["task"], f"{r['flops_level']:.0e}", r["method"], r["model"], f"{r['budget']:g}", _num(r[a.metric]), f"{r['n_cells']:g}",
             f"{_num(r['lowest'])} – {_num(r['highest'])}" if r["n_cells"] > 1 else "-") for _, r in levels.iterrows()]  # fmt: skip
    return [Heading("Compute frontier"), Paragraph("Best operating point affordable at each level of post-training compute, means over seeds "
                                                   "(their number and range beside: the best of many means of few seeds is partly the luckiest, "
                                                   "so a point whose range overlaps a cheaper one's is no clear step up). "
                                                   "Pretraining is not counted: the base model costs none, and so would demonstrations in a fixed "
                                                   "number; `prompt` chooses how many on the validation set, and that choice's passes are its cost."),
            Table(("task", "FLOPs ≤", "method", "model", "budget", a.metric, "cells", "cells' range"), rows)]  # fmt: skip


def _latest_choices(choices: list[dict]) -> list[dict]:
    """Each cell's last choice, in the log's order: a round is logged before its cells run, so one cut short
    (Ctrl-C) and chosen again on resume appears twice, and only the later record's round ran the cell."""
    last = {c["cell_id"]: i for i, c in enumerate(choices)}
    return [c for i, c in enumerate(choices) if last[c["cell_id"]] == i]


def _adaptive(decisions: Decisions | None, a: Analysis, out: Path) -> list[Block]:
    """Which cells an adaptive run chose and why, how far its intervals narrowed, and why it stopped."""
    heading = Heading("Adaptive sweep")
    if decisions is None:
        return [heading, Paragraph("No adaptive.jsonl here: the cells were run as a grid (`steerscale run --adaptive` chooses them and logs why).")]
    stored = a.loaded.frame.set_index("cell_id")
    choices = _latest_choices(decisions.choices)
    superseded = len(decisions.choices) - len(choices)
    chosen = [c for c in choices if c["cell_id"] in stored.index]
    phases = {phase: sum(c["phase"] == phase for c in choices) for phase in sorted({c["phase"] for c in choices})}
    stop = decisions.stops[-1] if decisions.stops else None
    not_stopped = "running, or interrupted: rerunning the command resumes"
    ending = (f"It stopped after round {stop['round']} with {stop['cells_stored']} cells stored and {_num(stop['flops_spent'])} "
              f"post-training FLOPs spent: {stop['reason']}." if stop and decisions.stopped else
              f"It stopped after round {stop['round']} ({stop['reason']}), was resumed, and has not stopped since ({not_stopped})." if stop else
              f"It has not stopped yet ({not_stopped}).")  # fmt: skip
    blocks: list[Block] = [heading, Paragraph(
        f"{len(choices)} cells chosen ({', '.join(f'{n} {p}' for p, n in phases.items()) or 'none'}), "
        f"{len(chosen)} of them stored. "
        + (f"{superseded} choice{'s' * (superseded > 1)} of an interrupted round made again on resume "
           f"{'are' if superseded > 1 else 'is'} counted once. " if superseded else "")
        + ending)]  # fmt: skip
    targets = decisions.final_targets
    if targets:
        rows = [(t["target"], t["unit"], f"[{_num(t['lo'])}, {_num(t['hi'])}]", _num(t["width"]), _num(t.get("fresh_width")), _num(t["goal"]),
                 "done" if t["resolved"] else "open") for t in targets]  # fmt: skip
        fresh = any("fresh_width" in t for t in targets)  # logs written before the stop held it to the goal too have none
        caption = ("Target intervals at the end (95 % bootstrap; \"on fresh noise\": the width the same design gives with every "
                   "cell redrawn around its fitted curve, which must meet the goal too):" if fresh else
                   "Target intervals at the end (95 % bootstrap):")  # fmt: skip
        blocks += [Paragraph(caption), Table(("target", "unit", "interval", "width", "on fresh noise", "goal", "status"), rows)]
    path = adaptive_plot(decisions, out / "adaptive.png")
    if path:
        blocks.append(Image(path, "interval width per round against the compute spent"))
    rows = []
    for c in choices:
        row = stored.loc[c["cell_id"]] if c["cell_id"] in stored.index else None
        outcome = "not stored" if row is None else (f"ok, {a.metric} {_num(float(row[a.metric]))}" if row["status"] == "ok" else str(row["status"]))
        rows.append((str(c["round"]), c["phase"], c["slug"], _num(c["expected_flops"]), outcome, c["reason"]))
    if rows:
        blocks += [Paragraph("Every choice, in order, with its reason and what the cell stored:"),
                   Table(("round", "phase", "cell", "expected FLOPs", "stored", "reason"), rows)]  # fmt: skip
    return blocks


def _plots(a: Analysis, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Plots")]
    makers = (("budget", budget_curves_plot, f"{a.metric} vs budget"), ("crossover", crossover_plot, "crossover budget D* against size and capability"),
              ("frontier", frontier_plot, "compute frontier"), ("selectivity", selectivity_plot, "selectivity vs effectiveness"))  # fmt: skip
    for task in sorted(a.loaded.ok["task"].unique()):
        for stem, make, caption in makers:
            path = make(a, task, out / f"{stem}_{task}.png")
            blocks.append(Image(path, f"{task}: {caption}") if path else Paragraph(f"{task}: no data for a {caption} plot."))
    return blocks


def _cell(text: str) -> str:
    """A table cell's text: a `|` (in an error message, say) would end the cell, a line break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    parts = ["# steerscale report"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"## {b.text}")
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_cell, b.header)) + " |", "|" + "---|" * len(b.header)]
            parts.append("\n".join(lines + ["| " + " | ".join(map(_cell, r)) + " |" for r in b.rows]))
        else:
            parts.append(f"![{b.caption}]({b.path.name})")
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escaped text for the page, where the markdown's `code` spans (commands, names) become <code>: the page showed the backticks."""
    escaped = html.escape(text)
    if escaped.count("`") % 2:  # a stray backtick (in an error message) would pair with a span's and swap code and text
        return escaped
    return re.sub(r"(?<!`)`([^`\n]+)`(?!`)", r"<code>\1</code>", escaped)


def render_html(blocks: list[Block]) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>steerscale report</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}</style></head><body><h1>steerscale report</h1>"]  # fmt: skip
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h2>{_inline(b.text)}</h2>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b.caption)}'><figcaption>{_inline(b.caption)}</figcaption></figure>")
    return "\n".join(parts) + "</body></html>\n"


class ReportLocationError(ValueError):
    """The report (plots and pages) needs a local directory, and none was given for remote results."""


def report_folder(metric: str, x: str) -> str:
    """The report's default folder beside the cells: `report`, or e.g. `report-nll` for a metric other than the score
    (as `fit_file` names the fits, `output_suffix`), so a report on the NLL leaves the score's in place."""
    return f"report{output_suffix(metric, x)}"


def write_report(
    results_dir: str, *, metric: str = "score", bootstrap: int = 200, seed: int = 0, x: str = "params", workers: int = 1,
    planned_only: bool = False, plan: Plan | None = None, out_dir: str | None = None,
) -> FitSummary:
    """Analyse the cells once, save the fits (as `fit_results` does, beside the cells, remote too)
    and write the report to `out_dir`: a local directory, by default `<results_dir>/report` (`report_folder`)
    when the results are local. `x` is what stands for N in the joint laws: "params", "neutral_loss" or
    "task_score"; `workers` and `plan` as for `fit_results`. The returned summary's `paths` include "report.html";
    none where nothing was written (`keeps_earlier`: no ok row, and an earlier fit or report to keep).
    """
    get_axis(x)  # a wrong name fails before any file is read or written
    fs, root = resolve(results_dir)
    if out_dir is None and fs.type_name != "local":
        raise ReportLocationError(f"{results_dir} is not on a local disk: give a local directory for the report's plots and pages (--out DIR)")
    a = analyse(load_rows_to_fit(results_dir, planned_only=planned_only, plan=plan), metric=metric, bootstrap=bootstrap, seed=seed, x=x, workers=workers)
    out = Path(out_dir) if out_dir is not None else Path(root) / report_folder(metric, x)
    if keeps_earlier(a, (out / "report.md").exists()):
        return FitSummary(a, {})
    # the fits apart from the report: an empty fits.json that `fit` wrote first must not keep a first report from being written
    paths = {} if keeps_earlier(a, saved_before(results_dir, fit_file(metric, x, "json"))) else save_fits(results_dir, a)
    out.mkdir(parents=True, exist_ok=True)
    earlier_report = (out / "report.md").exists()  # plots are only cleaned up where a report was before (--out may be any dir)
    decisions = read_decisions(results_dir)
    blocks = [*_overview(a), *_findings(a), *_measured(a), *_fits_table(a), *_capability(a), *_efficiency(a), *_compositions(a), *_selectivity(a), *_links(a), *_frontier(a),
              *_adaptive(decisions, a, out), *_intervals(a), *_plots(a, out)]  # fmt: skip
    drawn = {b.path for b in blocks if isinstance(b, Image)}
    ours = {path for pattern in ("budget_*.png", "crossover_*.png", "frontier_*.png", "selectivity_*.png", "adaptive.png") for path in out.glob(pattern)}
    for stale in ours - drawn if earlier_report else ():  # an earlier report's plot of something this one has no data for
        stale.unlink()
    (out / "report.md").write_text(render_markdown(blocks))
    page = out / "report.html"
    page.write_text(render_html(blocks))
    measured = out / MEASURED_FILE
    measured_points(a.loaded.ok, a.metric).to_csv(measured, index=False)
    return FitSummary(a, {**paths, MEASURED_FILE: str(measured), "report.html": str(page)})
