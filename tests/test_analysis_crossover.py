"""The crossover budget D*: its interval, its plot, its trend and the outcomes two curves can have."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

import analysis
import analysis.plots as plots
from analysis.capability import get_axis
from analysis.crossover import CI_LEVEL, OUTCOMES, Crossover, CrossoverScaling, crossover, crossover_scaling, find_crossovers, lead_from, outcomes
from analysis.curves import fit_curves
from analysis.metrics import question_sampling_sd, step, whole_percent
from analysis.report import _capability, _findings
from analysis.synthetic import TrueCurve, synthetic_rows
from test_analysis_capability import MODELS
from test_analysis_results import STEER, TRUE_D_STAR, TUNE, write_cells

AHEAD = TrueCurve(e=0.1, b=0.2, beta=0.4)  # a steering curve below TUNE's loss over every budget


def _crossover(model: str, d_star: float, lo: float, hi: float, n_params: float = 1e6) -> Crossover:
    return Crossover("t", model, n_params, "steer_mean", "lora", 4.0, 1024.0, d_star, lo, hi, 0.8, "crosses", "lora overtakes")


def test_lead_from_censors_the_resamples_that_do_not_cross_inside_the_range() -> None:
    d = np.geomspace(4, 1024, 256)
    advantage = np.stack([np.log(d / 50.0), np.full_like(d, 0.1), np.full_like(d, -0.1), np.log(50.0 / d), np.zeros_like(d)])
    lead = lead_from(advantage, d)
    assert lead[0] == pytest.approx(50.0, rel=1e-3)
    assert lead[1:4].tolist() == [-np.inf, np.inf, np.inf]  # ahead throughout; behind throughout; ahead only below 50
    assert np.isnan(lead[4])  # tied: no D* at all


EARLY, LATE = TrueCurve(0.1, 0.7, 0.5), TrueCurve(0.25, 0.23, 0.3)  # EARLY overtakes LATE near the smallest budget


def _one_crossover(steering: TrueCurve, finetuning: TrueCurve, metric: str = "score", seeds: int = 2, noise: float = 0.08) -> Crossover:
    """steer_mean against lora on one model (4 budgets × `seeds` noisy cells each, 200 resamples); each cell's loss is also stored as its NLL."""
    curves = {("t", "lora", "m1"): finetuning, ("t", "steer_mean", "m1"): steering}
    rows = synthetic_rows(curves, {"m1": 10**6}, (4, 32, 256, 1024), seeds=seeds, noise=noise, rng=np.random.default_rng(2))
    frame = pd.DataFrame([dict(row, nll=1.0 - row["score"]) for row in rows])
    (c,) = find_crossovers(fit_curves(frame, metric=metric, bootstrap=200, seed=0))
    return c


def test_the_d_star_interval_counts_resamples_where_the_curves_do_not_cross() -> None:
    """lora crosses steer_mean near the smallest budget, and in some of the resamples it is ahead already
    there: those resamples put D* below the range. Taken over the crossing resamples only, the interval
    started inside the range, narrower than the resamples say."""
    c = _one_crossover(steering=LATE, finetuning=EARLY, seeds=3, noise=0.12)
    assert c.outcome == "crosses" and c.share < 0.95
    assert c.d_star_lo == -np.inf and c.d_star < c.d_star_hi < c.d_max
    assert c.interval().startswith("[< 4, ") and "inf" not in c.interval()


def test_the_crossovers_table_keeps_every_field_and_its_infinite_ends(tmp_path: Path) -> None:
    """crossovers.parquet beside fits.json: the study's answer as a table to load; an interval end below every budget
    stays -inf there (fits.json can only write it as the text "-inf"), and a sweep with no pair still has the columns."""
    from analysis.io import write_table
    from analysis.summary import crossover_frame

    c = _one_crossover(steering=LATE, finetuning=EARLY, seeds=3, noise=0.12)
    (row,) = pd.read_parquet(write_table(str(tmp_path), "c.parquet", crossover_frame([c]))).to_dict(orient="records")
    assert row["d_star_lo"] == -np.inf and row["outcome"] == "crosses" and row["d_star"] == pytest.approx(c.d_star)
    assert row.keys() == c.record().keys() and all(row[k] == v or (v != v and row[k] != row[k]) for k, v in c.record().items())
    empty = crossover_frame([])
    assert list(empty.columns) == list(row) and empty["d_star"].dtype == float and empty["share"].dtype == float and empty["idle"].dtype == bool


def test_the_interval_of_steering_overtaking_is_where_steering_leads_from() -> None:
    """The methods swapped: steer_mean overtakes lora, and its D* interval counts the resamples from steering's
    side, around D*; counted from fine-tuning's side (behind at the largest budget: +inf) it was [> 1.02e+03]."""
    c = _one_crossover(steering=EARLY, finetuning=LATE)
    assert c.outcome == "steering_overtakes" and c.verdict.startswith("steer_mean overtakes lora")
    assert c.d_min < c.d_star_lo <= c.d_star <= c.d_star_hi < c.d_max


def test_a_crossing_in_nll_is_the_same_crossing_as_in_score() -> None:
    """The same losses read as an NLL, where lower is better: the same outcome, D* and interval as the scores
    give. With the direction ignored, "lora overtakes steer_mean" read "steer_mean overtakes lora"."""
    score, nll = (_one_crossover(steering=LATE, finetuning=EARLY, metric=metric) for metric in ("score", "nll"))
    assert (nll.outcome, nll.verdict) == (score.outcome, score.verdict) and score.outcome == "crosses"
    assert [nll.d_star, nll.d_star_lo, nll.d_star_hi, nll.share] == pytest.approx([score.d_star, score.d_star_lo, score.d_star_hi, score.share])


def test_the_d_star_trend_is_the_slope_of_log_d_star_on_log_x() -> None:
    """ln D* = 1, 3, 3 at ln x = 0, 1, 2: the least-squares slope of ln D* on ln x is 1. The inverse regression
    (ln x on ln D*) gives 4/3 here, and the same as this one wherever the D* lie on a line."""
    found = [_crossover(model, np.exp(logd), 1.0, 100.0, np.exp(logx)) for model, logx, logd in (("a", 0, 1), ("b", 1, 3), ("c", 2, 3))]
    capabilities = pd.DataFrame({"task": "t", "model": ["a", "b", "c"], "params": np.exp([0.0, 1.0, 2.0])})
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert trend.n_models == 3 and trend.gamma == pytest.approx(1.0)


def test_an_interval_wholly_outside_the_range_is_said_once() -> None:
    assert _crossover("m", 900.0, np.inf, np.inf).interval() == "[> 1024]"
    assert _crossover("m", 900.0, 300.0, np.inf).interval() == "[300, > 1024]"


def test_the_plot_draws_each_interval_from_its_own_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A D* of 100 with an interval [120, 300] (the point outside it) was drawn from 80 to 300 (|lo − D*| below
    the point); an interval open below the range is drawn down to the range's smallest budget, and one open
    at both ends (the least certain D*) over the whole range, not left out."""
    found = [_crossover("a", 100.0, 120.0, 300.0, 1e6), _crossover("b", 50.0, -np.inf, 70.0, 4e6),
             _crossover("c", 60.0, -np.inf, np.inf, 16e6)]  # fmt: skip
    capabilities = pd.DataFrame({"task": "t", "model": ["a", "b", "c"], "family": "f", "params": [1e6, 4e6, 16e6],
                                 "neutral_loss": np.nan, "task_score": np.nan})  # fmt: skip
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=[]))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    spans = sorted((float(min(s[:, 1])), float(max(s[:, 1]))) for col in figures[0].axes[0].collections for s in col.get_segments())
    assert spans == [(4.0, 70.0), (4.0, 1024.0), (120.0, 300.0)]


@pytest.mark.parametrize("crossing", [2, 3])
def test_the_plot_draws_a_d_star_trend_only_where_the_text_states_one(crossing: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three models, fine-tuning overtaking on `crossing` of them: a line through two D* fitted them exactly and was
    drawn with its γ while the text said no trend could be fitted; from three models on both state it."""
    sizes = {"a": 1e6, "b": 4e6, "c": 16e6}
    found = [_crossover(m, 10 * (n / 1e6) ** 0.5, 5.0, 100.0, n) for m, n in list(sizes.items())[3 - crossing :]]
    capabilities = pd.DataFrame({"task": "t", "model": list(sizes), "family": "f", "params": list(sizes.values()),
                                 "neutral_loss": np.nan, "task_score": np.nan})  # fmt: skip
    trends = crossover_scaling(found, capabilities, get_axis("params"))
    assert [t.n_models for t in trends] == [crossing]
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=trends))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    labels = [line.get_label() for line in figures[0].axes[0].get_lines() if "γ=" in line.get_label()]
    assert len(labels) == (crossing >= 3), labels
    assert ("a line through 2 points, not a finding" in trends[0].describe()) == (crossing < 3)


def test_the_plot_draws_the_trend_the_text_states_without_an_idle_pairs_d_star(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """D* ∝ N^0.5 on three models and an idle pair's D* of 5 on a fourth: the text states γ 0.50 over three models (idle
    pairs are no finding), the plot drew four points and a line through them, "γ=-0.10" (helper-139)."""
    sizes = {"a": 1e6, "b": 4e6, "c": 16e6, "d": 64e6}
    found = [_crossover(m, 10 * (n / 1e6) ** 0.5, 5.0, 100.0, n) for m, n in list(sizes.items())[:3]]
    found.append(dataclasses.replace(_crossover("d", 5.0, 4.5, 6.0, 64e6), idle=True))
    capabilities = pd.DataFrame({"task": "t", "model": list(sizes), "family": "f", "params": list(sizes.values()),
                                 "neutral_loss": np.nan, "task_score": np.nan})  # fmt: skip
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert trend.n_models == 3 and trend.gamma == pytest.approx(0.5) and "or both methods idle" in trend.describe()
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=[trend]))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    ax = figures[0].axes[0]
    assert sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_linestyle() == "None") == 3
    (line,) = [line for line in ax.get_lines() if "γ=" in line.get_label()]
    assert "γ=0.50" in line.get_label()
    slope = np.diff(np.log(line.get_ydata()[[0, -1]])) / np.diff(np.log(line.get_xdata()[[0, -1]]))
    assert slope == pytest.approx(0.5)


def _assert_ticks_read(fig: Figure) -> None:
    """On each panel's x-axis and the first panel's y-axis (shared): at least two labelled ticks in view, distinct,
    not overlapping, and those below 10⁵ plain numbers (matplotlib's log labels wrote "6×10⁰")."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in [ax.xaxis for ax in fig.axes] + [fig.axes[0].yaxis]:
        at = int(axis.axis_name == "y")
        lo, hi = sorted(axis.get_view_interval())
        shown = [t for t in axis.get_ticklabels() + axis.get_ticklabels(minor=True) if t.get_text() and lo <= t.get_position()[at] <= hi]
        texts = [t.get_text() for t in shown]
        assert len(shown) >= 2 and len(set(texts)) == len(texts), (axis.axis_name, texts)
        plain = [t for t in shown if t.get_position()[at] < 1e5]
        assert all(re.fullmatch(r"[0-9.]+", t.get_text()) and float(t.get_text()) == pytest.approx(t.get_position()[at]) for t in plain), texts
        boxes = [t.get_window_extent(renderer) for t in shown]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2)), (axis.axis_name, texts)


@pytest.mark.parametrize("crossing", [1, 3])
def test_the_crossover_plot_reads_with_one_model_or_several(crossing: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine-tuning overtakes on one model or on all three, D* between 5 and 12. Each panel's x-range was the
    models' range, so the outer points sat on its edges, and with one D* its ticks crowded or fell outside the
    view; the D* axis read "6×10⁰"; and the title explained a held-out error that, with one model, nothing showed."""
    sizes, d_stars = {"a": 1e6, "b": 4e6, "c": 16e6}, {"a": 5.0, "b": 8.0, "c": 12.0}
    found = [_crossover(m, d_stars[m], 0.7 * d_stars[m], 1.5 * d_stars[m], sizes[m]) for m in list(sizes)[3 - crossing :]]
    capabilities = pd.DataFrame({"task": "t", "model": list(sizes), "family": "f", "params": list(sizes.values()),
                                 "neutral_loss": [0.6, 0.65, 0.7], "task_score": np.nan})  # fmt: skip
    trends = [t for x in ("params", "neutral_loss") for t in crossover_scaling(found, capabilities, get_axis(x))]
    assert len(trends) == (2 if crossing == 3 else 0) and all(np.isfinite(t.holdout_error) for t in trends)
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=trends))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    (fig,) = figures
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        points = [x for line in ax.get_lines() if line.get_linestyle() == "None" for x in line.get_xdata()]
        assert len(points) == crossing and all(lo * 1.05 < x < hi / 1.05 for x in points), (lo, points, hi)
    _assert_ticks_read(fig)
    texts = [t.get_text() for t in fig.findobj(Text)]
    shown = [t for t in texts if re.search(r"held-out \d", t)]
    assert len(shown) == (2 if crossing == 3 else 0), texts  # one trend per panel, its held-out error in the legend
    assert any("held-out" in t for t in texts) == bool(shown), texts
    assert "lora over steer_mean" in texts  # which colour is which pair, with or without a trend line (it was never said)
    # no resamples here: the lines are drawn, dotted, but not as laws the text withholds
    assert all(t.endswith("(no interval: not a finding)") for t in shown), shown
    assert all(line.get_linestyle() == ":" for ax in fig.axes for line in ax.get_lines() if "γ=" in line.get_label())


def test_the_budget_plot_labels_a_narrow_budget_range_in_plain_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets 4 to 32, under a decade: matplotlib labelled them "4×10⁰ 6×10⁰ 10¹ 2×10¹"."""
    rows = synthetic_rows({("t", "lora", "m1"): EARLY}, {"m1": 10**6}, (4, 8, 16, 32), seeds=1, noise=0.02, rng=np.random.default_rng(0))
    a = SimpleNamespace(fits=fit_curves(pd.DataFrame(rows), metric="score", bootstrap=0, seed=0), metric="score", loaded=SimpleNamespace(ok=pd.DataFrame(rows)))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.budget_curves_plot(a, "t", tmp_path / "x.png") is not None
    _assert_ticks_read(figures[0])


def test_the_crossover_plot_draws_more_pairs_than_colours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eleven steering × fine-tuning pairs cross: the colours stopped at tab10's ten, the eleventh pair raised a
    KeyError and took the whole report down. Colours repeat instead."""
    found = [dataclasses.replace(_crossover("a", 10.0 + i, 5.0, 100.0), steering=f"steer_{i:02d}") for i in range(11)]
    capabilities = pd.DataFrame({"task": "t", "model": ["a"], "family": "f", "params": [1e6], "neutral_loss": np.nan, "task_score": np.nan})
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=[]))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    points = {y: line.get_color() for line in figures[0].axes[0].get_lines() if line.get_linestyle() == "None" for y in line.get_ydata()}
    assert sorted(points) == [10.0 + i for i in range(11)]
    assert points[20.0] == points[10.0] != points[11.0]  # the eleventh pair takes the first's colour


def test_the_budget_plot_gives_two_models_of_one_size_their_own_colours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two families' models of the same size were coloured by size, so their curves could not be told apart."""
    sizes = {"pythia-1b": 10**9, "qwen-1b": 10**9, "pythia-2b": 2 * 10**9}
    truth = {("t", "lora", model): TrueCurve(TUNE.e * (1 + i / 10), TUNE.b, TUNE.beta) for i, model in enumerate(sizes)}
    rows = synthetic_rows(truth, sizes, (8, 32, 128, 512, 2048), seeds=1, noise=0.005, rng=np.random.default_rng(0))
    fits = [f for f in fit_curves(pd.DataFrame(rows), metric="score", bootstrap=0, seed=0) if not f.joint]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    frame = pd.DataFrame(rows).assign(score_base=lambda f: f["model"].map({"pythia-1b": 0.1, "qwen-1b": 0.2, "pythia-2b": 0.3}))
    loaded = SimpleNamespace(ok=pd.concat([frame, frame.iloc[:1].assign(task="other", score_base=0.9)]))  # another task's base: not drawn
    assert plots.budget_curves_plot(SimpleNamespace(fits=fits, metric="score", loaded=loaded), "t", tmp_path / "x.png") is not None
    lines = figures[0].axes[0].get_lines()
    colour = {line.get_label().split(" (")[0]: line.get_color() for line in lines if line.get_label() != plots.BEFORE_LABEL}
    assert sorted(colour) == sorted(sizes)
    assert len({tuple(c) for c in colour.values()}) == 3, colour
    # each model's score before post-training, a dotted line across the panel in the model's colour (a log budget axis has no D=0)
    base = {line.get_ydata()[0]: line.get_color() for line in lines if line.get_label() == plots.BEFORE_LABEL}
    assert base == {0.1: colour["pythia-1b"], 0.2: colour["qwen-1b"], 0.3: colour["pythia-2b"]}
    assert figures[0].axes[0].get_ylim()[0] < 0.1  # the lines are in view


def test_no_axis_error_says_why_when_there_were_three_models(tmp_path: Path) -> None:
    """Three models fit a joint law, but leaving out the top one leaves two; fine-tuning overtakes on two of
    them, and a trend through two D* has no leave-one-out error. The report said "they need three models"."""
    models = MODELS[:3]  # one family, so parameters pool too
    curves = {("t", "lora", m.name): TUNE for m in models}
    curves |= {("t", "steer_mean", m.name): STEER for m in models[:2]} | {("t", "steer_mean", models[2].name): AHEAD}
    rows = synthetic_rows(curves, {m.name: m.params for m in models}, (8, 32, 128, 512, 2048), seeds=2, noise=0.01, rng=np.random.default_rng(0))
    by_name = {m.name: m for m in models}
    write_cells(tmp_path, [dict(row, **by_name[row["model"]].columns()) for row in rows])
    summary = analysis.fit_results(str(tmp_path), bootstrap=0)
    assert sorted(c.outcome for c in summary.analysis.crossovers) == ["crosses", "crosses", "steering_ahead"]
    report = " ".join(b.text for b in _capability(summary.analysis) if hasattr(b, "text"))
    for text in (report, summary.to_text()):
        assert "they need three models" not in text and "could be fitted on any axis" not in text
        assert "fitted over at most 3 models, but not again without the top one: 2 left, fewer than the 3 a law needs" in text
        assert "the D* trend has at most 2 models with a finite D*" in text


def _trend_pairs(resamples: int) -> tuple[list[Crossover], pd.DataFrame]:
    """D* ∝ params^0.5 on three models, each D* resampled with 10 % noise, and a fourth model whose curve went non-finite."""
    rng = np.random.default_rng(0)
    sizes = {"a": 1e6, "b": 4e6, "c": 16e6, "d": 64e6}
    found = []
    for model, n in list(sizes.items())[:3]:
        d_star = 10 * (n / 1e6) ** 0.5
        c = _crossover(model, d_star, d_star * 0.8, d_star * 1.2, n)
        found.append(dataclasses.replace(c, overtakes=d_star * np.exp(rng.normal(0, 0.1, resamples))))
    found.append(Crossover("t", "d", 64e6, "steer_mean", "lora", 4.0, 1024.0, *[np.nan] * 4, "not_finite", "no verdict"))
    return found, pd.DataFrame({"task": "t", "model": list(sizes), "params": list(sizes.values())})


def test_a_model_without_a_verdict_does_not_take_the_trends_interval_away() -> None:
    """The non-finite model's empty resample array made the resample counts disagree, and the interval was dropped."""
    found, capabilities = _trend_pairs(200)
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert (trend.n_models, trend.n_pairs) == (3, 3) and trend.has_interval
    assert trend.gamma_lo < 0.5 < trend.gamma_hi and trend.gamma_lo > 0
    assert "which excludes 0" in trend.describe()


def _measured_crossings(d_stars: dict[str, float], params: dict[str, float]) -> tuple[list[Crossover], pd.DataFrame]:
    """Each model's D*, resampled with 5 % noise: curves measured precisely."""
    rng = np.random.default_rng(1)
    found = [dataclasses.replace(_crossover(m, d, d * 0.9, d * 1.1, params[m]), overtakes=d * np.exp(rng.normal(0, 0.05, 400)))
             for m, d in d_stars.items()]  # fmt: skip
    return found, pd.DataFrame({"task": "t", "model": list(params), "params": list(params.values())})


def test_d_stars_measured_precisely_but_off_any_line_are_no_trend() -> None:
    """D* 46, 297, 109 over three sizes (up, then down): the resamples alone gave γ = 0.19 an interval of
    [0.16, 0.22], "which excludes 0", though the line misses each model left out by 11×. The models'
    scatter about the line (a t-interval on one degree of freedom) belongs in it."""
    params = {"s": 1e7, "m": 1e8, "l": 1e9}
    (trend,) = crossover_scaling(*_measured_crossings({"s": 46.0, "m": 297.0, "l": 109.0}, params), get_axis("params"))
    assert trend.gamma == pytest.approx(0.19, abs=0.01) and trend.holdout_error > 2
    assert trend.gamma_lo < 0 < trend.gamma_hi and "includes 0: no clear trend" in trend.describe()


def test_d_stars_close_to_a_power_law_keep_a_trend_that_excludes_0() -> None:
    """Four models within ±3 % of D* ∝ params^0.5: the scatter's interval stays narrow, and the trend is stated."""
    params = {"a": 1e6, "b": 1e7, "c": 1e8, "d": 1e9}
    d_stars = {m: 10 * (n / 1e6) ** 0.5 * f for (m, n), f in zip(params.items(), (1.03, 0.97, 1.02, 0.98))}
    (trend,) = crossover_scaling(*_measured_crossings(d_stars, params), get_axis("params"))
    assert trend.gamma_lo > 0.4 and trend.gamma_hi < 0.6 and "which excludes 0" in trend.describe()


def _three_crossing(resamples: int) -> tuple[list[Crossover], pd.DataFrame]:
    """`_trend_pairs`'s three models that cross, D* ∝ params^0.5, without the non-finite one."""
    found, capabilities = _trend_pairs(resamples)
    return found[:3], capabilities


def test_a_disputed_d_star_is_left_out_of_the_trend() -> None:
    """A D* the measured means contradict is no finding, so no line through it is one either."""
    found, capabilities = _three_crossing(200)
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert (trend.n_models, trend.n_pairs) == (3, 3)
    found[1] = dataclasses.replace(found[1], disputed="at D=16 steer_mean is still ahead by 0.04")
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert (trend.n_models, trend.n_pairs) == (2, 3) and not trend.enough_models


def test_a_model_the_point_trend_leaves_out_stays_out_of_every_resample() -> None:
    """A fourth model on which steering stays ahead (so γ leaves it out) whose resampled curves all cross at D* = 4:
    each resample's line went through it too, and the interval came out [−0.19, −0.11], nowhere near γ = 0.5."""
    found, capabilities = _three_crossing(200)
    ahead = Crossover("t", "d", 64e6, "steer_mean", "lora", 4.0, 1024.0, np.nan, np.nan, np.nan, 0.9, "steering_ahead", "steer_mean stays ahead")
    (trend,) = crossover_scaling([*found, dataclasses.replace(ahead, overtakes=np.full(200, 4.0))], capabilities, get_axis("params"))
    assert 0 < trend.gamma_lo < 0.5 < trend.gamma_hi, (trend.gamma_lo, trend.gamma_hi)
    assert (trend.n_models, trend.n_pairs, trend.resample_share) == (3, 4, 1.0)


def test_a_resample_where_a_model_of_the_trend_does_not_cross_gives_no_slope() -> None:
    """The top model crosses in only 90 % of the resamples: the other 10 % drew a line through the other two models
    and counted as slopes of γ, so the trend had an interval; now they have none, and 90 % is under the 95 % needed."""
    found, capabilities = _three_crossing(200)
    found[2] = dataclasses.replace(found[2], overtakes=np.where(np.arange(200) < 20, np.nan, found[2].overtakes))
    (trend,) = crossover_scaling(found, capabilities, get_axis("params"))
    assert not trend.has_interval and trend.resample_share == 0.9
    assert "no interval (lora overtakes on all 3 in 90% of resamples), so not a finding" in trend.describe()


@pytest.mark.parametrize("lo, hi, stated", [(np.nan, np.nan, None), (0.3, 0.7, "which excludes 0"), (-0.2, 0.7, "includes 0: no clear trend")])
def test_a_d_star_trend_is_stated_only_with_an_interval(lo: float, hi: float, stated: str | None) -> None:
    trend = CrossoverScaling("t", "steer_mean", "lora", "params", 0.5, lo, hi, 3, 3, 0.1)
    a = SimpleNamespace(fits=[], scaling=[trend], crossovers=[], compositions=[], unchanged=[], metric="score", x="params", loaded=SimpleNamespace(ok=pd.DataFrame()), bootstrap=200, axes=SimpleNamespace(best=None))
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert ("D* ∝ params^0.50" in text) == (stated is not None), text
    assert stated is None or stated in text
    assert ("1 D* trend(s) across models have no interval" in text) == (stated is None), text


def test_trends_through_two_models_are_counted_not_dropped_in_silence() -> None:
    """fits.json held three D* trends and the report spoke of one: two went through two models each (helper-143)."""
    trends = [CrossoverScaling("t", "steer_mean", f, "params", 0.5, 0.3, 0.7, n, n, 0.1) for f, n in (("lora", 3), ("full_ft", 2), ("task_vector", 2))]
    a = SimpleNamespace(fits=[], scaling=trends, crossovers=[], compositions=[], unchanged=[], metric="score", x="params", loaded=SimpleNamespace(ok=pd.DataFrame()), bootstrap=200, axes=SimpleNamespace(best=None))
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert "D* ∝ params^0.50" in text and "2 D* trend(s) go through fewer than 3 models with a finite D*" in text


def test_a_trend_does_not_say_fine_tuning_never_overtakes_on_the_models_it_leaves_out() -> None:
    """Left out are models tied or crossing twice too, where fine-tuning does overtake (in the middle of the range)."""
    trend = CrossoverScaling("t", "steer_mean", "lora", "params", 0.5, 0.3, 0.7, 3, 5, 0.1)
    assert "the other 2 have no single crossing where it overtakes inside the range (ahead or behind throughout, tied" in trend.describe()
    assert "does not overtake" not in trend.describe()


@pytest.mark.parametrize("pairs", [9, 12])
def test_many_crossovers_come_with_what_their_shares_mean_across_them(pairs: int) -> None:
    """90 pairs in the quickstart, each a finding at 95 % of its own resamples with no correction for the rest, nor for
    how few resamples a share near the line was read from."""
    found = [dataclasses.replace(_crossover(f"m{i}", 50.0, 20.0, 80.0), share=0.96 if i % 3 else 0.5) for i in range(pairs)]
    a = SimpleNamespace(fits=[], scaling=[], crossovers=found, compositions=[], unchanged=[], metric="score", x="params",
                        loaded=SimpleNamespace(ok=pd.DataFrame()), bootstrap=200, axes=SimpleNamespace(best=None))  # fmt: skip
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert (f"{pairs - pairs // 3} of the {pairs} crossover outcomes are firm (95% of the resamples agreeing" in text) == (pairs >= 10), text
    # a share of 200 resamples near 95 % is itself uncertain by √(.95 · .05 / 200) = 1.5 points: 96 % is not clear of the line
    assert ("The shares come from 200 resamples, so one near 95% is itself uncertain by ±1.5 points" in text) == (pairs >= 10), text


def _budget_curve(method: str, e: float, b: float, beta: float) -> SimpleNamespace:
    """Just what `crossover` reads of a fitted budget curve, without resamples."""
    return SimpleNamespace(task="t", model="m", n_params=1e6, method=method, metric="score", boot=None, worsening="",
                           points=SimpleNamespace(d=np.array([8.0, 4096.0]), value=np.array([np.nan, np.nan])),
                           fit=SimpleNamespace(params={"E": e, "B": b, "beta": beta}))  # fmt: skip


def test_curves_that_cross_twice_are_said_to_instead_of_judged_by_their_ends() -> None:
    """Fine-tuning (E .25, B 6, β 1) against steering (E .12, B 1, β .3) over D 8–4096: steering leads at both
    ends, fine-tuning in between (over half the range); the verdict read "steering stays ahead"."""
    steer, tune = _budget_curve("steer_mean", 0.12, 1.0, 0.3), _budget_curve("lora", 0.25, 6.0, 1.0)
    c = crossover(steer, tune)
    d = np.array([c.d_star, c.d_star_2])
    gap = tune.fit.params["E"] + 6.0 / d - (steer.fit.params["E"] + 1.0 * d**-0.3)  # the loss gap is 0 where they cross
    assert c.outcome == "crosses_twice" and 8 < c.d_star < c.d_star_2 < 4096 and np.abs(gap).max() < 1e-3
    assert c.verdict.startswith(f"the curves cross twice: steer_mean is ahead below D ≈ {c.d_star:.3g} and above D ≈ {c.d_star_2:.3g}, lora in between")
    assert "steering stays ahead" not in c.verdict and np.isnan([c.d_star_lo, c.share]).all()


def _measured(scores: dict[str, dict[int, tuple[float, ...]]]) -> Crossover:
    """steer_mean against lora on one model, each cell's score given per method, budget and seed; 200 resamples."""
    curves = {("t", method, "m1"): TrueCurve(0.5, 0.1, 0.5) for method in scores}  # placeholders: the scores replace them
    budgets = tuple(scores["lora"])
    rows = synthetic_rows(curves, {"m1": 10**6}, budgets, seeds=len(scores["lora"][budgets[0]]), noise=0.0, rng=np.random.default_rng(0))
    frame = pd.DataFrame([dict(row, score=scores[row["method"]][row["budget"]][row["seed"]]) for row in rows])
    (c,) = find_crossovers(fit_curves(frame, metric="score", bootstrap=200, seed=0))
    return c


FLAT = {d: (0.225, 0.225) for d in (4, 16, 64, 256)}  # 9 of 40 test questions at every budget, in both seeds


def test_curves_apart_by_less_than_the_scores_can_resolve_are_tied() -> None:
    """lora's seeds a question apart at 64 and 256 but 9/40 on average at every budget, as steer_mean: tied."""
    c = _measured({"steer_mean": FLAT, "lora": {4: (0.225, 0.225), 16: (0.225, 0.225), 64: (0.2, 0.25), 256: (0.25, 0.2)}})
    assert c.outcome == "tied" and np.isnan(c.d_star) and c.interval() == "", c.verdict
    assert c.tolerance == pytest.approx(0.0125) and "too close to tell apart" in c.verdict and c.share > 0.5


def test_a_crossing_at_the_smallest_budget_the_scores_cannot_place_is_not_stated() -> None:
    """A user journey's results: steer_mean 9/40 everywhere; lora the same at 4 and 16, one question fewer at 64,
    and 12 and 10 at 256. The report said "lora overtakes steer_mean at D* ≈ 8.01 CI [8, 8.01], 100% of resamples
    agree": both seeds scoring alike gave the bootstrap nothing to redraw, and the curves counted as apart from 1e-6
    on. No D* now, and what the fit says (since the two-seed fit's tie-break, lora ahead at the top) is agreed by too
    few resamples to be a finding."""
    c = _measured({"steer_mean": FLAT, "lora": {4: (0.225, 0.225), 16: (0.225, 0.225), 64: (0.2, 0.2), 256: (0.3, 0.25)}})
    assert np.isnan(c.d_star) and c.interval() == "" and c.share < CI_LEVEL, (c.verdict, c.share)
    assert c.tolerance == pytest.approx(0.0125)


def test_one_question_ahead_at_every_budget_is_not_a_tie() -> None:
    """lora 10/40 at every budget in both seeds, steer_mean 9/40: a whole step apart, more than the half step that ties."""
    c = _measured({"steer_mean": FLAT, "lora": {d: (0.25, 0.25) for d in FLAT}})
    assert c.outcome == "finetuning_ahead" and "is ahead of steer_mean at both ends" in c.verdict, c.verdict
    # every seed alike: nothing to judge the means by, and the verdict says so, as a D*'s does
    assert c.verdict.endswith(" at both ends (the seeds agree exactly, so the means measured at the shared budgets were not checked against it)")


def test_a_crossing_measured_in_steps_of_one_question_is_still_found() -> None:
    """STEER and TUNE cross near D* = 88, scored on 200 questions (scores rounded to steps of 0.005): the half-step
    tolerance leaves a crossing whose curves are far apart at both ends where it was, D* and all."""
    curves = {("t", "steer_mean", "m1"): STEER, ("t", "lora", "m1"): TUNE}
    rows = synthetic_rows(curves, {"m1": 10**6}, (8, 32, 128, 512, 2048), seeds=3, noise=0.02, rng=np.random.default_rng(0))
    frame = pd.DataFrame([dict(row, score=round(row["score"] * 200) / 200) for row in rows])
    (c,) = find_crossovers(fit_curves(frame, metric="score", bootstrap=200, seed=0))
    assert c.tolerance == pytest.approx(0.0025) and c.outcome == "crosses"
    assert c.d_star == pytest.approx(TRUE_D_STAR, rel=0.15) and c.d_star_lo <= TRUE_D_STAR <= c.d_star_hi


def test_a_level_stretch_neither_starts_nor_ends_a_lead() -> None:
    """With a tolerance of 0.01: apart by under it throughout (tied, though the sign flips); level, then fine-tuning
    ahead (ahead wherever they differ: no D*); behind, then level (steering ahead); behind, level, ahead (a crossing,
    at the change of sign inside the level stretch). With TIE, a level stretch took the side of its sign: all four crossed."""
    d = np.geomspace(4, 1024, 256)
    tiny = 0.005 * np.log(d / 64) / np.log(256)  # −0.005 … +0.0025, changing sign at 64
    advantage = np.stack([tiny, np.where(d < 64, tiny, 0.1), np.where(d < 64, -0.1, tiny), np.where(d < 16, -0.1, np.where(d < 256, tiny, 0.1))])
    code, d_star = outcomes(advantage, d, tol=0.01)
    assert [OUTCOMES[i] for i in code] == ["tied", "finetuning_ahead", "steering_ahead", "crosses"]
    assert np.isnan(d_star[:3]).all() and d_star[3] == pytest.approx(64, rel=0.03)
    lead = lead_from(advantage, d, tol=0.01)
    assert np.isnan(lead[0]) and lead[1:3].tolist() == [-np.inf, np.inf] and lead[3] == pytest.approx(64, rel=0.03)
    assert [OUTCOMES[i] for i in outcomes(advantage, d)[0]] == ["crosses"] * 4


def test_the_step_of_a_score_is_one_question() -> None:
    """9, 8, 12 and 10 of 40 questions: steps of 1/40; 9 and 12 of 40 only: a gap of 3 steps, but still 1/40 (a
    divisor of every gap); a continuous metric, or one value, has no step."""
    assert step(np.array([0.225, 0.2, 0.3, 0.25])) == pytest.approx(0.025)
    assert step(np.array([0.225, 0.3, 0.325])) == pytest.approx(0.025)
    assert step(np.random.default_rng(0).random(16)) == 0 and step(np.full(4, 0.225)) == 0


@pytest.mark.parametrize("questions", [86, 300, 1024, 1319, 4999])
def test_the_step_is_one_question_for_test_sets_whose_fractions_have_no_short_decimal(questions: int) -> None:
    """Scores k/n with n of 300, 1024 or 1319 (GSM8K's test set): gaps rounded to 9 decimals were no whole
    multiples of 1/n any more, so the step came out 0 and the crossovers' tie tolerance fell to 1e-6 (a fraction
    of one question decided a crossing). Also after the round trip through the loss, 1 − (1 − score)."""
    counts = np.random.default_rng(questions).integers(0, questions + 1, 20)
    counts[:2] = (1, 2)  # two counts a question apart: no common factor with n
    scores = counts / questions
    assert step(scores) == pytest.approx(1 / questions, rel=1e-12)
    assert step(1.0 - (1.0 - scores)) == pytest.approx(1 / questions, rel=1e-12)
    assert question_sampling_sd(scores)[0] == questions



def test_values_with_no_step_have_none() -> None:
    """Values all under 1e-6 were whole multiples of 1/1 within the tolerance: a step of 1, a tie tolerance of ½."""
    assert step(np.random.default_rng(0).random(50) * 1e-7) == 0 and step(np.array([np.nan, np.nan])) == 0
    assert step(np.array([0.0, 0.25, 0.5])) == pytest.approx(0.25)  # 0 itself is a whole count


def test_a_share_of_resamples_reads_as_its_whole_percent_rounded_down() -> None:
    """The crossovers' "N% of resamples agree" floors (94.75 % is not 95 %), and floor(100 · 0.29) is 28 in floats:
    58, 114 and 116 of 200 resamples (290, 570, 580 of 1,000) read a percent short."""
    assert [whole_percent(k / 200) for k in (58, 114, 116, 189, 199, 200)] == [29, 57, 58, 94, 99, 100]
    assert [whole_percent(k / 1000) for k in (290, 570, 580, 949)] == [29, 57, 58, 94]


def test_a_score_s_test_sampling_noise_is_binomial_over_the_questions_its_step_implies() -> None:
    """9, 8, 12 and 10 of 40 questions (mean .24375): n 40, sd √(p(1 − p)/40); an NLL, or one value, has none."""
    n, sd = question_sampling_sd(np.array([9, 8, 12, 10]) / 40)
    assert n == 40 and sd == pytest.approx(np.sqrt(0.24375 * 0.75625 / 40))
    assert question_sampling_sd(np.random.default_rng(0).random(16)) is None and question_sampling_sd(np.full(4, 0.225)) is None


def test_the_step_survives_a_round_trip_through_the_loss() -> None:
    """The adaptive loop holds scores as losses (1 − score): 1 − (1 − 0.025) is not 0.025 in floats, and a
    spurious 1e-17 gap beside the value itself made the step 0 (the tie tolerance back at 1e-6)."""
    scores = np.array([1, 8, 9, 12]) / 40
    assert step(np.concatenate([scores, 1.0 - (1.0 - scores)])) == pytest.approx(0.025)



def _measured_rows(steering, finetuning, budgets=(4, 16, 64, 256, 1024)) -> list[dict]:
    """steer_mean and lora on one model, each cell its curve's value at its budget plus a little noise (2 seeds)."""
    rng = np.random.default_rng(0)
    return [{"schema_version": 3, "sweep": "s", "cell_id": f"{method}-{b}-{s}", "slug": f"{method}-{b}-{s}", "status": "ok", "task": "t",
             "model": "m", "params_nonembed": 10**6, "budget": b, "seed": s, "method": method, "score": curve(b) + rng.normal(0, 0.01)}
            for b in budgets for s in range(2) for method, curve in (("steer_mean", steering), ("lora", finetuning))]  # fmt: skip


FALLING, RISING = (lambda b: 0.70 - 0.025 * np.log2(b)), (lambda b: 0.95 - 0.9 * b**-0.3)


@pytest.mark.parametrize("steering, finetuning, outcome, ahead", [
    (FALLING, RISING, "crosses", "steer_mean"), (RISING, FALLING, "steering_overtakes", "lora"),
])  # fmt: skip
def test_a_d_star_the_measured_means_contradict_is_not_a_finding(tmp_path: Path, steering, finetuning, outcome, ahead) -> None:
    """A curve that falls with data (0.65 → 0.45) is fitted as a flat line, and the other was placed past it at D* ≈ 14 in every
    resample (the bootstrap redraws noise around the same wrong curve), while at D=16 the falling one's measured mean is still ahead."""
    write_cells(tmp_path, _measured_rows(steering=steering, finetuning=finetuning))
    summary = analysis.fit_results(str(tmp_path), bootstrap=100, seed=0)
    (c,) = summary.analysis.crossovers
    assert c.outcome == outcome and c.share == 1.0 and 4 < c.d_star < 16
    assert c.disputed.startswith(f"the measured means do not show it: at D=16 {ahead} is still ahead by 0.0") and "do not show it: at D=16" in c.verdict
    assert "between the measured budgets 4 and 16" in c.verdict
    (line,) = [line for line in summary.to_text().splitlines() if "of resamples agree" in line]
    assert "100% of resamples agree (not a finding: disputed); the measured means do not show it: at D=16" in line, line


FALLING_UNFOLLOWED = "the law does not describe steer_mean's cells: they worsen as the budget grows past noise"  # the law's own check


def test_an_outcome_drawn_from_a_curve_its_law_cannot_follow_is_no_finding() -> None:
    """The quickstart's gridworld xl: steer_mean fell from 0.65 (both seeds) to 0.56, its law (which only improves with
    data) fitted it flat, and the fit said it "does not describe these cells"; the crossover with a fine-tune whose one
    split budget (0.56, 0.88) made its seeds' pooled spread wide passed the measured-means check, unmarked (helper-176)."""
    c = _measured({"steer_mean": {4: (0.65, 0.65), 16: (0.63, 0.62), 64: (0.60, 0.59), 256: (0.57, 0.57), 1024: (0.56, 0.56)},
                   "lora": {4: (0.56, 0.56), 16: (0.56, 0.57), 64: (0.57, 0.58), 256: (0.58, 0.59), 1024: (0.56, 0.88)}})
    assert c.disputed == FALLING_UNFOLLOWED, c.verdict  # the means alone dispute nothing here
    assert c.verdict.endswith(f"; {FALLING_UNFOLLOWED}") and "measured means" not in c.verdict, c.verdict


def test_one_seed_a_budget_says_the_d_star_was_not_checked() -> None:
    """With one cell a budget there is no noise to judge a contradiction by: the check said nothing at all."""
    one_seed = pd.DataFrame(_measured_rows(steering=FALLING, finetuning=RISING)).query("seed == 0")
    (c,) = find_crossovers(fit_curves(one_seed, metric="score", bootstrap=0, seed=0))
    assert c.disputed == FALLING_UNFOLLOWED  # the means were not held against the laws; the falling curve's own law was
    assert c.claim().endswith("; one seed a budget, so the means measured there were not checked against it)")


@pytest.mark.parametrize("seeds", [2, 3])
def test_seeds_that_agree_exactly_leave_the_d_star_unchecked_not_disputed(seeds: int) -> None:
    """No spread at all (every seed alike on both curves): the seeds say nothing of the questions' noise, which all cells
    share, so a lead of one question is no contradiction. Three equal seeds left a rounding residue (1e-32) judged as spread."""
    rows = pd.DataFrame(_measured_rows(steering=FALLING, finetuning=RISING))
    rows = pd.concat([rows, rows.query("seed == 0").assign(seed=2)]) if seeds == 3 else rows
    rows["score"] = rows.groupby(["method", "budget"])["score"].transform("first") + 0.1  # + 0.1: not exactly representable
    (c,) = find_crossovers(fit_curves(rows, metric="score", bootstrap=0, seed=0))
    assert c.disputed == FALLING_UNFOLLOWED
    assert c.claim().endswith("; the seeds agree exactly, so the means measured there were not checked against it)")


def test_an_outcome_without_a_crossing_says_when_the_means_were_not_checked() -> None:
    """Session 37 held "ahead", "tied" against the means measured; with one seed a budget they cannot be, and the
    verdict read as if they had been (a D* says "not checked")."""
    falling = dict(zip((4, 16, 64, 256, 1024), (0.70, 0.62, 0.55, 0.50, 0.45))).get
    rising = dict(zip((4, 16, 64, 256, 1024), (0.64, 0.69, 0.75, 0.82, 0.88))).get
    one_seed = pd.DataFrame(_measured_rows(steering=falling, finetuning=rising)).query("seed == 0")
    (c,) = find_crossovers(fit_curves(one_seed, metric="score", bootstrap=0, seed=0))
    assert c.outcome == "finetuning_ahead" and c.disputed == FALLING_UNFOLLOWED, (c.outcome, c.disputed)
    assert c.claim().endswith(" (one seed a budget, so the means measured at the shared budgets were not checked against it)"), c.verdict


def test_a_d_star_says_which_measured_budgets_bracket_it() -> None:
    """Between two measured budgets D* is the laws' interpolation: the data only say it lies between them."""
    levels = {4: 0.5, 32: 0.85, 256: 0.86, 1024: 0.87}
    rows = _measured_rows(steering=lambda b: 0.70 - 0.1 * b**-0.5, finetuning=levels.get, budgets=tuple(levels))
    (c,) = find_crossovers(fit_curves(pd.DataFrame(rows), metric="score", bootstrap=100, seed=0))
    assert c.outcome == "crosses" and 4 < c.d_star < 32 and c.disputed == ""
    assert c.verdict.endswith("(between the measured budgets 4 and 32)")


def test_fine_tuning_ahead_at_both_ends_that_the_measured_means_contradict_is_not_a_finding() -> None:
    """Steering falls with data (0.70 → 0.45) and is fitted as a flat line below its first budget's cells; LoRA rises from
    0.64: every resample put LoRA "ahead of steer_mean at both ends" (firm), though at D=4 every steering seed led.
    Only crossings were checked against the measured means."""
    falling = dict(zip((4, 16, 64, 256, 1024), (0.70, 0.62, 0.55, 0.50, 0.45))).get
    rising = dict(zip((4, 16, 64, 256, 1024), (0.64, 0.69, 0.75, 0.82, 0.88))).get
    (c,) = find_crossovers(fit_curves(pd.DataFrame(_measured_rows(steering=falling, finetuning=rising)), metric="score", bootstrap=100, seed=0))
    assert c.outcome == "finetuning_ahead" and c.share >= CI_LEVEL, (c.outcome, c.share)
    assert c.disputed.startswith("the measured means do not show it: at D=4 steer_mean is ahead by 0.0"), c.disputed
    assert "at both ends" not in c.verdict and "; the measured means do not show it: at D=4" in c.verdict, c.verdict


def test_an_outcome_most_resamples_do_not_give_names_the_one_they_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """"tied (6%)" said only that 94 % of resamples disagreed, not that most put fine-tuning ahead (helper-143): the
    resamples' commonest outcome, where it is not the fit's, is kept with its share and shown in the table."""
    import analysis.crossover as crossover_module
    from analysis.report import _crossover_table

    real = crossover_module.outcomes

    def mostly_ahead(advantage: np.ndarray, d: np.ndarray, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
        codes, samples = real(advantage, d, tol)
        if len(codes) > 1:  # the resamples: 80 % fine-tuning ahead, the rest as drawn
            codes = np.where(np.arange(len(codes)) < 0.8 * len(codes), OUTCOMES.index("finetuning_ahead"), codes)
        return codes, samples

    monkeypatch.setattr(crossover_module, "outcomes", mostly_ahead)
    c = _one_crossover(steering=LATE, finetuning=EARLY, seeds=3, noise=0.12)
    assert c.outcome == "crosses" and c.resampled_outcome == "finetuning_ahead" and c.resampled_share >= 0.8
    assert c.share <= 0.2
    (table, _) = _crossover_table(SimpleNamespace(crossovers=[c]))
    assert table.rows[0][2].endswith(f"({whole_percent(c.share)}%; most resamples: FT ahead, {whole_percent(c.resampled_share)}%)")
    assert c.resampled_note() == f"; most resamples ({whole_percent(c.resampled_share)}%): lora ahead throughout"  # `fit`'s text
    monkeypatch.undo()
    agreeing = _one_crossover(steering=LATE, finetuning=EARLY, seeds=3, noise=0.12)
    assert agreeing.resampled_outcome == "" and np.isnan(agreeing.resampled_share)


def test_a_disputed_crossover_prints_its_interval_before_the_dispute() -> None:
    """`fit` printed "…the measured means do not show it: at D=32 … (95 % Welch interval …) CI [< 4, > 1024], 44% …": the
    D* interval read as the Welch interval's (helper-169). The claim, its interval and share come first, then the dispute."""
    from analysis.summary import crossover_line

    dispute = "the measured means do not show it: at D=32 lora is behind by 0.02 [-0.05, 0.01] (95 % Welch interval over 4 seeds)"
    c = Crossover("facts", "ladder:xs", 1e5, "steer_mean", "lora", 4.0, 1024.0, 19.4, 2.0, 2000.0, 0.44, "crosses",
                  f"lora overtakes steer_mean at D* ≈ 19.4; {dispute}", disputed=dispute)
    assert c.claim() == "lora overtakes steer_mean at D* ≈ 19.4"
    assert crossover_line(c) == ("facts ladder:xs: lora overtakes steer_mean at D* ≈ 19.4 CI [< 4, > 1024], 44% of resamples "
                                 f"agree (under 95%: not a finding); {dispute}")


def test_firm_outcomes_repeated_through_a_methods_copy_are_counted_once() -> None:
    """The quickstart's "4 of the 90 crossover outcomes are firm" held steer_trained → full_ft and → task_vector on arith's
    s, both 99.5 %, where task_vector scored as full_ft to the bit in 7 of 8 cells: one finding, counted twice (helper-176).
    Alike is judged on each crossover's own task and model: pooled over models, two methods alike on m0–m2 were merged on
    m3, where they never scored alike (helper-178)."""

    def cell(model: str, method: str, budget: int, nll: float) -> dict:
        return {"task": "t", "model": model, "method": method, "budget": budget, "seed": 0, "score": 1 - nll / 4, "nll": nll,
                "nll_base": 2.0, "status": "ok"}  # fmt: skip

    ok = pd.DataFrame([cell(f"m{i}", method, b, 1.5 + b / 1e3 + (0.01 * i if method == "task_vector" and i >= 3 else 0))
                       for i in range(6) for method in ("full_ft", "task_vector") for b in (4, 16, 64, 256)])  # fmt: skip
    found = [dataclasses.replace(_crossover(f"m{i}", 50.0, 20.0, 80.0), finetuning=tuned, share=0.99 if i < 4 else 0.5)
             for i in range(6) for tuned in ("full_ft", "task_vector")]  # fmt: skip
    a = SimpleNamespace(fits=[], scaling=[], crossovers=found, compositions=[], unchanged=[], metric="score", x="params",
                        loaded=SimpleNamespace(ok=ok, frame=ok.iloc[:0]), bootstrap=200, axes=SimpleNamespace(best=None))  # fmt: skip
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert ("8 of the 12 crossover outcomes are firm (95% of the resamples agreeing, neither the measured means nor a law that "
            "cannot follow its cells disputing them; 3 of them repeat another through a method that scored as another to the "
            "bit there: task_vector as full_ft on t m0; task_vector as full_ft on t m1; task_vector as full_ft on t m2)") in text, text
    # m0–m2's pairs once each; m3's two are two findings
    assert "full_ft and task_vector in 12 of the 24 cells both measured" in text, text
