"""The bootstrap redraws the test questions too: every cell of a task is scored on the same ones.

Redrawing seeds alone, cells that agree across seeds (a deterministic model, greedy decoding) give
intervals of zero width around whatever this test set happened to say; a test set drawn from the
task is what an interval has to cover.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_results import write_cells

import analysis
from analysis.bootstrap import percentile_interval, question_counts
from analysis.composition import QuestionNoise, composition_gains, question_noise
from analysis.curves import GroupJob, LawFit, fit_group, outcome_matrix
from analysis.efficiency import data_efficiency, redrawn_base_loss
from analysis.report import best_measured
from analysis.laws import POWER_D

BUDGETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
QUESTIONS = 40


def population_score(budget: np.ndarray) -> np.ndarray:
    """The task's true score: the share of all its questions solved at a budget (S∞ = 0.65)."""
    return 0.65 - 0.6 * np.asarray(budget, dtype=float) ** -0.4


def rows_on_one_test_set(rng: np.random.Generator, *, outcomes: bool) -> pd.DataFrame:
    """Two seeds per budget that agree: a question is solved once the budget's score passes its difficulty,
    drawn uniform, so each cell's score is this test set's estimate of `population_score`."""
    difficulty = rng.random(QUESTIONS)
    rows = []
    for budget in BUDGETS:
        solved = difficulty < population_score(budget)
        for seed in (0, 1):
            rows.append({"status": "ok", "task": "t", "method": "lora", "model": "m", "budget": budget, "seed": seed,
                         "params_nonembed": 1e6, "score": solved.mean(), "score_outcomes": list(solved) if outcomes else None})  # fmt: skip
    return pd.DataFrame(rows)


def fitted(rows: pd.DataFrame, seed: int) -> LawFit:
    return fit_group(GroupJob("t", "lora", "m", POWER_D, rows, "score", None, 200, seed))


def asymptote_interval(rows: pd.DataFrame, seed: int) -> tuple[float, float]:
    return percentile_interval(fitted(rows, seed).asymptote_samples())


def test_every_curve_of_a_task_gets_the_same_question_draws() -> None:
    """One draw per resample for the whole task: methods compared resample by resample stay paired."""
    draws = question_counts("facts", QUESTIONS, 50, seed=3)
    assert np.array_equal(draws, question_counts("facts", QUESTIONS, 50, seed=3))
    assert (draws.sum(axis=1) == QUESTIONS).all() and draws.max() > 1  # with replacement
    assert not np.array_equal(draws, question_counts("arith", QUESTIONS, 50, seed=3))


def test_redrawn_questions_give_seeds_that_agree_an_interval_that_covers_the_task() -> None:
    """20 test sets of 40 questions: S∞'s 95 % interval covers the task's 0.65 for most of them when the
    questions are redrawn; from the seeds alone it has zero width and covers it by luck only."""
    rng = np.random.default_rng(0)
    covered = {True: 0, False: 0}
    widths = []
    for rep in range(20):
        with_outcomes = rows_on_one_test_set(rng, outcomes=True)
        for redraw in (True, False):
            rows = with_outcomes if redraw else with_outcomes.assign(score_outcomes=None)
            lo, hi = asymptote_interval(rows, rep)
            covered[redraw] += lo <= 0.65 <= hi
            if redraw:
                widths.append(hi - lo)
            else:
                assert hi - lo < 1e-6
    assert covered[True] >= 16 and covered[False] <= 4, covered
    # about 2 × 1.96 binomial sds of a score near .6 on 40 questions (0.3), more where S∞ is extrapolated
    assert 0.1 < np.median(widths) < 0.6


def test_rows_without_every_outcome_or_with_different_test_sizes_are_not_redrawn() -> None:
    rows = rows_on_one_test_set(np.random.default_rng(1), outcomes=True)
    assert outcome_matrix(rows, "score").shape == (len(rows), QUESTIONS)
    assert outcome_matrix(rows, "nll") is None  # a metric with no outcomes behind it
    assert outcome_matrix(rows.assign(score_outcomes=[None] + list(rows["score_outcomes"][1:])), "score") is None
    shorter = list(rows["score_outcomes"])
    shorter[0] = shorter[0][:-1]
    assert outcome_matrix(rows.assign(score_outcomes=shorter), "score") is None
    assert np.allclose(outcome_matrix(rows, "score").mean(axis=1), rows["score"])
    with_a_null = list(rows["score_outcomes"])
    with_a_null[0] = [None, *with_a_null[0][1:]]
    assert outcome_matrix(rows.assign(score_outcomes=with_a_null), "score") is None


def test_the_report_states_the_questions_noise_only_where_it_could_not_redraw_them(tmp_path) -> None:
    """Rows with every outcome: the intervals carry the questions' noise, and no caveat is printed for them."""
    rows = rows_on_one_test_set(np.random.default_rng(2), outcomes=True)
    rows = rows.assign(cell_id=[f"c{i}" for i in range(len(rows))], slug=lambda f: f["cell_id"], sweep="s", schema_version=3)
    write_cells(tmp_path, rows.to_dict("records"))
    analysis.write_report(str(tmp_path), bootstrap=20)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "redraws the task's test questions" in markdown and "questions, ±" not in markdown


def test_the_report_names_test_sets_of_two_sizes_as_the_reason_it_could_not_redraw_them(tmp_path) -> None:
    """Rows of a rerun at another eval.test_size beside the earlier ones: every row stores its outcomes, so
    "rows from before schema 3 … about 60 questions … rerun to store the outcomes" was wrong on every count."""
    rows = rows_on_one_test_set(np.random.default_rng(2), outcomes=True)
    shorter = [o[:20] for o in rows["score_outcomes"][:4]]
    rows["score_outcomes"] = shorter + list(rows["score_outcomes"][4:])
    rows.loc[:3, "score"] = [np.mean(o) for o in shorter]
    rows = rows.assign(cell_id=[f"c{i}" for i in range(len(rows))], slug=lambda f: f["cell_id"], sweep="s", schema_version=3)
    write_cells(tmp_path, rows.to_dict("records"))
    summary = analysis.write_report(str(tmp_path), bootstrap=20)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "mix rows scored on test sets of different sizes" in markdown and "`t` (1 of its 1 fits; 20 and 40 questions)" in markdown
    assert "before schema 3" not in markdown
    # `fit` says it too: its header said the resamples redraw questions, and nothing said they had not (helper-179)
    text = summary.to_text()
    assert "\n  Some fits mix rows scored on test sets of different sizes" in text and "redraw seeds and questions" not in text


def test_the_base_level_of_data_efficiency_moves_with_the_redrawn_questions() -> None:
    """D_x measures the gain over the base model, scored on the same questions: each resample's base level is the
    base cells' score on that resample's redrawn questions, not the one measured on these."""
    rng = np.random.default_rng(3)
    rows = rows_on_one_test_set(rng, outcomes=True)
    base_solved = rows["score_outcomes"].iloc[0]  # the base model solves what the smallest budget does
    base = rows.iloc[:2].assign(method="base", budget=0, score=np.mean(base_solved))
    ok = pd.concat([rows, base], ignore_index=True)
    curve = fitted(rows, seed=5)
    assert curve.boot.questions == QUESTIONS and fitted(rows.assign(score_outcomes=None), seed=5).boot.questions == 0
    assert curve.record()["n_questions_redrawn"] == QUESTIONS  # fits.parquet says which fits redrew them
    by_hand = 1 - question_counts("t", QUESTIONS, 200, 5) @ np.asarray(base_solved, dtype=float) / QUESTIONS
    assert np.allclose(redrawn_base_loss(ok, curve), by_hand) and by_hand.std() > 0.02
    (redrawn,) = data_efficiency([curve], ok, fractions=(0.5,))
    (fixed,) = data_efficiency([curve], ok.assign(score_outcomes=lambda f: [None if m == "base" else o for m, o in zip(f["method"], f["score_outcomes"])]), fractions=(0.5,))
    assert redrawn.examples == fixed.examples  # the point estimate uses the measured base level
    assert (redrawn.examples_lo, redrawn.examples_hi) != (fixed.examples_lo, fixed.examples_hi)


def test_a_difference_of_two_methods_on_the_same_questions_gets_their_paired_variance() -> None:
    """Both sides answered the same 40 questions: the variance of the difference of their means over question draws
    is that of the per-question difference over 40 — a question both solve (or both miss) adds nothing — less the
    seeds' disagreement on each question, which Welch's seed term already counts."""
    rng = np.random.default_rng(4)
    solved = (rng.random(QUESTIONS) < 0.6).astype(float)
    a = np.stack([solved, solved])  # two seeds that answer alike
    b = a.copy()
    b[:, :6] = 1 - b[:, :6]  # the sides differ on 6 questions only
    noise = question_noise(a, b)
    per_question = a.mean(axis=0) - b.mean(axis=0)
    assert noise.questions == QUESTIONS and noise.variance == pytest.approx(per_question.var(ddof=1) / QUESTIONS)
    assert noise.variance < question_noise(a, 1 - a).variance  # disagreeing on every question: far noisier
    assert question_noise(a, None) == QuestionNoise() and question_noise(a, b[:, :-1]) == QuestionNoise()
    noisy = (rng.random((3, QUESTIONS)) < 0.6).astype(float)  # seeds that disagree on single questions
    seeds = noisy.var(axis=0, ddof=1).mean() / 3 + b.var(axis=0, ddof=1).mean() / 2
    expected = max((noisy.mean(axis=0) - b.mean(axis=0)).var(ddof=1) - seeds, 0) / QUESTIONS
    assert question_noise(noisy, b).variance == pytest.approx(expected) and seeds > 0


def test_a_composition_whose_seeds_agree_gets_an_interval_from_the_questions(tmp_path) -> None:
    """Seeds that score alike said nothing about the noise, and the gain had no interval; the questions the
    composition and its part answered differently do, and its interval is Welch's t over them."""
    rng = np.random.default_rng(5)
    part = rng.random(QUESTIONS) < 0.5
    composition = part.copy()
    composition[:8] = True  # solves 8 more of the first questions, where the part missed some
    rows = [{"task": "t", "model": "m", "budget": 64, "method": method, "seed": seed, "status": "ok", "score": solved.mean(),
             "score_outcomes": list(solved)} for method, solved in (("steer_mean", part), ("lora", part), ("steer_mean+lora", composition))
            for seed in (0, 1)]  # fmt: skip
    frame = pd.DataFrame(rows)
    (gain,) = composition_gains(frame, metric="score")
    assert gain.note == "" and gain.gain_lo < gain.gain < gain.gain_hi
    (without,) = composition_gains(frame.assign(score_outcomes=None), metric="score")
    assert np.isnan(without.gain_lo) and "all scored the same" in without.note


def test_the_best_methods_lead_counts_the_questions_too() -> None:
    """Two seeds a side that score alike: from the seeds alone the lead had no interval; the questions give it one."""
    rng = np.random.default_rng(6)
    runner_up = rng.random(QUESTIONS) < 0.4
    best = runner_up.copy()
    best[:10] = True
    rows = pd.DataFrame([{"task": "t", "model": "m", "budget": 64, "method": method, "seed": seed, "status": "ok",
                          "params_nonembed": 1e6, "score": solved.mean(), "score_outcomes": list(solved)}
                         for method, solved in (("lora", best), ("steer_mean", runner_up)) for seed in (0, 1)])  # fmt: skip
    sentence = best_measured("t", rows, "score")
    assert "lora measured best" in sentence and "Welch interval over their cells and questions" in sentence, sentence
    assert "no interval" in best_measured("t", rows.assign(score_outcomes=None), "score")


def test_seeds_tied_by_chance_get_no_interval_from_the_questions_alone() -> None:
    """Two seeds a side with equal scores but different answers: their noise is unknown, not 0, so the questions
    alone (df 39) would give too narrow an interval; the gain stays without one, as before."""
    rng = np.random.default_rng(7)
    first = rng.random(QUESTIONS) < 0.5
    better = first.copy()
    better[:8] = True
    part, composition = (np.stack([v, np.roll(v, 1)]) for v in (first, better))  # each side's seeds: one score, other questions
    rows = pd.DataFrame([{"task": "t", "model": "m", "budget": 64, "method": method, "seed": seed, "status": "ok",
                          "score": solved[seed].mean(), "score_outcomes": list(solved[seed])}
                         for method, solved in (("steer_mean", part), ("lora", part), ("steer_mean+lora", composition)) for seed in (0, 1)])  # fmt: skip
    assert rows.groupby("method")["score"].nunique().max() == 1  # every side's seeds tie
    (gain,) = composition_gains(rows, metric="score")
    assert np.isnan(gain.gain_lo) and "all scored the same" in gain.note
