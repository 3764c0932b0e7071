"""The fitter on the data real sweeps produce: flat curves and writes caught in flight."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import analysis
from analysis.report import _findings
from workers.schema import to_table


def _row(cell_id: str, method: str, budget: int, score: float, seed: int) -> dict:
    return {
        "schema_version": 1, "sweep": "flat", "cell_id": cell_id, "slug": cell_id, "status": "ok",
        "model": "m", "task": "facts", "method": method, "budget": budget, "seed": seed,
        "params_nonembed": 1000, "params_total": 2000, "score": score, "score_base": 0.2,
    }


def test_flat_curves_and_in_flight_files_do_not_break_the_fit(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    cells.mkdir()
    rows = [
        _row(f"{method}-{budget}-{seed}", method, budget, 0.2, seed)  # a method that chose "do nothing" everywhere
        for method in ("steer_mean", "lora") for budget in (4, 16, 64, 256) for seed in (0, 1)
    ]
    for row in rows:
        pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")
    pq.write_table(to_table([rows[0]]), cells / f".tmp-123-{rows[0]['cell_id']}.parquet")  # a complete write not yet renamed
    loaded = analysis.load_results(str(tmp_path))
    assert len(loaded.frame) == len(rows) and loaded.skipped == ()
    summary = analysis.write_report(str(tmp_path), bootstrap=20)
    text = summary.to_text()
    assert "steer_mean" in text and "lora" in text
    assert all(Path(p).exists() for p in summary.paths.values())
    # a flat curve fits B ≈ 0, where any beta fits as well: said, with no interval, and no value printed
    for curve in (f for f in summary.analysis.fits if f.model == "m"):
        assert curve.identification_notes() == ["no spread in score (0.2 to 0.2 over 8 cells): only its level is measured",
                                                "B≈0: beta not identified"], curve.note  # fmt: skip
        record = curve.record()
        assert np.isnan(record["beta_lo"]) and np.isnan(record["beta_hi"]) and record["asymptote"] == pytest.approx(0.2)
    markdown = summary.report_page.with_name("report.md").read_text()
    assert "beta=not identified" in text and "| beta not identified |" in markdown
    assert "In 2 of the 2 fits a term is ≈ 0 over the data" in markdown and "in 2 of them the metric does not move" in markdown


def test_an_exponent_lost_in_many_resamples_has_a_value_but_no_interval(tmp_path: Path) -> None:
    """One cell below an otherwise flat curve: the fit has a term, but the resamples that leave that cell
    out (four in ten) are flat, where beta is arbitrary; a 95 % interval over the rest would pretend otherwise."""
    cells = tmp_path / "cells"
    cells.mkdir()
    for budget in (4, 16, 64, 256):
        for seed in (0, 1):
            row = _row(f"lora-{budget}-{seed}", "lora", budget, 0.20 if (budget, seed) == (4, 0) else 0.23, seed)
            pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")
    fitted = analysis.fit_results(str(tmp_path), bootstrap=200).analysis
    (curve,) = [f for f in fitted.fits if f.model == "m"]
    assert curve.unidentified() == [] and curve.fit.params["B"] > 1e-3
    assert any(n.startswith("beta not identified in ") and n.endswith("% of resamples: no interval") for n in curve.identification_notes()), curve.note
    record = curve.record()
    assert np.isfinite(record["beta"]) and np.isnan([record["beta_lo"], record["beta_hi"]]).all()
    a = SimpleNamespace(fits=[curve], scaling=[], crossovers=[], compositions=[], unchanged=[], metric="score", x="params", bootstrap=200, loaded=fitted.loaded)
    findings = " ".join(getattr(b, "text", "") for b in _findings(a))
    assert "In 1 of the 1 fits a term is ≈ 0 in over 5% of the bootstrap resamples" in findings, findings


def test_a_cell_stored_twice_keeps_its_ok_latest_row(tmp_path: Path) -> None:
    """A cell id in two files (a row under another file's name, a rerun's copy): its ok row wins over a failed
    one even when the failed one is newer; between two ok rows the newer wins. The kept row is read first
    here, so keeping whichever row comes first in the sort instead of last keeps the wrong one."""
    cells = tmp_path / "cells"
    cells.mkdir()
    at = {day: pd.Timestamp(f"2026-01-0{day}", tz="UTC") for day in (1, 2)}
    stored = {
        "a-ok-old": dict(_row("rerun", "lora", 4, 0.6, 0), finished_at=at[1]),
        "b-failed-new": dict(_row("rerun", "lora", 4, 0.6, 0), status="failed", error="RuntimeError: CUDA out of memory", score=None, finished_at=at[2]),
        "c-ok-new": dict(_row("again", "lora", 4, 0.7, 0), finished_at=at[2]),
        "d-ok-old": dict(_row("again", "lora", 4, 0.5, 0), finished_at=at[1]),
    }  # fmt: skip
    for name, row in stored.items():
        pq.write_table(to_table([row]), cells / f"{name}.parquet")
    frame = analysis.load_results(str(tmp_path)).frame.set_index("cell_id")
    assert sorted(frame.index) == ["again", "rerun"]
    assert (frame.loc["rerun", "status"], frame.loc["rerun", "score"]) == ("ok", 0.6)
    assert frame.loc["again", "score"] == 0.7


def test_a_model_whose_every_cell_failed_is_said_to_have_failed(tmp_path: Path) -> None:
    """A model that could not be loaded fails all its cells; its curves read "power_D ... needs at least 4
    distinct budgets, got 0", as if too few budgets had been planned. Now they say that every cell failed, and why."""
    cells = tmp_path / "cells"
    cells.mkdir()
    error = "OSError: big-model is not a valid model identifier\nTraceback (steerscale's frames and the innermost ones):\n  ..."
    for budget in (4, 16, 64, 256):
        rows = [_row(f"m-{budget}", "lora", budget, 0.5 - 0.5 * budget**-0.5, 0),
                dict(_row(f"big-{budget}", "lora", budget, 0.0, 0), model="big-model", status="failed", score=None, error=error)]  # fmt: skip
        for row in rows:
            pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")
    summary = analysis.write_report(str(tmp_path), bootstrap=0)
    (curve,) = [f for f in summary.analysis.fits if f.model == "big-model"]
    said = "all 4 cells failed (first error: OSError: big-model is not a valid model identifier)"
    assert curve.note == said
    markdown = summary.report_page.with_name("report.md").read_text()
    for text in (summary.to_text(), markdown):
        assert said in text and "distinct budgets, got 0" not in text and "Traceback" not in text


def test_an_asymptote_far_past_the_data_is_said_and_a_reached_one_is_not() -> None:
    """Scores level at .5 over 8–256 examples (40 questions, 2 seeds) fit about as well with a far floor and
    a tiny exponent (β = 0.003, clear of the bound note): the fits table showed asymptote 0.998 [0.99, 1]
    with no note, for a curve still at .51 at 100× the largest budget."""
    from analysis.curves import GroupJob, fit_group
    from analysis.laws import POWER_D
    from analysis.synthetic import TrueCurve, synthetic_rows

    def fitted(curve: TrueCurve) -> object:
        rows = pd.DataFrame(synthetic_rows({("t", "m1", "m"): curve}, {"m": 10**8}, (8, 16, 32, 64, 128, 256), 2, 0.05, np.random.default_rng(0)))
        rows["score"] = np.round(rows["score"] * 40) / 40
        return fit_group(GroupJob("t", "m1", "m", POWER_D, rows, "score", None, 100, 0))

    flat = fitted(TrueCurve(e=0.5, b=0.0, beta=0.5))  # fitted at the loss floor, E = 0 (a bound, noted as such), or near it
    assert flat.record()["asymptote"] > 0.9
    assert "asymptote far past the data (at 100× the largest budget the curve is at 0.5" in flat.note, flat.note
    rising = fitted(TrueCurve(e=0.05, b=3.0, beta=0.45))
    assert rising.asymptote_notes() == [] and "asymptote" not in rising.note


def test_a_curve_flat_over_the_data_has_no_asymptote_far_past_it() -> None:
    """Scores falling from .62 to .55 fit β = 0 and B = e^-30: the curve is its level at every budget, but the check
    compared two rounding errors (the curve's distance from E at 100× the largest budget against its rise over the
    data) and noted "asymptote far past the data (at 100× the largest budget the curve is at 0.585)"; so it did of
    scores level at .9."""
    from analysis.curves import GroupJob, fit_group
    from analysis.laws import POWER_D

    rows = pd.DataFrame([{"status": "ok", "task": "t", "method": "steer_mean", "model": "m", "params_nonembed": 1e6, "budget": budget,
                          "seed": seed, "score": score + 0.005 * seed, "score_base": 0.2}
                         for budget, score in zip((8, 32, 128, 512, 2048), (0.62, 0.60, 0.58, 0.56, 0.55)) for seed in (0, 1)])  # fmt: skip
    curve = fit_group(GroupJob("t", "steer_mean", "m", POWER_D, rows, "score", None, 0, 0))
    assert curve.unidentified() == ["beta"] and curve.record()["asymptote"] == pytest.approx(0.585, abs=1e-3)
    # not also "beta=0 at its lower bound": counted among the fits at a bound, its level was called "not a finding"
    assert curve.asymptote_notes() == [] and curve.bound_notes() == [], curve.note
    # falling past the seeds' noise (.005): a law that only improves does not describe it, and the note says so first
    assert curve.note == ("score worsens as the budget grows (0.623 at D=8, 0.552 at D=2048; past noise): the law only improves "
                          "with data, so it does not describe these cells; B≈0: beta not identified"), curve.note
    # a drift of one question (seeds alike: no noise to judge it by) is within what a flat line misses: not noted
    drift = rows.assign(score=rows["budget"].map({8: 0.6, 32: 0.6, 128: 0.6, 512: 0.59, 2048: 0.59}))
    assert fit_group(GroupJob("t", "steer_mean", "m", POWER_D, drift, "score", None, 0, 0)).worsening == ""
    level = fit_group(GroupJob("t", "steer_mean", "m", POWER_D, rows.assign(score=0.9), "score", None, 0, 0))  # noted "… at 0.9"
    assert level.asymptote_notes() == [] and "asymptote" not in level.note, level.note


def test_fits_say_when_a_tasks_rows_were_scored_on_different_hub_data():
    import json

    import pandas as pd

    from analysis.io import mixed_pins_note

    def row(task: str, digest: str | None) -> dict:
        versions = {"task_data": {task: 1}, **({"task_rows": {task: digest, "facts": "f" * 64}} if digest else {})}
        return {"status": "ok", "model": "m", "task": task, "versions": json.dumps(versions)}

    same = pd.DataFrame([row("sst2", "a" * 64), row("sst2", "a" * 64), row("sst2", None), row("facts", None)])
    assert mixed_pins_note(same) is None  # a row from before digests were recorded says nothing either way
    moved = pd.concat([same, pd.DataFrame([row("sst2", "b" * 64)])])
    note = mixed_pins_note(moved)
    assert note is not None and "1 task(s) were scored on different versions of their hub dataset" in note
    assert f"sst2: rows {'a' * 12}… in 2 rows, rows {'b' * 12}… in 1 rows" in note and "different weights" not in note
    assert "neutral text" not in note  # every row read the world's grammar


def test_fits_say_when_rows_measured_neutral_text_on_different_texts():
    """eval.neutral_source set for some cells and not others: their neutral KL and `neutral_loss` are not comparable."""
    import json

    import pandas as pd

    from analysis.io import mixed_pins_note

    def row(neutral: str | None) -> dict:
        return {"status": "ok", "model": "m", "task": "facts", "versions": json.dumps({"neutral_texts": neutral} if neutral else {})}

    assert mixed_pins_note(pd.DataFrame([row("c" * 64), row("c" * 64)])) is None
    note = mixed_pins_note(pd.DataFrame([row("c" * 64), row(None), row("c" * 64), {"status": "failed", "model": "m", "task": "facts"}]))
    assert note is not None and note.startswith("The rows measured neutral text (neutral KL, perplexity ratio, `neutral_loss`) "
                                                f"on different texts (texts {'c' * 12} in 2 rows, the world's grammar in 1 rows)")
