"""A method that chose to do nothing is named: its curve is the base model's, and "steering stays ahead" there
means the fine-tuning fell short of doing nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import analysis
from analysis.unchanged import Unchanged, unchanged_cells, unchanged_share
from test_analysis_results import write_cells


def _row(method: str, model: str, budget: int, seed: int, nll: float, score: float) -> dict:
    cell = f"{model}__t__{method}__n{budget}__s{seed}"
    return {"schema_version": 3, "sweep": "s", "cell_id": cell, "slug": cell, "status": "ok", "model": model, "params_nonembed": 1e6,
            "params_total": 2e6, "task": "t", "task_type": "classification", "method": method, "budget": budget, "seed": seed,
            "score": score, "score_base": 0.225, "nll": nll, "nll_base": 1.953798, "post_train_flops": 1e9 * budget}  # fmt: skip


def test_the_models_a_method_left_as_they_were_are_named() -> None:
    """Cells whose test NLL is the base model's to the bit (validation chose scale 0, no step, no demonstrations)."""
    rows = [_row("steer_mean", "s", b, 0, 1.953798 if b < 64 else 1.9, 0.3) for b in (4, 16, 32, 64)]  # 3 of 4 did nothing
    rows += [_row("steer_mean", "l", b, 0, 1.953798 if b == 4 else 1.8, 0.4) for b in (4, 16, 32, 64)]  # 1 of 4: not mostly
    rows += [_row("lora", "s", b, 0, 1.953798 + 1e-12, 0.2) for b in (4, 16)]  # a hair off is a change
    rows += [_row("base", "s", 0, 0, 1.953798, 0.225)]  # never changes it: not news
    (found,) = unchanged_cells(pd.DataFrame(rows))
    assert found == Unchanged("t", "steer_mean", (("s", 3, 4),))
    assert found.where() == "3 of 4 cells on s"


def test_how_many_cells_each_method_left_as_they_were_is_counted_over_every_model() -> None:
    """The demo's steer_mean, full_ft and task_vector did nothing in 67–68 of their 120 cells each; the report named
    only the (task, model) pairs where that was half or more, and no total (helper-143)."""
    rows = [_row("steer_mean", "s", b, 0, 1.953798 if b < 64 else 1.9, 0.3) for b in (4, 16, 32, 64)]  # 3 of 4
    rows += [_row("steer_mean", "l", b, 0, 1.953798 if b == 4 else 1.8, 0.4) for b in (4, 16, 32, 64)]  # 1 of 4
    rows += [_row("full_ft", "l", b, 0, 1.953798 if b == 4 else 1.8, 0.4) for b in (4, 16)]  # 1 of 2
    rows += [_row("lora", "s", b, 0, 1.8, 0.2) for b in (4, 16)] + [_row("base", "s", 0, 0, 1.953798, 0.225)]
    assert unchanged_share(pd.DataFrame(rows)).endswith("per method over every task, model and positive budget: steer_mean 4 of 8, full_ft 1 of 2.")
    assert unchanged_share(pd.DataFrame(rows[-3:])) == ""


def test_the_fit_says_when_steering_is_doing_nothing_and_when_few_resamples_agree(tmp_path: Path) -> None:
    """A new user's sweep: steer_mean chose scale 0 in every cell and LoRA scored about the base model's; `fit` said
    "steer_mean stays ahead of lora, 56% of resamples agree" and nothing else."""
    rng = np.random.default_rng(0)
    rows = [_row("steer_mean", "xs", b, s, 1.953798, 0.225) for b in (4, 16, 64, 256) for s in (0, 1)]
    rows += [_row("lora", "xs", b, s, 2.1, 0.22 + 0.03 * rng.standard_normal()) for b in (4, 16, 64, 256) for s in (0, 1)]
    write_cells(tmp_path, rows)
    text = analysis.fit_results(str(tmp_path), bootstrap=50, seed=0).to_text()
    assert "methods that left the model as it was (test NLL the base model's to the bit) in 50% or more" in text
    assert "\n  t steer_mean: 8 of 8 cells on xs\n" in text
    (line,) = [line for line in text.splitlines() if "of resamples agree" in line]
    assert line.endswith("74% of resamples agree (under 95%: not a finding)"), line


def test_an_outcome_between_two_methods_that_both_did_nothing_is_marked(tmp_path: Path) -> None:
    """steer_trained and full_ft both kept the base model in most cells of s's arith (session 39's quickstart): their
    "tied (99 %)" was counted among the firm crossover outcomes as if it said something about either method."""
    rows = [_row(method, "xs", b, s, 1.953798, 0.225) for method in ("steer_mean", "lora") for b in (4, 16, 64, 256) for s in (0, 1)]
    write_cells(tmp_path, rows)
    text = analysis.fit_results(str(tmp_path), bootstrap=50, seed=0).to_text()
    (line,) = [line for line in text.splitlines() if "of resamples agree" in line]
    assert line.endswith("; both methods left the model as it was in most cells both measured"), line
    analysis.write_report(str(tmp_path), bootstrap=50, seed=0)
    page = (tmp_path / "report" / "report.md").read_text()
    (row,) = [line for line in page.splitlines() if line.startswith("| t | steer_mean → lora |")]
    assert row.endswith(" ‡ |") and "‡: both methods left the model as it was" in page, row


def test_two_methods_idle_at_different_budgets_are_no_base_against_base_pair() -> None:
    """Each method kept the base model in half its own cells, but lora at the small budgets and steer_mean at the
    large: matched cell by cell they never both did nothing (session 39's xl arith, marked ‡ by a per-method count)."""
    from analysis.unchanged import idle_pairs

    small, large = (4, 16), (64, 256)
    rows = [_row("lora", "xs", b, s, 1.953798 if b in small else 1.8, 0.3) for b in small + large for s in (0, 1)]
    rows += [_row("steer_mean", "xs", b, s, 1.953798 if b in large else 1.9, 0.25) for b in small + large for s in (0, 1)]
    rows += [_row("full_ft", "xs", b, s, 1.953798 if b in large else 1.7, 0.35) for b in small + large for s in (0, 1)]
    both = idle_pairs(pd.DataFrame(rows))
    assert not both("t", "xs", "steer_mean", "lora")  # idle at other budgets
    assert both("t", "xs", "steer_mean", "full_ft")  # idle together in 4 of 8 cells: half
    assert not both("t", "xs", "steer_mean", "prompt") and not both("t", "m", "steer_mean", "full_ft")  # nothing measured


def test_methods_that_scored_alike_to_the_bit_are_named_once_as_a_pair() -> None:
    """The quickstart's task_vector scored as full_ft to the bit in 75 of 120 cells (λ chosen at 0 or 1, or both idle),
    so its crossovers with steering repeated full_ft's as findings of their own (helper-165). A composition and its
    part alike are the composition gains' to count; a pair alike in under half its cells, or only where both did
    nothing (the ‡ pairs), is not named."""
    from analysis.unchanged import alike_method_pairs
    from analysis.unchanged import alike_pairs as sentence_of

    def alike_pairs(rows: pd.DataFrame) -> str:
        return sentence_of(alike_method_pairs(rows))

    rows = [_row("full_ft", "s", b, 0, nll, 0.3) for b, nll in ((4, 1.953798), (16, 1.953798), (32, 1.7), (64, 1.6))]
    rows += [_row("task_vector", "s", b, 0, nll, 0.3) for b, nll in ((4, 1.953798), (16, 1.953798), (32, 1.7), (64, 1.65))]
    rows += [_row("lora", "s", b, 0, nll, 0.3) for b, nll in ((4, 1.8), (16, 1.953798), (32, 1.71), (64, 1.5))]  # 1 of 4 as full_ft
    rows += [_row("steer_mean", "s", b, 0, 1.953798, 0.3 if b < 32 else 0.31) for b in (4, 16, 32, 64)]  # as full_ft only where both idle
    rows += [_row("steer_mean+lora", "s", b, 0, nll, 0.3) for b, nll in ((4, 1.8), (16, 1.953798), (32, 1.71), (64, 1.5))]  # lora's copy
    sentence = alike_pairs(pd.DataFrame(rows))
    assert "full_ft and task_vector in 3 of the 4 cells both measured (2 of them where both left the model as it was)" in sentence, sentence
    assert sentence.count("cells both measured (") == 1, sentence
    assert alike_pairs(pd.DataFrame([r for r in rows if r["method"] != "task_vector"])) == ""
    # two configs of each method stored at one cell (no plan to tell the current one): one cell, not "4 of 4"
    doubled = [_row(m, "s", 64, 0, nll, 0.3) for m in ("full_ft", "task_vector") for nll in (1.6, 1.5)]
    assert alike_pairs(pd.DataFrame(doubled)) == ""  # each side's two rows disagree: no cell to compare
    repeated = doubled + [_row(m, "s", 32, 0, 1.7, 0.3) for m in ("full_ft", "task_vector") for _ in range(2)]  # a row stored twice
    assert "full_ft and task_vector in 1 of the 1 cells both measured" in alike_pairs(pd.DataFrame(repeated))
    # two compositions alike, neither the other's part, are a pair
    both = [_row(m, "s", b, 0, 1.7 + b / 1e3, 0.3) for m in ("steer_mean+lora", "steer_trained+lora") for b in (4, 16)]
    assert "steer_mean+lora and steer_trained+lora in 2 of the 2 cells" in alike_pairs(pd.DataFrame(both))


def test_the_report_lists_the_methods_that_did_nothing_in_one_table_by_model_size(tmp_path: Path) -> None:
    """The quickstart's report said it in seventeen sentences of one form, one per (task, method)."""
    rows = [_row(method, model, b, s, 1.953798 if (method, model) != ("lora", "xl") else 1.8, 0.225)
            for method in ("steer_mean", "lora") for model in ("xl", "xs") for b in (4, 16, 64, 256) for s in (0, 1)]
    for row in rows:
        row["params_nonembed"] = 1e7 if row["model"] == "xl" else 1e6
    write_cells(tmp_path, rows)
    analysis.write_report(str(tmp_path), bootstrap=0, seed=0)
    page = (tmp_path / "report" / "report.md").read_text().splitlines()
    start = page.index("| task | method | xs | xl |")  # smallest model first, not by name
    assert page[start + 2: start + 4] == ["| t | lora | 8 of 8 |  |", "| t | steer_mean | 8 of 8 | 8 of 8 |"]
    assert not any(line.startswith("On t, steer_mean left the model as it was") for line in page)


def test_methods_alike_through_a_shared_member_have_one_stand_in() -> None:
    from analysis.unchanged import AlikePair, one_of_alike

    stand_in = one_of_alike([AlikePair("task_vector", "full_ft", 3, 4, 1), AlikePair("task_vector", "x", 3, 4, 0)])
    assert {m: stand_in(m) for m in ("full_ft", "task_vector", "x", "lora")} == {"full_ft": "full_ft", "task_vector": "full_ft",
                                                                                   "x": "full_ft", "lora": "lora"}  # fmt: skip
