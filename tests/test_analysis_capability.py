"""Base-model capability as the x-axis: two families whose sizes disagree with what they can do.

Family `b` is smaller but better trained, so its 2M model beats family `a`'s 8M one. Post-training
loss follows a law in capability; a law in parameters cannot pool the families.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import analysis
from analysis.axis_choice import TREND, AxisComparison, AxisScore, _verdicts
from analysis.synthetic import BaseModel, CapabilityLaw, capability_rows, synthetic_rows
from test_analysis_results import write_cells

MODELS = [
    BaseModel("a-1m", "a", 1_000_000, 1.20, 0.22), BaseModel("a-2m", "a", 2_000_000, 1.00, 0.32),
    BaseModel("a-4m", "a", 4_000_000, 0.85, 0.41), BaseModel("a-8m", "a", 8_000_000, 0.75, 0.47),
    BaseModel("b-500k", "b", 500_000, 0.90, 0.36), BaseModel("b-1m", "b", 1_000_000, 0.70, 0.50),
    BaseModel("b-2m", "b", 2_000_000, 0.55, 0.60),
]  # fmt: skip
TUNE = CapabilityLaw(e=0.02, a=0.25, alpha=1.5, b=3.0, beta=0.45)
STEER = CapabilityLaw(e=0.10, a=0.35, alpha=1.5, b=0.6, beta=0.4)
BUDGETS = (8, 32, 128, 512, 2048)


def _joint(summary: analysis.FitSummary, method: str, law: str = "additive"):
    (fit,) = [f for f in summary.analysis.fits if f.method == method and f.law.name == law]
    return fit


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("families")
    laws = {("facts", "lora"): TUNE, ("facts", "steer_mean"): STEER}
    write_cells(path, capability_rows(laws, MODELS, "neutral_loss", BUDGETS, seeds=2, noise=0.01, rng=np.random.default_rng(0)))
    return path


@pytest.fixture(scope="module")
def by_capability(results: Path) -> analysis.FitSummary:
    return analysis.fit_results(str(results), bootstrap=30, x="neutral_loss")


def test_capability_pools_families_that_parameters_cannot(by_capability: analysis.FitSummary) -> None:
    """Same rows, N as capability vs N as parameters: the capability law predicts the held-out model far better."""
    errors = {(s.subject, s.x): s.holdout_error for s in by_capability.analysis.axes.scores if s.law == "additive"}
    for method in ("lora", "steer_mean"):
        assert errors[(method, "neutral_loss")] < errors[(method, "params")] / 3, errors
        fit = _joint(by_capability, method)
        assert fit.x == "neutral_loss" and "b-2m" in fit.holdout  # the most capable model, not the largest (a-8m)
        assert fit.fit.params["alpha"] == pytest.approx(1.5, abs=0.2)
        assert fit.fit.params["beta"] == pytest.approx((TUNE if method == "lora" else STEER).beta, abs=0.05)
    assert by_capability.analysis.axes.best == "neutral_loss"


def test_crossover_trend_is_tighter_in_capability(by_capability: analysis.FitSummary) -> None:
    """D* of all seven models lies on one line in capability; in parameters the families split (scored pooled)."""
    trends = {t.x: t for t in by_capability.analysis.axes.trends if not t.family}
    assert trends["neutral_loss"].n_models == 7
    errors = {s.x: s.holdout_error for s in by_capability.analysis.axes.scores if s.law == TREND}
    assert errors["neutral_loss"] == trends["neutral_loss"].holdout_error
    assert errors["neutral_loss"] < errors["params"] / 2
    assert trends["neutral_loss"].gamma > 0  # better base models need more data before fine-tuning wins
    (scaling,) = by_capability.analysis.scaling
    assert scaling.x == "neutral_loss" and scaling.gamma == trends["neutral_loss"].gamma


def test_fits_json_text_and_report_carry_the_comparison(by_capability: analysis.FitSummary, results: Path) -> None:
    payload = json.loads(Path(by_capability.paths["fits.json"]).read_text())
    assert payload["x"] == "neutral_loss" and payload["axis_comparison"]["best"] == "neutral_loss"
    assert payload["bootstrap"] == by_capability.analysis.bootstrap > 0  # how many resamples its intervals rest on
    assert {c["family"] for c in payload["capabilities"]} == {"a", "b"}
    text = by_capability.to_text()
    assert "most wins: x = neutral_loss" in text and "additive[neutral_loss]" in text
    # a joint law's resamples keep its models: its "95 %" intervals leave their scatter out, and the header says so
    assert text.splitlines()[0].endswith(f"N = neutral_loss in the joint laws, {by_capability.analysis.bootstrap} resamples, "
                                         "95% bootstrap CIs (a joint law's resamples redraw its cells, not its models: "
                                         "narrower than its uncertainty across models)")
    page = analysis.write_report(str(results), bootstrap=10, x="task_score").report_page
    markdown = page.with_name("report.md").read_text()
    assert "## Capability as the x-axis" in markdown and "Most wins: `neutral_loss` (not a verdict; below)." in markdown
    # the axes leave out different models (task_score's top is its own base score, read off the test set): not a finding
    findings = markdown.split("## What the fits say", 1)[1].split("\n## ", 1)[0]
    assert "x-axes" not in findings and "tighter" not in findings, findings
    capability = markdown.split("## Capability as the x-axis", 1)[1].split("\n## ", 1)[0]
    assert "Not a like-for-like comparison, so not stated as a finding: the held-out model differs between axes" in capability
    assert "(params: largest model (a-8m); neutral_loss: most capable model (b-2m);" in capability, capability
    assert "`task_score` places the held-out model by its own base score on the task's test set" in capability
    # neutral_loss is a reciprocal: a column named bare read as the lowest loss where it is the highest (helper-169)
    assert "| neutral_loss (1 / base NLL per byte on neutral text) | task_score (1 / (1 − base task score)) |" in capability
    assert "additive[task_score]" in markdown
    assert (page.parent / "crossover_facts.png").stat().st_size > 0


def test_a_law_in_task_score_is_recovered_on_that_axis(tmp_path: Path) -> None:
    """The truth on the task axis: that axis recovers its exponent and beats parameters."""
    law = CapabilityLaw(e=0.02, a=0.3, alpha=1.2, b=3.0, beta=0.45)
    write_cells(tmp_path, capability_rows({("facts", "lora"): law}, MODELS, "task_score", BUDGETS, seeds=2, noise=0.01, rng=np.random.default_rng(1)))
    summary = analysis.fit_results(str(tmp_path), bootstrap=0, x="task_score")
    fit = _joint(summary, "lora")
    assert fit.fit.params["alpha"] == pytest.approx(1.2, abs=0.2)
    errors = {s.x: s.holdout_error for s in summary.analysis.axes.scores if s.law == "additive"}
    assert errors["task_score"] < errors["params"] / 3, errors


def test_unknown_x_names_the_valid_choices(tmp_path: Path) -> None:
    for call in (analysis.fit_results, analysis.write_report):
        with pytest.raises(ValueError, match=r"unknown x 'neutral'.*did you mean 'neutral_loss'.*params, neutral_loss, task_score"):
            call(str(tmp_path), x="neutral")
    assert not (tmp_path / "fits.json").exists() and not (tmp_path / "report").exists()


def test_rows_without_the_neutral_column_say_why(tmp_path: Path) -> None:
    """Rows written before schema 2 have no base-model neutral loss: that axis is reported as unusable."""
    rows = synthetic_rows({("t", "lora", m.name): TUNE.curve(1 / m.neutral_nll_per_byte) for m in MODELS[:4]},
                          {m.name: m.params for m in MODELS[:4]}, BUDGETS, seeds=1, noise=0.01, rng=np.random.default_rng(2))  # fmt: skip
    write_cells(tmp_path, rows)
    summary = analysis.fit_results(str(tmp_path), bootstrap=0, x="neutral_loss")
    assert "no ok row has a usable base_neutral_nll_per_byte" in _joint(summary, "lora").message
    notes = {v.x: v.note for v in summary.analysis.axes.verdicts}
    assert "base_neutral_nll_per_byte" in notes["neutral_loss"] and notes["params"] == ""
    assert "neutral_loss: not usable" in summary.to_text()


def test_run_cell_records_the_base_models_neutral_loss(test_ladder: list[str]) -> None:
    """The new columns come from the cached baseline: equal to a fresh neutral reference of the same model."""
    from workers.cache import WorkerCache
    from workers.cell import CellConfig, EvalConfig, ModelSpec
    from workers.metrics import neutral_reference
    from workers.run_cell import CellRun, model_revision, run_cell
    from workers.tasks import neutral_texts

    spec = ModelSpec(id=test_ladder[0])
    spec = spec.model_copy(update={"revision": model_revision(spec)})
    cell = CellConfig(sweep="unit", model=spec, task="facts", method="base", budget=0, seed=0,
                      eval=EvalConfig(test_size=8, validation_size=0, neutral_size=4, batch_size=4))  # fmt: skip
    cache = WorkerCache()
    row = run_cell(cell, CellRun(cache=cache))
    assert row["status"] == "ok", row["error"]
    reference = neutral_reference(cache.model(spec, 4), neutral_texts(4, 48))
    assert row["base_neutral_nll"] == pytest.approx(reference.nll, rel=1e-6)
    assert row["base_neutral_nll_per_byte"] == pytest.approx(reference.nll_per_byte, rel=1e-6)
    assert 0 < row["base_neutral_nll_per_byte"] < row["base_neutral_nll"]  # a token spans at least one byte


def test_cli_fit_takes_the_axis_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`steerscale fit --x NAME` reaches fits-NAME.json (fits.json is the default axis's); a wrong name is a usage error
    (exit 2) that suggests the right one."""
    from orchestrator.cli import main

    write_cells(tmp_path, capability_rows({("facts", "lora"): TUNE}, MODELS, "task_score", BUDGETS, seeds=1, noise=0.01, rng=np.random.default_rng(2)))
    assert main(["fit", str(tmp_path), "--x", "task_score", "--bootstrap", "0"]) == 0
    assert json.loads((tmp_path / "fits-task_score.json").read_text())["x"] == "task_score"
    assert not (tmp_path / "fits.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(tmp_path), "--x", "neutral"])
    assert exit_info.value.code == 2 and "did you mean 'neutral_loss'" in capsys.readouterr().err


def test_held_out_errors_equal_but_for_rounding_are_no_win() -> None:
    """A law that does not use x (its exponent at 0) fits the same curve on every axis: held-out errors 13 digits
    alike named `neutral_loss` the tighter axis, the verdict in the report. A real margin still wins."""
    def compared(errors: dict[str, float]) -> AxisComparison:
        scores = [AxisScore("t", "lora", "additive", x, 0.0, "top", e, "", 6) for x, e in errors.items()]
        return AxisComparison(scores, *_verdicts(scores, {}), [], [])

    alike = compared({"params": 0.2304030336654171, "neutral_loss": 0.2304030336653077, "task_score": 0.23040303367389284})
    assert alike.error_table()[0][-1] == "-" and alike.best is None
    assert all(v.wins == 0 for v in alike.verdicts) and "(ties)" in alike.why_no_best()
    apart = compared({"params": 0.2281, "neutral_loss": 0.2267, "task_score": 0.2308})
    assert apart.error_table()[0][-1] == "neutral_loss" and apart.best == "neutral_loss"


def test_a_larger_model_less_capable_than_a_smaller_one_is_said() -> None:
    """The demo's ladder: `l` (2.03e5 parameters) at 3.85 below `m` (9.02e4) at 4.09, and `s` below `xs`, in a table
    that did not say so; a reader took "bigger" for "better" (helper-143). A family in size order says nothing."""
    import pandas as pd

    from analysis.report import capability_out_of_size_order

    caps = pd.DataFrame({
        "task": ["t"] * 7, "family": ["ladder"] * 5 + ["other"] * 2,
        "model": ["xs", "s", "m", "l", "xl", "o1", "o2"],
        "params": [1.39e4, 2.68e4, 9.02e4, 2.03e5, 4.9e5, 1e6, 2e6],
        "neutral_loss": [3.98, 3.87, 4.09, 3.85, 4.10, 3.0, 3.5], "task_score": [1.0] * 7, "score_base": [0.0] * 7,
    })  # fmt: skip
    (line,) = capability_out_of_size_order(pd.concat([caps, caps.assign(task="u")]))
    assert line.startswith("On ladder, capability on neutral text does not rise with size at every step: s (3.87) below xs (3.98); "
                           "l (3.85) below m (4.09) (neutral_loss, the larger model first)")
    assert capability_out_of_size_order(caps[caps.family == "other"]) == []
    # the base models' task scores out of size order on one task (helper-165: arith's s at 0.11 below xs at 0.29)
    scores = caps.assign(neutral_loss=np.arange(7.0), score_base=[0.29, 0.11, 0.17, 0.30, 0.33, 0.5, 0.6])
    (line,) = capability_out_of_size_order(pd.concat([scores, scores.assign(task="u", score_base=0.5)]))
    assert line.startswith("On t, the ladder base models' score does not rise with size at every step: s (0.11) below xs (0.29) (score_base")
    assert "does the task best" not in line  # xl, the largest of its family, scores best (0.33)
    (line,) = capability_out_of_size_order(scores.assign(score_base=[0.29, 0.38, 0.23, 0.30, 0.35, 0.5, 0.6]))  # facts: s above xl
    assert line.endswith("differently; and s (0.38), not the largest model measured (xl, 0.35), does the task best before post-training."), line
    # the measured score, not one read back from task_score's floored 1 / (1 − s): 1.0 and 0.9995 both read 0.999 there
    (line,) = capability_out_of_size_order(scores.assign(score_base=[1.0, 0.9995, 0.5, 0.6, 0.7, 0.5, 0.6]))
    assert line.startswith("On t, the ladder base models' score does not rise with size at every step: s (0.9995) below xs (1); m (0.5)"), line
    assert "xs (1), not the largest model measured (xl, 0.7)" in line, line


def test_hub_models_neutral_figures_are_said_to_be_on_the_worlds_synthetic_text() -> None:
    """A hub model's neutral text read from the offline grammar: its neutral KL is not a shift on natural text
    (helper-145). The ladder, pretrained on that grammar, needs no such note."""
    import pandas as pd

    from analysis.report import synthetic_neutral_text

    assert synthetic_neutral_text(pd.DataFrame({"model": ["ladder:xs", "ladder:s"]})) == ""
    said = synthetic_neutral_text(pd.DataFrame({"model": ["ladder:xs", "EleutherAI/pythia-160m", "EleutherAI/pythia-410m"]}))
    assert said.startswith("Neutral text is the offline world's general-text grammar for EleutherAI/pythia-160m, "
                           "EleutherAI/pythia-410m, so their neutral KL")
    # a model whose rows read natural text (`eval.neutral_source`, pinned in `versions`) is not listed
    natural = json.dumps({"neutral_texts": "d" * 64})
    said = synthetic_neutral_text(pd.DataFrame({"model": ["EleutherAI/pythia-160m", "EleutherAI/pythia-410m"], "versions": [natural, "{}"]}))
    assert "for EleutherAI/pythia-410m, so" in said and "160m" not in said
    assert synthetic_neutral_text(pd.DataFrame({"model": ["EleutherAI/pythia-160m"], "versions": [natural]})) == ""


def test_synthetic_rows_give_each_model_its_own_elicitation_gap():
    """capability_rows set each model's score_base but kept synthetic_rows' elicited score (0.2 + 0.3): a model
    scoring 0.6 before post-training had an elicited score below it, a negative gap for the frontier to divide by."""
    rows = capability_rows({("facts", "lora"): TUNE}, MODELS, "task_score", BUDGETS, seeds=1, noise=0.0, rng=np.random.default_rng(0))
    gaps = {row["model"]: round(row["score_elicited"] - row["score_base"], 9) for row in rows}
    assert gaps == {m.name: 0.3 for m in MODELS}


def test_the_axis_caveat_counts_task_score_wins_on_a_held_out_model_the_method_left_as_it_was() -> None:
    """On the quickstart, 16 of task_score's 33 wins were groups whose method did nothing on the held-out model: the
    law's error there is how well it predicts the base score, which task_score is made of; and each method gave a
    win once per law (helper-165 #3)."""
    from types import SimpleNamespace

    from analysis.axis_choice import AxisComparison, AxisScore
    from analysis.report import axis_caveat
    from analysis.summary import axes_text
    from analysis.unchanged import Unchanged

    scores = [AxisScore("t", method, law, x, 0.3, held_out, error, "", 5, ("xl",))
              for method in ("lora", "full_ft") for law in ("additive", "multiplicative")
              for x, held_out, error in (("params", "largest model (xl)", 0.02), ("task_score", "most capable model (xl)", 0.01))]  # fmt: skip
    a = SimpleNamespace(axes=AxisComparison(scores, [], "task_score", []), unchanged=[Unchanged("t", "full_ft", (("xl", 2, 2),), )])
    text = axis_caveat(a)
    assert "In 2 of its 4 wins among the laws the method left the held-out model as it was in half its cells or more" in text, text
    assert "Each method's group counts once per law (additive, multiplicative)" in text, text
    assert "In 2 of its" not in axis_caveat(SimpleNamespace(axes=a.axes, unchanged=[]))
    # both axes left out xl: their labels differ ("largest", "most capable"), the model does not
    assert "differs between axes" not in text and "each axis leaves out the model at its own top" in text, text
    # xl and s left out by turns on two tasks: the same models over all, a different one in each group
    swapped = [AxisScore(task, "lora", "additive", x, 0.3, f"model ({held})", 0.01, "", 5, (held,))
               for task, pairs in (("t", (("params", "xl"), ("task_score", "s"))), ("u", (("params", "s"), ("task_score", "xl"))))
               for x, held in pairs]  # fmt: skip
    assert "the held-out model differs between axes" in axis_caveat(SimpleNamespace(axes=AxisComparison(swapped, [], "task_score", []), unchanged=[]))
    fitted = " ".join(axes_text(SimpleNamespace(axes=a.axes, unchanged=a.unchanged, metric="score")))
    assert "most wins: x = task_score (not a finding" in fitted and "2 of its 4 wins among the laws are on a held-out model" in fitted, fitted
