"""The report is written for rich results and for degenerate ones, saying what it cannot fit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.composition import CompositionGain, composition_gains
from analysis.efficiency import DataEfficiency
from analysis.report import Paragraph, _examples_needed, _findings, _selectivity, best_measured, composition_finding, composition_gain
from analysis.synthetic import TrueCurve, synthetic_rows
from interrupts import interrupt_as_workers_start
from test_analysis_results import BUDGETS, STEER, TUNE, build_results, write_cells


def test_report_on_a_full_grid(tmp_path: Path) -> None:
    build_results(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    (out / "crossover_gone.png").write_bytes(b"an earlier report's plot of a task no longer stored")
    (out / "mine.png").write_bytes(b"the user's own file")
    page = analysis.write_report(str(tmp_path), bootstrap=50).report_page
    assert page == out / "report.html"
    assert not (out / "crossover_gone.png").exists() and (out / "mine.png").exists()
    pngs = sorted(p.name for p in out.glob("*.png") if p.name != "mine.png")
    assert {"budget_facts.png", "crossover_facts.png", "frontier_facts.png", "selectivity_facts.png"} <= set(pngs)
    html = page.read_text()
    assert html.count("data:image/png;base64,") == len(pngs)  # self-contained
    assert not re.search(r"<img src='(?!data:)", html)
    markdown = (out / "report.md").read_text()
    table = markdown.split("| task | steering → fine-tuning | m1 | m2 | m3 |", 1)[1].split("\n\n", 1)[0]  # models smallest first
    assert re.search(r"\| facts \| steer_mean → lora \| [0-9.]+ \[[0-9.]+, [0-9.]+\] \([0-9]+%\) \|", table), table  # lora catches up: a D* with its CI
    assert "| never | steer_mean → lora | steering ahead (100%) |  |  |" in table, table  # never on m1 only: m2, m3 blank
    assert "truncated.parquet" in markdown
    # the truth: at D=2048 on m3 lora scores .91, steer_mean .76; on `never` (m1 only) lora never catches up
    assert "On facts, on the largest model measured (m3), lora measured best at the largest budget all its methods share (D=2048): score 0.9" in markdown
    assert "On never, on the largest model measured (m1), steer_mean measured best" in markdown
    # selectivity at the largest budget on the largest model: lora's .906 over the base model's .2
    assert re.search(r"\| facts \| m3 \| lora \| 2048 \| 0\.(69|70|71)\d* \|", markdown), markdown.split("## Selectivity")[1][:800]


def test_the_report_says_the_seed_intervals_leave_out_the_test_questions_own_noise(tmp_path: Path) -> None:
    """Rows without their questions' outcomes, scores in steps of 1/40: measured on 40 questions, whose binomial sd
    the report gives, as redrawing seeds (all scored on those questions) cannot carry it; a continuous metric gets
    no such paragraph (tests/test_question_bootstrap.py: rows with outcomes get their questions redrawn)."""
    rows = synthetic_rows({("facts", "steer_mean", "m1"): STEER, ("facts", "lora", "m1"): TUNE}, {"m1": 1_000_000}, BUDGETS,
                          seeds=2, noise=0.01, rng=np.random.default_rng(0))  # fmt: skip
    write_cells(tmp_path, [dict(row, score=round(row["score"] * 40) / 40) for row in rows])
    analysis.write_report(str(tmp_path), bootstrap=20)
    markdown = (tmp_path / "report" / "report.md").read_text()
    mean = np.mean([round(row["score"] * 40) / 40 for row in rows])
    assert f"`facts` (2 of its 2 fits) about 40 questions, ±{np.sqrt(mean * (1 - mean) / 40):.2g} sd at its mean score" in markdown
    analysis.write_report(str(tmp_path), bootstrap=20, metric="nll")
    nll_report = (tmp_path / "report-nll" / "report.md").read_text()
    assert "about 40 questions" not in nll_report and "every NLL interval redraws seeds only" in nll_report
    assert "about 40 questions" in (tmp_path / "report" / "report.md").read_text()  # the score's report is kept


def test_the_report_saves_the_fits_it_reports(tmp_path: Path) -> None:
    """One analysis serves both: `steerscale report` writes the same fits `steerscale fit` would."""
    build_results(tmp_path)
    reported = analysis.write_report(str(tmp_path), bootstrap=20, seed=3)
    written = json.loads((tmp_path / "fits.json").read_text())
    fitted = analysis.fit_results(str(tmp_path), bootstrap=20, seed=3)
    assert written == json.loads((tmp_path / "fits.json").read_text())
    assert set(reported.paths) == {"fits.parquet", "crossovers.parquet", "fits.json", "measured.csv", "report.html"}
    assert set(fitted.paths) == {"fits.parquet", "crossovers.parquet", "fits.json"}
    assert reported.to_text().splitlines()[:-5] == fitted.to_text().splitlines()[:-3]  # the same table, then what each wrote


def test_the_report_writes_every_measured_point_and_tables_the_largest_models(tmp_path: Path) -> None:
    """What the fits were fitted to, per (task, model, method, budget), without reading the cells back: a failed row and
    a NaN score are left out as the fits leave them out; the largest model's means are in the report, base in its title."""
    build_results(tmp_path)
    analysis.write_report(str(tmp_path), bootstrap=0)
    points = pd.read_csv(tmp_path / "report" / "measured.csv")
    cells = analysis.load_results(str(tmp_path)).frame
    lora = cells[(cells["task"] == "facts") & (cells["model"] == "m1") & (cells["method"] == "lora") & (cells["budget"] == BUDGETS[0])]
    lora = lora[(lora["status"] == "ok") & np.isfinite(lora["score"].astype(float))]["score"].astype(float)
    (point,) = points[(points["task"] == "facts") & (points["model"] == "m1") & (points["method"] == "lora") & (points["budget"] == BUDGETS[0])].itertuples()
    assert point.cells == 3 == len(lora) and point.mean == pytest.approx(lora.mean()) and point.sd == pytest.approx(lora.std())
    assert (point.min, point.max) == (lora.min(), lora.max())
    assert list(points.drop_duplicates("model")["model"]) == ["m1", "m2", "m3"]  # smallest first
    assert len(points) == 3 * 2 * len(BUDGETS) + 2 * len(BUDGETS) + 3  # facts: 3 models x 2 methods; never: m1; base on each
    markdown = (tmp_path / "report" / "report.md").read_text()
    section = markdown.split("## Measured", 1)[1].split("\n## ", 1)[0]
    assert "facts, on m3, base 0.2:" in section and "never, on m1:" in section and "| D=0 |" not in section
    m3 = points[(points["task"] == "facts") & (points["model"] == "m3") & (points["method"] == "lora")]
    assert "| lora | " + " | ".join(f"{v:.3g}" for v in m3["mean"]) + " |" in section, section


@pytest.mark.parametrize("case", ["one_model_few_budgets", "only_failed", "empty"])
def test_report_on_degenerate_results(tmp_path: Path, case: str) -> None:
    rows = synthetic_rows({("t", "steer_mean", "m1"): TrueCurve(0.3, 0.5, 0.4)}, {"m1": 10**6}, (8, 64), seeds=2, noise=0.01, rng=np.random.default_rng(0))
    if case == "only_failed":
        rows = [dict(r, status="failed", score=None, error="boom") for r in rows]
    if case != "empty":
        write_cells(tmp_path, rows)
    else:
        (tmp_path / "plan.json").write_text("[]")  # a sweep just started: its plan written, no row yet
    markdown = analysis.write_report(str(tmp_path), bootstrap=20).report_page.with_name("report.md").read_text()
    assert "## Fits" in markdown
    if case == "one_model_few_budgets":
        assert "needs at least 4 distinct budgets, got 2" in markdown
    assert "No crossover could be computed" in markdown


@pytest.mark.parametrize("gain, lo, hi, words", [
    (-0.135, -0.15, -0.12, "worse than lora alone by 0.135 [0.12, 0.15]"),
    (0.05, 0.02, 0.08, "better than lora alone by 0.05 [0.02, 0.08]"),
])  # fmt: skip
def test_a_composition_finding_states_its_margin_as_a_size(gain, lo, hi, words) -> None:
    finding = composition_finding(CompositionGain("arith", "ladder:s", 32.0, "steer_mean+lora", "lora", gain, lo, hi, 6, 3, 0.001), 4)
    assert finding.startswith(f"arith, ladder:s, D=32: steer_mean+lora is {words} (p = 0.001, significant after Holm's correction over the 4 ")


def test_fits_at_a_bound_are_marked_and_their_asymptotes_not_offered_as_findings(tmp_path: Path) -> None:
    """A curve still falling where the data end fits E at the loss floor: its 'asymptote' is the metric's limit, not a finding."""
    truth = {("t", "lora", "m1"): TrueCurve(0.0, 0.8, 0.3), ("t", "steer_mean", "m1"): TrueCurve(0.3, 0.5, 0.5)}
    rows = synthetic_rows(truth, {"m1": 10**6}, (4, 16, 64, 256, 1024), seeds=3, noise=0.005, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows)
    summary = analysis.write_report(str(tmp_path), bootstrap=20)
    fits = {f.method: f for f in summary.analysis.fits if f.model == "m1"}
    assert fits["lora"].bound_notes() == ["E at the loss floor (asymptote = the metric's limit)"]
    assert fits["steer_mean"].bound_notes() == [] and fits["steer_mean"].note == ""
    capped = dataclasses.replace(fits["steer_mean"].fit, theta=fits["steer_mean"].fit.theta.copy())
    capped.theta[list(capped.law.coefs).index("B")] = 30.0  # B = e^30: its exponent can rise no further
    assert dataclasses.replace(fits["steer_mean"], fit=capped).bound_notes() == ["B at its upper bound (e^30; the exponent with it is capped)"]
    markdown = summary.report_page.with_name("report.md").read_text()
    assert "E at the loss floor" in markdown and "fits put a parameter at its bound" in markdown
    assert "fitted asymptote" not in markdown


def test_a_report_without_resamples_shows_point_estimates_only(tmp_path: Path) -> None:
    build_results(tmp_path)
    markdown = analysis.write_report(str(tmp_path), bootstrap=0).report_page.with_name("report.md").read_text()
    assert "No intervals (--bootstrap 0)." in markdown and "bootstrap intervals over cells" not in markdown
    table = markdown.split("| task | steering → fine-tuning |", 1)[1].split("\n\n", 1)[0]
    # a point estimate with nothing to say how sure it is: not offered as a finding
    assert re.search(r"\| facts \| steer_mean → lora \| [0-9.]+ \(no resamples: not a finding\) \|", table) and "nan" not in table, table


def test_the_report_goes_where_out_says_and_remote_results_need_it(tmp_path: Path, capsys) -> None:
    """The fits stay beside the cells; the plots and pages go to --out. For results on an object store
    the report used to end in a ValueError traceback."""
    from orchestrator.cli import main

    build_results(tmp_path / "r")
    assert main(["report", str(tmp_path / "r"), "--bootstrap", "0", "--workers", "1", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.html").is_file() and (tmp_path / "r" / "fits.json").is_file()
    assert not (tmp_path / "r" / "report").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "budget_mine.png").write_bytes(b"the user's own plot, in a directory that held no report")
    assert main(["report", str(tmp_path / "r"), "--bootstrap", "0", "--workers", "1", "--out", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "budget_mine.png").exists()
    capsys.readouterr()
    assert main(["report", "mock:///bucket/sweep", "--bootstrap", "0"]) == 2
    error = capsys.readouterr().err
    assert "mock:///bucket/sweep is not on a local disk" in error and "(--out DIR)" in error and "Traceback" not in error


def _efficiency(examples: float, lo: float, hi: float, share: float = 1.0) -> DataEfficiency:
    return DataEfficiency("t", "lora", "m", 1e6, 0.5, examples, lo, hi, share, smallest_budget=4.0, largest_budget=1024.0)


@pytest.mark.parametrize("examples, lo, hi, share, words, absent", [
    (0.068, 0.01, 3.0, 1.0, "< 4, the smallest budget measured: reached before the data start (extrapolated)", "0.068"),
    # below the data with an interval reaching into it and past it: the interval is kept (it was dropped)
    (0.5, 0.1, 2e5, 0.9, "< 4 [< 4, > 1.02e+05], the smallest budget measured: reached before the data start (extrapolated); D_x exists in 90%", "0.5"),
    (7.9e-182, 1e-200, 1e-150, 1.0, "< 4, the smallest budget measured", "e-182"),
    (float("nan"), 10.0, 50.0, 0.3, "none: the asymptote does not beat the base model; D_x exists in 30% of resamples", "["),
    (500.0, 2e5, 3e5, 1.0, "500 [> 1.02e+05]", "[2e+05"),  # the point below its own interval: no "[2e+05, > 1.02e+05]"
    (2000.0, 1.0, 2e5, 0.62, "2e+03 [< 4, > 1.02e+05] (extrapolated past the largest budget measured, 1024); D_x exists in 62% of resamples", "nan"),
    # 199 of 200 resamples read "100%" (rounded), and 58 of 200 "28%" (floored in floats)
    (100.0, 50.0, 200.0, 0.995, "100 [50, 200]; D_x exists in 99% of resamples", "100%"),
    (100.0, 50.0, 200.0, 58 / 200, "100 [50, 200]; D_x exists in 29% of resamples", "28%"),
    (100.0, 50.0, 200.0, 1.0, "100 [50, 200]", "extrapolated"),
    (float("nan"), float("nan"), float("nan"), 0.0, "none: the asymptote does not beat the base model", "resamples"),
    # the point fit beats the base model but no resample does: said, and no "interval reaches past" of no interval
    (50.0, float("inf"), float("inf"), 0.0, "50; D_x exists in 0% of resamples", "reaches past"),
    # β ≈ 0.001: D_x overflows to inf, which is past the limit, not "does not beat the base model"
    (float("inf"), float("inf"), float("inf"), 1.0, "> 100× the largest budget measured (1024): not measurable here", "none"),
])  # fmt: skip
def test_examples_needed_outside_the_measured_budgets_is_marked(examples, lo, hi, share, words, absent) -> None:
    """Only a D_x inside [smallest, largest budget] is measured; below it the law's number (0.068, 1e-182)
    is not printed, a missing D_x shows no interval, and an interval is never printed inverted."""
    e = _efficiency(examples, lo, hi, share)
    text = _examples_needed(e)
    assert words in text and absent not in text, text
    assert e.extrapolated == (None if np.isnan(examples) else not 4 <= examples <= 1024)


def _composition_cells(seeds: int, spread: float) -> pd.DataFrame:
    """steer_mean+lora 0.01 below lora's 0.40 on average (and steer_mean far below), seeds `spread` apart."""
    scores = {"lora": 0.40, "steer_mean": 0.30, "steer_mean+lora": 0.39}
    offsets = spread * (np.arange(seeds) - (seeds - 1) / 2)
    return pd.DataFrame([{"task": "arith", "model": "s", "budget": 32, "method": m, "seed": i, "score": v + offsets[i]}
                         for m, v in scores.items() for i in range(seeds)])  # fmt: skip


def test_a_composition_gain_needs_two_seeds_a_side_and_some_spread_for_an_interval_or_a_finding() -> None:
    """Seeds that agree resampled to a zero-width interval ("worse by 0.01 [0.01, 0.01]"), which made a finding;
    with one seed there is no variance at all."""
    (one,) = composition_gains(_composition_cells(1, 0.0), metric="score")
    assert np.isnan([one.gain_lo, one.gain_hi, one.p_value]).all() and composition_gain(one) == "-0.01 (no interval: 1 seed(s) on a side, 2 needed)"
    (same,) = composition_gains(_composition_cells(3, 0.0), metric="score")
    assert np.isnan([same.gain_lo, same.gain_hi]).all() and "all scored the same" in composition_gain(same)
    (noisy,) = composition_gains(_composition_cells(3, 0.001), metric="score")
    assert noisy.gain_lo < -0.01 < noisy.gain_hi < 0 and composition_gain(noisy).startswith("-0.01 [")
    (unasked,) = composition_gains(_composition_cells(3, 0.001), metric="score", intervals=False)
    assert np.isnan(unasked.gain_lo) and composition_gain(unasked) == "-0.01"  # --bootstrap 0: no intervals anywhere, no note
    for gain, stated in ((same, False), (noisy, True)):
        a = SimpleNamespace(fits=[], scaling=[], crossovers=[], compositions=[gain], unchanged=[], metric="score", x="params", loaded=SimpleNamespace(ok=pd.DataFrame()), bootstrap=200, axes=SimpleNamespace(best=None))
        text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
        assert ("steer_mean+lora is worse than lora alone" in text) == stated, text
        assert ("composition gains have no interval" in text) != stated, text


def test_the_best_measured_method_is_judged_at_a_budget_every_compared_method_has() -> None:
    """lora measured to D=2048 scores .91 there, steer_mean measured to D=64 only .53, but at 64 steer_mean
    is ahead (.53 vs .48): comparing each at its own largest budget named lora. A method sharing no budget
    with the others is left out and named."""
    rng = np.random.default_rng(0)
    rows = synthetic_rows({("t", "lora", "m"): TUNE}, {"m": 10**6}, (8, 16, 32, 64, 256, 1024, 2048), seeds=2, noise=0.005, rng=rng)
    rows += synthetic_rows({("t", "steer_mean", "m"): STEER}, {"m": 10**6}, (8, 16, 32, 64), seeds=2, noise=0.005, rng=rng)
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "steer_mean measured best at the largest budget all its methods share (D=64): score 0.53" in sentence, sentence
    assert "(mean of 2 cells)" in sentence, sentence
    one_seed = best_measured("t", pd.DataFrame([r for r in rows if r["seed"] == 0]), "score")
    assert "(one cell)" in one_seed and "mean of 1" not in one_seed, one_seed
    assert "; then lora 0.48" in sentence, sentence
    assert "ahead of lora by 0.0" in sentence and "(clear of 0: 95 % Welch interval over their cells)" in sentence, sentence
    late = synthetic_rows({("t", "full_ft", "m"): TUNE}, {"m": 10**6}, (2048, 4096, 8192), seeds=2, noise=0.005, rng=rng)
    sentence = best_measured("t", pd.DataFrame(rows + late), "score")
    assert "at D=2048, the largest budget shared by 2 of its 3 methods (steer_mean not measured there)" in sentence, sentence


def test_the_best_measured_method_is_held_against_the_base_model() -> None:
    """The quickstart's facts on ladder:s: every method's mean was below the base model's 0.38, and the findings named a
    best method as if it had gained (helper-176); level with the base model is said too, and a gain says nothing."""
    def rows(steer: float, lora: float, base: float = 0.38) -> pd.DataFrame:
        return pd.DataFrame([{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method,
                              "seed": seed, "score": score + 0.01 * seed, "score_base": base}
                             for method, score in (("steer_mean", steer), ("lora", lora)) for seed in (0, 1)])  # fmt: skip

    below = best_measured("t", rows(0.29, 0.33), "score")
    assert below.endswith("then steer_mean 0.295. No method measured there did better than the base model: the best did worse "
                          "than it (score 0.38 on the same questions), so a method ahead there is one that hurt less."), below
    level = best_measured("t", rows(0.29, 0.375), "score")
    assert "the best did as well as, not better than it (score 0.38 on the same questions)" in level, level
    nll = pd.DataFrame([{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method,
                         "seed": seed, "nll": value + 0.01 * seed, "nll_base": 1.95} for method, value in (("steer_mean", 2.3), ("lora", 2.1))
                        for seed in (0, 1)])  # fmt: skip
    assert "the best did worse than it (nll 1.95 on the same questions)" in best_measured("t", nll, "nll")  # higher is worse
    assert "base model" not in best_measured("t", nll.assign(nll_base=2.5), "nll")
    elicited = rows(0.29, 0.33).rename(columns={"score": "score_elicited"})
    assert "base model" not in best_measured("t", elicited, "score_elicited")  # the prompted base model is no post-training
    gained = best_measured("t", rows(0.29, 0.45), "score")
    assert "base model" not in gained, gained
    assert "base model" not in best_measured("t", rows(0.29, 0.33).drop(columns="score_base"), "score")  # rows without it


def test_a_lead_whose_interval_spans_every_possible_difference_says_it_tells_nothing() -> None:
    """gridworld's xl: "ahead of full_ft by 0.14 [-1, 1]", a t interval on ~1 degree of freedom (full_ft's seeds 0.56 and
    0.88) cut to the scores' range, printed as if it were one (helper-176)."""
    from analysis.report import _lead

    best, runner_up = pd.DataFrame({"score": [0.86, 0.86], "seed": [0, 1]}), pd.DataFrame({"score": [0.56, 0.88], "seed": [0, 1]})
    assert _lead(best, runner_up, "full_ft", "score") == ("ahead of full_ft by 0.14 (no information: the 95 % Welch interval over "
                                                          "their cells, 2 and 2 cells, spans every difference a score can take)")  # fmt: skip
    close = pd.DataFrame({"score": [0.60, 0.62], "seed": [0, 1]})
    assert re.fullmatch(r"ahead of full_ft by 0\.25 \[0\.\d+, 0\.\d+\] \(clear of 0: .*\)", _lead(best, close, "full_ft", "score"))


def test_the_best_measured_model_is_not_called_the_largest_when_no_size_was_recorded() -> None:
    """Without params_nonembed the model compared is the last by name: "zeta-small" was called "the largest model
    measured" while "alpha-huge" may be far larger; where sizes are known it is the largest."""
    rows = [{"task": "t", "model": model, "status": "ok", "params_nonembed": np.nan, "budget": 64, "method": method, "seed": 0, "score": score}
            for model in ("alpha-huge", "zeta-small") for method, score in (("lora", 0.6), ("steer_mean", 0.5))]  # fmt: skip
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert sentence.startswith("On t, on the model zeta-small (sizes unknown: the last of 2 models by name), lora measured best"), sentence
    assert "largest" not in sentence.split(", lora")[0], sentence
    sized = best_measured("t", pd.DataFrame(rows).assign(params_nonembed=[2e9, 2e9, 1e8, 1e8]), "score")
    assert sized.startswith("On t, on the largest model measured (alpha-huge), lora measured best"), sized


def test_a_method_that_failed_on_the_largest_model_is_named_and_rounding_is_no_lead() -> None:
    """Every full_ft cell on the largest model failed (out of memory): it vanished from the headline, and steer_mean,
    alone there, "measured best". Equal means of k/n scores that differ in the last bit named a winner "ahead by 5.55e-17"."""
    rows = [{"task": "t", "model": model, "status": "ok" if (model, method) != ("big", "full_ft") else "failed", "params_nonembed": size,
             "budget": budget, "method": method, "seed": seed, "score": score + 0.01 * seed}
            for model, size in (("small", 1e6), ("big", 1e8)) for method, score in (("steer_mean", 0.6), ("full_ft", 0.8))
            for budget in (8, 32, 128) for seed in (0, 1)]  # fmt: skip
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "on the largest model measured (big), only steer_mean was measured (score 0.605 at D=128); full_ft: none of its 6 cells there is ok" in sentence, sentence
    assert "measured best" not in sentence, sentence
    apart = [r for r in rows if not (r["model"] == "big" and r["method"] == "steer_mean" and r["budget"] != 8)]
    apart += [{**r, "method": "lora", "budget": 16} for r in rows if r["model"] == "big" and r["method"] == "steer_mean" and r["budget"] == 8]
    sentence = best_measured("t", pd.DataFrame(apart), "score")
    assert "no two methods were measured at the same budget" in sentence and "full_ft: none of its 6 cells there is ok" in sentence, sentence
    scores = {"lora": (0.40, 0.42), "steer_mean": (0.41, 0.41), "prompt": (0.30, 0.32)}
    rows = [{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method, "seed": seed, "score": score}
            for method, pair in scores.items() for seed, score in enumerate(pair)]  # fmt: skip
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "lora and steer_mean measured best (tied)" in sentence and "e-17" not in sentence, sentence
    # a composition whose steering chose scale 0 on every seed: its tie with lora is lora's result, not a second method's
    rows = [{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method, "seed": seed,
             "score": 0.5 + 0.1 * seed, "nll": 1.0 - 0.1 * seed + (0.001 if (method, seed) == ("steer_mean+lora", 2) else 0.0)}
            for method in ("lora", "steer_mean+lora") for seed in (0, 1, 2)]  # fmt: skip
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "lora and steer_mean+lora measured best (tied; steer_mean+lora scored as lora, to the bit, in 2 of 3 cells on the same seeds)" in sentence, sentence
    # seeds lora did not run are no cells "on the same seeds": counted, they made it "2 of 5"
    rows += [{**rows[-1], "seed": seed, "score": score, "nll": 0.5} for seed, score in ((3, 0.5), (4, 0.7))]
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "(tied; steer_mean+lora scored as lora, to the bit, in 2 of 3 cells on the same seeds)" in sentence, sentence


def test_the_adaptive_log_of_a_run_resumed_after_its_stop_has_not_stopped_and_shows_its_latest_targets() -> None:
    """A run that stopped, then was resumed (a raised budget) and is running or interrupted: the report said "It stopped
    after round 1" beside round 2's choices. A NaN interval end logged as null broke the report's table."""
    from analysis.decisions import parse_decisions
    from analysis.report import _num

    def targets(width: float | None) -> list[dict]:
        return [{"target": "t/m steer_mean->lora", "unit": "log10 D*", "lo": 1.0, "hi": None if width is None else 1.0 + width, "width": width}]

    events = [{"event": "round", "round": 0, "targets": targets(0.9)}, {"event": "choice", "round": 0},
              {"event": "stop", "round": 1, "targets": targets(0.8)}, {"event": "resume", "round": 2},
              {"event": "round", "round": 2, "targets": targets(None)}, {"event": "choice", "round": 2}]  # fmt: skip
    log = parse_decisions("\n".join(json.dumps(e) for e in events))
    assert not log.stopped and log.final_targets[0]["width"] is None
    assert _num(log.final_targets[0]["hi"]) == "-"
    finished = parse_decisions("\n".join(json.dumps(e) for e in events[:3]))
    assert finished.stopped and finished.final_targets[0]["width"] == 0.8


def test_the_adaptive_plot_follows_the_wider_of_the_two_widths_the_stop_holds_to_its_goal() -> None:
    """The plot drew the stored width alone: a target open on fresh noise sat under its goal line, looking done."""
    from analysis.decisions import parse_decisions

    def round_(i: int, width: float, fresh: float | None) -> dict:
        target = {"target": "t/m steer_mean->lora", "unit": "log10 D*", "width": width, **({} if fresh is None else {"fresh_width": fresh})}
        return {"event": "round", "round": i, "flops_spent": 10.0 * (i + 1), "targets": [target]}

    log = parse_decisions("\n".join(json.dumps(e) for e in [round_(0, 0.1, 0.5), round_(1, 0.4, 0.2), round_(2, 0.3, None)]))
    assert log.width_history() == {("t/m steer_mean->lora", "log10 D*"): [(10.0, 0.5), (20.0, 0.4), (30.0, 0.3)]}
    # a stopped run rerun logs another round on the same rows (helper-134 #5): one point there, the latest round's
    rerun = [round_(0, 0.1, 0.5), round_(1, 0.4, 0.2), {"event": "stop", "round": 1}, {"event": "resume", "round": 2},
             {**round_(1, 0.35, None), "round": 2}]  # fmt: skip
    log = parse_decisions("\n".join(json.dumps(e) for e in rerun))
    assert log.width_history() == {("t/m steer_mean->lora", "log10 D*"): [(10.0, 0.5), (20.0, 0.35)]}


def test_a_lead_the_seeds_cannot_resolve_is_said_to_be_within_noise() -> None:
    """Two methods .01 apart on means of 2 cells that scatter by .1: an order the report must not state as a finding."""
    rows = [{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method, "seed": seed, "score": score}
            for method, scores in (("lora", (0.45, 0.57)), ("steer_mean", (0.40, 0.60))) for seed, score in enumerate(scores)]
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "lora measured best" in sentence and "ahead of steer_mean by 0.01 [" in sentence, sentence
    assert "(within noise: 95 % Welch interval over their cells)" in sentence, sentence
    one = best_measured("t", pd.DataFrame([r for r in rows if r["seed"] == 0]), "score")
    assert "ahead of steer_mean by 0.05 (one cell on a side: no interval)" in one, one


def test_the_best_measured_method_counts_methods_whose_curve_did_not_fit(tmp_path: Path) -> None:
    """full_ft measured at two budgets (too few for a curve) scores .98 at D=256, ahead of lora and steer_mean
    there; comparing the fitted curves' points only left it out and named lora."""
    rng = np.random.default_rng(0)
    truth = {("t", "lora", "m"): TUNE, ("t", "steer_mean", "m"): STEER}
    rows = synthetic_rows(truth, {"m": 10**6}, (8, 32, 256), seeds=2, noise=0.005, rng=rng)
    rows += synthetic_rows({("t", "full_ft", "m"): TrueCurve(0.02, 0.1, 0.5)}, {"m": 10**6}, (32, 256), seeds=2, noise=0.005, rng=rng)
    write_cells(tmp_path, rows)
    a = analysis.fit_results(str(tmp_path), bootstrap=0).analysis
    assert not next(f for f in a.fits if (f.method, f.model) == ("full_ft", "m")).ok
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert "On t, on the largest model measured (m), full_ft measured best at the largest budget all its methods share (D=256): score 0.97" in text, text


def test_a_table_cell_with_a_pipe_or_a_line_break_stays_one_cell():
    """An error message in a cell (`a | b`, a traceback's lines) must not split the row of report.md."""
    from analysis.report import Table, render_markdown

    text = render_markdown([Table(("model", "note"), [("m1", "all 2 cells failed (first error: x | y\nmore)")])])
    row = next(line for line in text.splitlines() if line.startswith("| m1"))
    assert row == "| m1 | all 2 cells failed (first error: x \\| y more) |"


def test_the_page_shows_code_spans_as_code_and_escapes_the_rest():
    """report.html showed the markdown's backticks around commands; text inside and outside them stays escaped."""
    from analysis.report import Paragraph, Table, render_html

    page = render_html([Paragraph("rerun with `steerscale fit --bootstrap 1000` if a < b"), Table(("note",), [("`<x>` & `y`",)])])
    assert "rerun with <code>steerscale fit --bootstrap 1000</code> if a &lt; b" in page
    assert "<td><code>&lt;x&gt;</code> &amp; <code>y</code></td>" in page
    assert "`" not in page
    # a stray or doubled backtick (an error message in a table cell) opens no span across the text
    page = render_html([Paragraph("``y`` and a ` stray"), Paragraph("a ` stray and `code`")])
    assert "<code>" not in page and "``y`` and a ` stray" in page and "a ` stray and `code`" in page


def test_a_legend_is_a_list_on_both_pages():
    """The crossover table's legend was one 2,000-character paragraph; its terms are items of a list, a line each."""
    from analysis.report import Bullets, Paragraph, render_html, render_markdown

    blocks = [Paragraph("D* per pair:"), Bullets(("`tied`: within half a question", "a < b"))]
    assert render_markdown(blocks).endswith("D* per pair:\n\n- `tied`: within half a question\n- a < b\n")
    assert "<ul><li><code>tied</code>: within half a question</li><li>a &lt; b</li></ul>" in render_html(blocks)


def test_rows_left_out_of_a_curve_are_counted_in_its_row_budget_zero_included(tmp_path: Path) -> None:
    """lora measured at D=0 too (the model before post-training): 2 of its 10 rows have no place on a log-budget
    axis. The table said n 8 and left out 0/0/0, so 2 rows went missing without a word."""
    rows = synthetic_rows({("t", "lora", "m"): TUNE}, {"m": 10**6}, (8, 16, 32, 64), seeds=2, noise=0.01, rng=np.random.default_rng(0))
    rows += [dict(r, budget=0, cell_id=f"{r['cell_id']}-d0") for r in rows if r["budget"] == 8]
    write_cells(tmp_path, rows)
    summary = analysis.write_report(str(tmp_path), bootstrap=0)
    (line,) = [ln for ln in summary.report_page.with_name("report.md").read_text().splitlines() if "| power_D |" in ln]
    assert "| 8 | 0/0/0/2 |" in line, line
    (text,) = [ln for ln in summary.to_text().splitlines() if " power_D " in ln]
    assert re.search(r"\b8\s+0\s+0\s+0\s+2\b", text), text


def test_ctrl_c_during_a_report_prints_one_line_and_leaves_no_worker(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's foreground group: the fit workers, still importing
    (matplotlib, scipy: seconds), each printed a KeyboardInterrupt traceback under the report's line."""
    build_results(tmp_path)
    code, err, survivors = interrupt_as_workers_start(["report", str(tmp_path), "--bootstrap", "2000", "--workers", "2"], workers=2)
    assert code == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err[-3000:]
    assert not survivors


def test_a_lead_between_scores_has_an_interval_inside_the_differences_scores_can_take() -> None:
    """Two seeds a side that disagree widely (.57 and .87) give Welch ~1 degree of freedom, t ≈ 12.7: the lead's
    interval read "0.14 [-1.86, 2.14]" on scores in [0, 1]; a composition's gain likewise (cut to [-1, 1]; the lead, cut so,
    says it tells nothing)."""
    rows = [{"task": "t", "model": "m", "status": "ok", "params_nonembed": 1e6, "budget": 64, "method": method, "seed": seed, "score": score}
            for method, scores in (("lora", (0.85, 0.87)), ("full_ft", (0.57, 0.87)), ("steer_mean", (0.2, 0.9)), ("steer_mean+lora", (0.1, 0.95)))
            for seed, score in enumerate(scores)]  # fmt: skip
    sentence = best_measured("t", pd.DataFrame(rows), "score")
    assert "ahead of full_ft by 0.14 (no information: the 95 % Welch interval over their cells, 2 and 2 cells, spans every" in sentence, sentence
    (gain,) = composition_gains(pd.DataFrame(rows), metric="score")
    assert (gain.gain_lo, gain.gain_hi) == (-1.0, 1.0) and gain.p_value > 0.05
    assert composition_gain(gain).endswith(" [-1, 1] (no information: every difference a score can take)")
    assert "no information" not in composition_gain(gain, "nll")  # an NLL's differences have no such bound


@pytest.mark.parametrize("methods, said", [(("lora", "prompt"), "prompt"), (("lora", "prompt+lora"), "prompt+lora"), (("lora", "steer_mean"), "")])
def test_the_selectivity_table_says_a_prompt_methods_neutral_kl_is_its_contexts(methods: tuple[str, ...], said: str) -> None:
    """Few-shot `prompt` changes no weight: its neutral text follows its demonstrations, and on the offline ladder
    (pretrained on single documents) that read as a median KL of 1.7 nats a token over session 39's quickstart cells
    (4.7 on xl), beside LoRA's 0.006. The table
    must not leave that number to read as the method's selectivity; a table without such a method says nothing of it."""
    points = pd.DataFrame([{"task": "facts", "model": "m", "method": method, "budget": 64, "gain": 0.1, "gap_closed": 0.5,
                            "neutral_kl": kl, "offtask_score_delta": 0.0} for method, kl in zip(methods, (0.2, 7.5))])  # fmt: skip
    ok = pd.DataFrame({"model": ["m"], "params_nonembed": [1e6]})
    blocks = _selectivity(SimpleNamespace(selectivity=points, loaded=SimpleNamespace(ok=ok)))
    caveats = [b.text for b in blocks if isinstance(b, Paragraph) and "read after the demonstrations" in b.text]
    assert bool(caveats) == bool(said), [type(b).__name__ for b in blocks]
    if said:  # a composition with prompt reads its neutral text after them too
        assert caveats[0].startswith(f"{said}: the neutral text is read after the demonstrations"), caveats


def test_the_overview_is_short_and_how_intervals_are_drawn_comes_before_the_plots(tmp_path: Path) -> None:
    """The overview's first paragraph was 1,600 characters on how the bootstrap draws: a reader's first sight."""
    rows = synthetic_rows({("facts", "steer_mean", "m1"): STEER, ("facts", "lora", "m1"): TUNE}, {"m1": 1_000_000}, BUDGETS,
                          seeds=2, noise=0.01, rng=np.random.default_rng(0))  # fmt: skip
    write_cells(tmp_path, rows)
    analysis.write_report(str(tmp_path), bootstrap=20, seed=0)
    page = (tmp_path / "report" / "report.md").read_text()
    overview = page.split("## Overview\n\n")[1].split("\n\n")[0]
    assert len(overview) < 400 and 'under "How the intervals are drawn", before the plots' in overview, overview
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings[-2:] == ["## How the intervals are drawn", "## Plots"], headings
    assert "√(n/(n − 1))" in page.split("## How the intervals are drawn")[1]
    analysis.write_report(str(tmp_path), bootstrap=0, seed=0)
    assert "## How the intervals are drawn" not in (tmp_path / "report" / "report.md").read_text()  # none drawn
