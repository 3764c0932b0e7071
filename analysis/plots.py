"""PNG plots of an analysis, one figure per task and question. Each returns None when there is
nothing to draw, so the report can say so instead of showing an empty axis."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402

from analysis.capability import AXES  # noqa: E402
from analysis.crossover import CrossoverScaling, budget_curves  # noqa: E402
from analysis.curves import LawFit  # noqa: E402
from analysis.decisions import Decisions  # noqa: E402
from analysis.metrics import BASE_COLUMN  # noqa: E402
from analysis.summary import Analysis  # noqa: E402

BAND = (2.5, 97.5)
BEFORE_LABEL = "dotted: before post-training (D=0)"
LOG_PAD = 0.1  # of a log axis' span in ln units, and at least this much (±10 %) around a lone value


def _log_limits(values: np.ndarray) -> tuple[float, float]:
    """Log-axis limits padded around `values` in log space: no point sits on the edge, and a lone value
    (one model) gets a range instead of a degenerate one."""
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max(LOG_PAD * np.log(hi / lo), LOG_PAD)
    return lo * np.exp(-pad), hi * np.exp(pad)


def _tick_label(value: float, _pos: int | None = None) -> str:
    """A plain number where one reads well (4, 0.65, 1024), a power of ten beyond (3.8×10⁷): matplotlib's
    log labels write "4×10⁰"."""
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e5:
        return f"{value:.6g}"
    exponent = int(np.floor(np.log10(value)))
    mantissa = round(value / 10.0**exponent, 3)
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}\\times10^{{{exponent}}}$"


def _readable_log_ticks(axis: Axis) -> None:
    """Labelled ticks on a log axis for its current limits. Matplotlib's log locator has at most one major tick
    under a decade and labels the minor ones instead, crowded, as "4×10⁰": there, round linear steps (a log
    axis over less than a factor 5 is near linear); up to 2 decades, 1-2-5 steps; wider, the decades."""
    lo, hi = axis.get_view_interval()
    decades = np.log10(hi / lo)
    if decades < np.log10(5):
        locator = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10])
    else:
        locator = LogLocator(subs=(1.0, 2.0, 5.0) if decades < 2 else (1.0,))
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(_tick_label))
    axis.set_minor_formatter(NullFormatter())


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend beside the axes is kept in the image
    plt.close(fig)
    return path


PANELS_PER_ROW = 4


def _legend_beside(ax: plt.Axes, shown: dict[str, Any] | None = None) -> None:
    """The legend right of the axes, where it covers no point (inside, it sat on the data); `shown`
    (label -> handle) in place of the axes' own entries."""
    entries = (list(shown.values()), list(shown.keys())) if shown is not None else ()
    ax.legend(*entries, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _models_by_size(curves: list[LawFit]) -> list[str]:
    """The curves' models, smallest first (unknown sizes last, ties by name), each once."""
    size = {f.model: f.n_params for f in curves}
    return sorted(size, key=lambda model: (np.isnan(size[model]), np.nan_to_num(size[model]), model))


def _before_post_training(analysis: Analysis, task: str) -> dict[str, float]:
    """Each model's metric before any post-training (the base model on the test set: `score_base`, `nll_base`),
    the median over the task's ok rows; what a budget curve starts from, which a log budget axis has no D=0 for."""
    ok = analysis.loaded.ok
    column = BASE_COLUMN[analysis.metric]
    if column not in ok:
        return {}
    rows = ok[(ok["task"] == task) & np.isfinite(ok[column].to_numpy(float))]
    return {str(model): float(value) for model, value in rows.groupby("model")[column].median().items()}


def budget_curves_plot(analysis: Analysis, task: str, path: Path) -> Path | None:
    """Metric against budget per model, one panel per method, fitted curve with 95 % band, and a dotted line at
    the model's metric before post-training (D=0). A colour per model, in order of size: two families' models
    of one size are two curves to tell apart."""
    curves = [f for f in analysis.fits if f.task == task and not f.joint and len(f.points.value)]
    methods = sorted({f.method for f in curves})
    if not methods:
        return None
    columns = min(len(methods), PANELS_PER_ROW)
    rows = -(-len(methods) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False, sharey=True)
    panels = grid.ravel()[: len(methods)]  # a row of seven panels was 3,000 pixels wide: four a row at most
    for spare in grid.ravel()[len(methods) :]:
        spare.set_visible(False)
    models = _models_by_size(curves)
    colours = dict(zip(models, plt.cm.viridis(np.linspace(0, 0.9, len(models)))))
    base = _before_post_training(analysis, task)
    for ax, method in zip(panels, methods):
        for f in sorted((f for f in curves if f.method == method), key=lambda f: models.index(f.model)):
            colour = colours[f.model]
            if f.model in base:
                ax.axhline(base[f.model], color=colour, ls=":", lw=1, label=BEFORE_LABEL)
            ax.scatter(f.points.d, f.points.value, s=10, color=colour, alpha=0.6)
            if f.ok:
                d = np.geomspace(f.points.d.min(), f.points.d.max(), 100)
                ax.plot(d, budget_curves(f.fit.params, d, f.metric)[0], color=colour, label=f"{f.model} (N={f.n_params:.3g})")
                if f.boot is not None:
                    lo, hi = np.percentile(budget_curves(f.boot.params(), d, f.metric), BAND, axis=0)
                    ax.fill_between(d, lo, hi, color=colour, alpha=0.12, lw=0)
            else:
                ax.plot([], [], color=colour, label=f"{f.model}: not fitted")
        ax.set(xscale="log", title=method, xlabel="budget (examples)")
        _readable_log_ticks(ax.xaxis)
    # one legend for every panel (the models are the same), beside the first row, where it covers no point
    shown = {label: handle for ax in panels for handle, label in zip(*ax.get_legend_handles_labels())}
    if dotted := shown.pop(BEFORE_LABEL, None):  # last, in grey: it stands for every model's
        shown[BEFORE_LABEL] = plt.Line2D([], [], color="grey", ls=dotted.get_linestyle(), lw=1)
    _legend_beside(grid[0][-1], shown)
    values = np.concatenate([f.points.value for f in curves] + [np.array([base[m] for m in models if m in base])])
    pad = 0.1 * (values.max() - values.min()) or 0.05
    panels[0].set_ylim(values.min() - pad, values.max() + pad)  # the data's range: a wide band must not flatten it
    for row in grid:
        row[0].set_ylabel(analysis.metric)
    fig.suptitle(f"{task}: {analysis.metric} vs post-training budget")
    return _save(fig, path)


def crossover_plot(analysis: Analysis, task: str, path: Path) -> Path | None:
    """D* against each axis (parameters and capabilities) with bootstrap CIs, log-log, one panel per axis
    on which a model with a D* has a value; marker = model family, colour = steering × fine-tuning pair,
    line = the least-squares trend D* ∝ x^gamma as the analysis states it: over every family pooled (the
    point of a capability axis), one line per family on parameters when there are several, and only
    through three models with a finite D* or more (crossover.MIN_TREND_MODELS), as the text states it.
    An interval end outside the measured range (a censored D*) is drawn to the range's edge. Each panel's
    x-range is its points', padded (one model's too); the title explains the held-out error only where a
    trend's legend shows one, as with fewer than three models there is none."""
    # as the trends take them: an idle pair's D* drawn beside them turned a line through the others the other way (helper-139)
    found = [c for c in analysis.crossovers if c.task == task and c.outcome == "crosses" and not c.disputed and not c.idle]
    table = analysis.capabilities[analysis.capabilities["task"] == task].set_index("model")
    x_of = {a.name: table[a.name].reindex([c.model for c in found]).to_numpy(float) for a in AXES.values() if a.name in table}
    axes = [AXES[name] for name, x in x_of.items() if np.isfinite(x).any()]  # an axis no D* has a value on: an empty panel
    if not found or not axes:
        return None
    pairs = sorted({(c.steering, c.finetuning) for c in found})
    families = sorted(table["family"].unique())
    colours = dict(zip(pairs, itertools.cycle(plt.cm.tab10.colors)))  # past ten pairs colours repeat (they stopped: KeyError)
    markers = dict(zip(families, itertools.cycle("osD^vPX<>*")))
    trends: dict[tuple[str, str, str], list[CrossoverScaling]] = {}
    for s in analysis.axes.trends:
        if s.task == task and s.enough_models:
            trends.setdefault((s.x, s.steering, s.finetuning), []).append(s)
    fig, panels = plt.subplots(1, len(axes), figsize=(4.6 * len(axes), 3.9), squeeze=False, sharey=True)
    held_out = False
    for ax, axis in zip(panels[0], axes):
        for pair in pairs:
            cs = [c for c in found if (c.steering, c.finetuning) == pair and np.isfinite(table[axis.name].get(c.model, np.nan))]
            x = np.array([table.loc[c.model, axis.name] for c in cs])
            d = np.array([c.d_star for c in cs])
            for c, xi, di in zip(cs, x, d):
                if not np.isnan([c.d_star_lo, c.d_star_hi]).any():  # end to end, open ends at the range's: D* need not lie inside
                    ax.vlines(xi, *np.clip([c.d_star_lo, c.d_star_hi], c.d_min, c.d_max), color=colours[pair], lw=1)
                ax.plot([xi], [di], marker=markers[table.loc[c.model, "family"]], color=colours[pair], ls="none")
            for trend in trends.get((axis.name, *pair), []):
                held_out |= _trend_line(ax, trend, x, d, [table.loc[c.model, "family"] for c in cs], colours[pair])
        known = x_of[axis.name]
        ax.set(xscale="log", yscale="log", xlabel=axis.label, title=f"x = {axis.name}", xlim=_log_limits(known[np.isfinite(known)]))
        _readable_log_ticks(ax.xaxis)
    _readable_log_ticks(panels[0][0].yaxis)  # shared: every panel's D* axis
    for steering, finetuning in pairs:  # which colour is which pair, though no trend line is drawn for it
        panels[0][0].plot([], [], marker="s", color=colours[steering, finetuning], ls="none", label=f"{finetuning} over {steering}")
    for family, marker in markers.items():
        panels[0][0].plot([], [], marker=marker, color="grey", ls="none", label=f"family {family}")
    for ax in panels[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    panels[0][0].set_ylabel("crossover budget D*")
    held = " (held-out: mean |ln D*| missed, each model left out)" if held_out else ""
    fig.suptitle(f"{task}: crossover budget against model size and capability{held}")
    return _save(fig, path)


def _trend_line(ax: plt.Axes, trend: CrossoverScaling, x: np.ndarray, d: np.ndarray, families: list[str], colour: object) -> bool:
    """The trend's line, its stated γ, through the D* it was fitted to: its family's only, where it is one family's.
    True where its label shows a held-out error, so the title explains it only then."""
    mine = np.array([not trend.family or f == trend.family for f in families], dtype=bool)
    if len(np.unique(x[mine])) < 2:
        return False
    slope = trend.gamma
    intercept = float(np.mean(np.log(d[mine]) - slope * np.log(x[mine])))  # least squares at that slope (polyfit's, same points)
    grid = np.geomspace(x[mine].min(), x[mine].max(), 50)
    held = f", held-out {trend.holdout_error:.2f}" if np.isfinite(trend.holdout_error) else ""
    within = f" ({trend.family})" if trend.family else ""
    # the text states no trend without an interval: the line is drawn dotted and says so, not as a law
    found = "" if trend.has_interval else " (no interval: not a finding)"
    label = f"{trend.finetuning} over {trend.steering}{within}: γ={slope:.2f}{held}{found}"
    ax.plot(grid, np.exp(intercept) * grid**slope, color=colour, lw=1, ls="-" if trend.has_interval else ":", label=label)
    return bool(held)


def method_colours(analysis: Analysis) -> dict[str, object]:
    """One colour per method of the whole analysis, so a method looks the same in every plot of the report
    (each plot's own colour cycle gave lora one colour where base was plotted and another where it was not)."""
    methods = sorted(analysis.loaded.frame["method"].unique()) if len(analysis.loaded.frame) else []
    return dict(zip(methods, itertools.cycle(plt.cm.tab10.colors)))


def frontier_plot(analysis: Analysis, task: str, path: Path) -> Path | None:
    """Metric against post-training FLOPs for every operating point; the Pareto frontier joined."""
    points = analysis.frontier[analysis.frontier["task"] == task]
    if points.empty:
        return None
    paid, free = points[points["post_train_flops"] > 0], points[points["post_train_flops"] == 0]
    if paid.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 3.8))  # room for the legend beside the axes
    colours = method_colours(analysis)
    for method, group in paid.groupby("method"):
        ax.scatter(group["post_train_flops"], group[analysis.metric], s=14, color=colours[method], label=method)
    front = paid[paid["on_frontier"]]
    x, y = front["post_train_flops"].to_numpy(), front[analysis.metric].to_numpy()
    start = free[free["on_frontier"]]
    if not start.empty:  # the best point of no post-training compute: off a log axis, drawn as the level the frontier starts from
        level = start.iloc[0]
        ax.axhline(level[analysis.metric], color="grey", ls="--", lw=1, label=f"{level['method']} {level['model']} (no post-training)")
        x, y = np.r_[paid["post_train_flops"].min(), x], np.r_[level[analysis.metric], y]
    # on to the costliest point: a frontier no paid point joins (the free level beats them all) is a line too
    x, y = np.r_[x, paid["post_train_flops"].max()], np.r_[y, y[-1]]
    ax.step(x, y, where="post", color="black", lw=1, label="frontier")
    ax.set(xscale="log", xlabel="post-training FLOPs", ylabel=analysis.metric, title=f"{task}: compute frontier")
    _readable_log_ticks(ax.xaxis)
    _legend_beside(ax)
    return _save(fig, path)


def selectivity_plot(analysis: Analysis, task: str, path: Path) -> Path | None:
    """Gain over the base model against KL on neutral text and off-task score change."""
    points = analysis.selectivity[analysis.selectivity["task"] == task]
    damage = [c for c in ("neutral_kl", "offtask_score_delta") if np.isfinite(points[c]).any()]
    if points.empty or not damage or not np.isfinite(points["gain"]).any():
        return None
    fig, axes = plt.subplots(1, len(damage), figsize=(4.5 * len(damage) + 1.6, 3.6), squeeze=False, sharey=True)  # + the legend
    colours = method_colours(analysis)
    for ax, column in zip(axes[0], damage):
        for method, group in points.groupby("method"):
            ax.scatter(group[column], group["gain"], s=14, color=colours[method], label=method)
        ax.set(xlabel=column, title=f"{task}: effectiveness vs {column}")
    axes[0][0].set_ylabel("score − score_base")
    _legend_beside(axes[0][-1])
    return _save(fig, path)


def adaptive_plot(decisions: Decisions, path: Path) -> Path | None:
    """Each target's interval width against the post-training FLOPs spent when it was measured, with
    its goal: how much narrower each round of chosen cells made the answer."""
    history = decisions.width_history()
    if not history:
        return None
    goals = {(t["target"], t["unit"]): t["goal"] for r in decisions.rounds for t in r["targets"]}
    units = sorted({unit for _, unit in history})
    fig, panels = plt.subplots(1, len(units), figsize=(5.5 * len(units), 3.8), squeeze=False)
    for ax, unit in zip(panels[0], units):
        for (name, u), points in sorted(history.items()):
            if u != unit:
                continue
            flops, width = zip(*points)
            line = ax.plot(flops, width, marker="o", ms=3, label=name)[0]
            ax.axhline(goals[(name, u)], color=line.get_color(), ls=":", lw=1)
        spent = [f for points in history.values() for f, _ in points]
        log = max(spent) > 10 * min(spent)
        ax.set(xscale="log" if log else "linear", xlabel="post-training FLOPs spent", ylabel=f"95 % interval width ({unit}; the wider of stored and fresh-noise)", title=f"{unit}: interval per round (dotted: goal)")
        if log:
            _readable_log_ticks(ax.xaxis)
        ax.legend(fontsize=6)
    return _save(fig, path)
