"""From a results directory of Parquet cells to fits, crossovers and counts, on known curves."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.optimize import brentq

import analysis
from analysis.crossover import OUTCOMES, crossover, outcomes
from analysis.curves import fit_curves
from analysis.efficiency import data_efficiency, examples_to_reach
from analysis.report import _examples_needed, best_measured
from analysis.summary import analyse
from analysis.synthetic import TrueCurve, synthetic_rows
from workers.schema import to_table

BUDGETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STEER = TrueCurve(e=0.35, b=0.6, beta=0.4)  # quick to gain, low ceiling
TUNE = TrueCurve(e=0.05, b=3.0, beta=0.45)  # slow to start, high ceiling
WORSE = TrueCurve(e=0.45, b=3.0, beta=0.45)  # never catches up with STEER
TRUE_D_STAR = brentq(lambda d: STEER.score(d) - TUNE.score(d), 8, 2048)


def write_cells(results: Path, rows: list[dict]) -> None:
    cells = results / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    for row in rows:
        pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")


def build_results(results: Path) -> None:
    """Three model sizes on `facts` (steering vs lora, lora catches up), one on `never` (it doesn't)."""
    rng = np.random.default_rng(1)
    sizes = {"m1": 1_000_000, "m2": 4_000_000, "m3": 16_000_000}
    curves = {}
    for i, model in enumerate(sizes):
        shrink = 0.8**i  # bigger models: lower loss for both methods
        curves[("facts", "steer_mean", model)] = TrueCurve(STEER.e * shrink, STEER.b * shrink, STEER.beta)
        curves[("facts", "lora", model)] = TrueCurve(TUNE.e * shrink, TUNE.b * shrink, TUNE.beta)
    curves[("never", "steer_mean", "m1")] = STEER
    curves[("never", "lora", "m1")] = WORSE
    rows = synthetic_rows(curves, sizes, BUDGETS, seeds=3, noise=0.01, rng=rng)
    failed = dict(rows[0], cell_id="failed-1", status="failed", error="CUDA OOM", score=None, method="lora", model="m1", task="facts")
    nan = dict(rows[0], cell_id="nan-1", score=float("nan"), method="lora", model="m1", task="facts")
    write_cells(results, [*rows, failed, dict(failed, cell_id="failed-2"), nan])
    base = [dict(rows[0], cell_id=f"base-{m}", method="base", budget=0, model=m, score=0.2) for m in sizes]
    write_cells(results, base)
    good = (results / "cells" / f"{rows[1]['cell_id']}.parquet").read_bytes()
    (results / "cells" / "truncated.parquet").write_bytes(good[: len(good) // 2])
    pq.write_table(pd.DataFrame({"foo": [1]}).pipe(lambda f: __import__("pyarrow").Table.from_pandas(f)), results / "cells" / "foreign.parquet")
    (results / "cells" / "partial.parquet.tmp").write_bytes(b"in flight")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("results")
    build_results(path)
    return path


@pytest.fixture(scope="module")
def summary(results: Path) -> analysis.FitSummary:
    return analysis.fit_results(str(results), bootstrap=200, seed=0)


def test_unreadable_files_are_skipped_and_named(results: Path) -> None:
    loaded = analysis.load_results(str(results))
    names = sorted(Path(s.path).name for s in loaded.skipped)
    assert names == ["foreign.parquet", "truncated.parquet"]
    assert "missing columns" in next(s.reason for s in loaded.skipped if s.path.endswith("foreign.parquet"))
    assert len(loaded.frame) == 2 * 3 * 9 * 3 + 2 * 9 * 3 + 3 + 3
    assert (loaded.frame["status"] == "failed").sum() == 2


def test_uri_results_dir_reads_the_same(tmp_path: Path) -> None:
    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, (8, 64), seeds=2, noise=0.01, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows)
    by_uri = analysis.load_results(tmp_path.as_uri()).frame
    assert len(by_uri) == 4 and by_uri["cell_id"].tolist() == analysis.load_results(str(tmp_path)).frame["cell_id"].tolist()


def test_a_reread_reads_only_files_new_or_changed_since_and_drops_those_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The adaptive loop read every stored row again each round: O(cells²) reads over a run (helper-144)."""
    import os
    import time

    import analysis.io

    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, (8, 64), seeds=2, noise=0.01, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows[:3])
    cache: analysis.io.ReadCache = {}
    assert len(analysis.load_results(str(tmp_path), cache).frame) == 3 and len(cache) == 3
    cells = tmp_path / "cells"
    settled = time.time_ns() - 60 * 10**9  # the rows read above, as if written a minute ago
    for row in rows[:3]:
        os.utime(cells / f"{row['cell_id']}.parquet", ns=(settled, settled))
    assert len(analysis.load_results(str(tmp_path), cache).frame) == 3
    read, real_read = [], analysis.io._read_cell
    monkeypatch.setattr(analysis.io, "_read_cell", lambda fs, path: read.append(Path(path).name) or real_read(fs, path))
    write_cells(tmp_path, [rows[3], dict(rows[0], score=0.99)])  # one new, one replaced
    (cells / f"{rows[1]['cell_id']}.parquet").unlink()
    frame = analysis.load_results(str(tmp_path), cache).frame.set_index("cell_id")
    assert sorted(read) == sorted(f"{row['cell_id']}.parquet" for row in (rows[0], rows[3])), "rows[2] unchanged: not read again"
    assert sorted(frame.index) == sorted(row["cell_id"] for row in (rows[0], rows[2], rows[3]))
    assert frame.loc[rows[0]["cell_id"], "score"] == 0.99 and len(cache) == 3
    # a row replaced within its clock's tick by one of the same size has the stamp it had: trusted only once settled
    replaced = cells / f"{rows[3]['cell_id']}.parquet"
    stamp = replaced.stat()
    size = stamp.st_size
    write_cells(tmp_path, [dict(rows[3], score=0.01)])
    os.utime(replaced, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert replaced.stat().st_size == size, "a same-size replacement (a float changed)"
    assert analysis.load_results(str(tmp_path), cache).frame.set_index("cell_id").loc[rows[3]["cell_id"], "score"] == 0.01


def test_failed_and_nan_rows_are_excluded_and_counted(summary: analysis.FitSummary) -> None:
    fits = pd.read_parquet(summary.paths["fits.parquet"])
    row = fits[(fits.task == "facts") & (fits.method == "lora") & (fits.model == "m1")].iloc[0]
    assert (row.n_failed, row.n_nan, row.n_points) == (2, 1, 27)
    joint = fits[(fits.task == "facts") & (fits.method == "lora") & (fits.law == "additive")].iloc[0]
    assert (joint.n_failed, joint.n_nan, joint.n_points) == (2, 1, 81)


def test_budget_curves_recover_their_truth(summary: analysis.FitSummary) -> None:
    fits = pd.read_parquet(summary.paths["fits.parquet"])
    row = fits[(fits.task == "never") & (fits.method == "steer_mean")].iloc[0]
    assert row.beta == pytest.approx(STEER.beta, abs=0.05)
    assert row.asymptote == pytest.approx(1 - STEER.e, abs=0.02)
    assert row.beta_lo <= STEER.beta <= row.beta_hi
    assert row.holdout_error < 0.02


def test_crossover_found_where_the_curves_cross(summary: analysis.FitSummary) -> None:
    found = [c for c in summary.analysis.crossovers if c.task == "never"] + [c for c in summary.analysis.crossovers if (c.task, c.model) == ("facts", "m1")]
    never, facts = found
    assert facts.d_star == pytest.approx(TRUE_D_STAR, rel=0.15)
    assert facts.d_star_lo <= TRUE_D_STAR <= facts.d_star_hi
    assert not np.isfinite(never.d_star)
    assert "no crossover within the measured range" in never.verdict
    assert (facts.outcome, never.outcome) == ("crosses", "steering_ahead")  # WORSE never catches up with STEER
    print(f"\ncrossover: true D*={TRUE_D_STAR:.1f}, fitted {facts.d_star:.1f} [{facts.d_star_lo:.1f}, {facts.d_star_hi:.1f}]")


def test_crossover_budget_scales_with_model_size(summary: analysis.FitSummary) -> None:
    """Both facts curves shrink by the same factor with size, so D* is the same on every model: gamma is 0."""
    (scaling,) = [s for s in summary.analysis.scaling if s.task == "facts"]
    assert (scaling.n_models, scaling.n_pairs) == (3, 3)
    assert scaling.gamma_lo <= 0 <= scaling.gamma_hi and scaling.gamma_hi - scaling.gamma_lo < 0.5
    assert scaling.gamma_lo <= scaling.gamma <= scaling.gamma_hi


def test_outcomes_on_known_curves() -> None:
    """Fine-tuning overtaking, steering overtaking, crossing twice (behind only in a dip), never ahead, tied."""
    d = np.geomspace(8, 2048, 512)
    dip = np.where((d > 50) & (d < 200), -0.1, 0.1)  # ahead, behind in the middle, ahead again
    same = np.zeros_like(d)  # two methods that both chose to do nothing
    advantage = np.stack([TUNE.score(d) - STEER.score(d), STEER.score(d) - TUNE.score(d), dip, WORSE.score(d) - STEER.score(d), same])
    code, d_star = outcomes(advantage, d)
    assert [OUTCOMES[c] for c in code] == ["crosses", "steering_overtakes", "crosses_twice", "steering_ahead", "tied"]
    assert d_star[:2] == pytest.approx([TRUE_D_STAR, TRUE_D_STAR], rel=1e-3)
    assert np.isnan(d_star[2:]).all()
    broken, _ = outcomes(np.stack([np.full_like(d, np.nan)]), d)
    assert broken.tolist() == [-1]  # a resample whose fit went non-finite agrees with no outcome (it read "steering ahead")


def test_steering_overtaking_and_budgets_that_do_not_overlap(summary: analysis.FitSummary) -> None:
    """The reverse crossing is found (it used to read "fine-tuning ahead throughout"), and two methods
    measured on disjoint budgets get no verdict instead of one extrapolated backwards."""
    fits = {(f.method, f.model): f for f in summary.analysis.fits if f.task == "facts" and f.model != "*"}
    steer, tune = fits[("steer_mean", "m1")], fits[("lora", "m1")]
    reverse = crossover(dataclasses.replace(tune, method="steer_mean"), dataclasses.replace(steer, method="lora"))
    forward = crossover(steer, tune)
    assert (forward.outcome, reverse.outcome) == ("crosses", "steering_overtakes")
    assert reverse.d_star == pytest.approx(forward.d_star) and reverse.share == pytest.approx(forward.share)
    assert "steer_mean overtakes lora" in reverse.verdict
    moved = dataclasses.replace(tune, points=dataclasses.replace(tune.points, d=tune.points.d * 10_000))
    apart = crossover(steer, moved)
    assert apart.outcome == "no_overlap" and np.isnan(apart.d_star) and "no shared budget range" in apart.verdict
    # no verdict to doubt: not blamed on resamples the fits had (its share is NaN for want of shared budgets)
    text = dataclasses.replace(summary, analysis=dataclasses.replace(summary.analysis, crossovers=[apart])).to_text()
    assert "no shared budget range" in text and "no resamples" not in text


def test_outputs_and_text(summary: analysis.FitSummary, results: Path) -> None:
    payload = json.loads(Path(summary.paths["fits.json"]).read_text())  # strict JSON: NaN written as null
    assert payload["skipped_files"] and payload["crossovers"] and payload["data_efficiency"]
    text = summary.to_text()
    assert "truncated.parquet" in text and "foreign.parquet" in text
    assert "no crossover within the measured range" in text
    curves = [(f.task, f.method, f.model) for f in summary.analysis.fits if f.model != "*"]
    assert [m for t, meth, m in curves if (t, meth) == ("facts", "lora")] == ["m1", "m2", "m3"]  # smallest model first
    print("\n" + text)


def test_one_model_size_and_few_budgets_say_what_cannot_be_fitted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, (8, 16, 32, 64), seeds=2, noise=0.01, rng=rng)
    rows += synthetic_rows({("t", "steer_mean", "m1"): STEER}, {"m1": 10**6}, (8, 64), seeds=2, noise=0.01, rng=rng)
    write_cells(tmp_path, rows)
    summary = analysis.fit_results(str(tmp_path), bootstrap=50)
    messages = {(f.method, f.law.name): f.message for f in summary.analysis.fits}
    assert messages[("lora", "power_D")] == ""
    # every shortfall at once: one model size, and 4 (N, D) points for 5 parameters
    assert messages[("lora", "additive")] == (
        "additive has 5 parameters; needs at least 3 distinct values of N, got 1; at least 6 distinct (N, D) points, got 4"
    )
    assert messages[("steer_mean", "power_D")] == "power_D has 3 parameters; needs at least 4 distinct budgets, got 2"
    assert summary.analysis.crossovers == []  # steering has no curve to cross
    assert "not fitted" in pd.read_parquet(summary.paths["fits.parquet"])["status"].tolist()


def test_rows_outside_the_latest_plan_are_fitted_and_said_or_left_out_when_asked(tmp_path: Path) -> None:
    """A changed config reruns a method under the same name into the same directory. A stored row of
    a planned cell's slug (same model, task, method, budget, seed) whose planned cell has its own row is
    superseded and always left out, or the fit would count the cell twice; other rows outside the plan
    (a wider earlier run: seed 2 here) are fitted and said, and --planned-only leaves them out."""
    rng = np.random.default_rng(0)
    current = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, BUDGETS, seeds=2, noise=0.01, rng=rng)
    earlier = synthetic_rows({("t", "lora", "m1"): WORSE}, {"m1": 10**6}, BUDGETS, seeds=3, noise=0.01, rng=rng)
    earlier = [dict(r, cell_id=f"earlier-{r['cell_id']}") for r in earlier]
    extra = [r for r in earlier if r["seed"] == 2]  # no planned cell has these slugs
    write_cells(tmp_path, current + earlier)
    (tmp_path / "plan.json").write_text(json.dumps([{"cell_id": r["cell_id"], "slug": r["slug"], "model": "m1", "method": "lora"}
                                                    for r in current]))  # fmt: skip
    everything = analysis.fit_results(str(tmp_path), bootstrap=20)
    (mixed,) = [f for f in everything.analysis.fits if f.model == "m1"]
    assert len(mixed.points.value) == len(current) + len(extra)
    text = everything.to_text()
    assert f"{len(extra)} stored rows are of cells not in plan.json" in text
    assert f"{len(earlier) - len(extra)} stored rows left out: the plan's cell of the same model" in text
    planned = analysis.fit_results(str(tmp_path), bootstrap=20, planned_only=True)
    (fit,) = [f for f in planned.analysis.fits if f.model == "m1"]
    assert len(fit.points.value) == len(current) and fit.fit.params["E"] == pytest.approx(TUNE.e, abs=0.03)
    assert f"left out {len(extra)} stored rows of cells not in plan.json" in planned.to_text()


def test_a_planned_cell_that_failed_leaves_its_earlier_configs_row_in_the_fit(tmp_path: Path) -> None:
    """A changed config whose rerun of a cell failed: its earlier row was left out as superseded and the failed row kept,
    so the point had no data, where a planned cell not yet run keeps its earlier row (helper-177)."""
    rng = np.random.default_rng(0)
    current = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, BUDGETS, seeds=1, noise=0.01, rng=rng)
    earlier = [dict(r, cell_id=f"earlier-{r['cell_id']}") for r in current]
    current[0] = dict(current[0], status="failed", error="RuntimeError: boom", score=None)
    write_cells(tmp_path, current + earlier)
    (tmp_path / "plan.json").write_text(json.dumps([{"cell_id": r["cell_id"], "slug": r["slug"], "model": "m1", "method": "lora"}
                                                    for r in current]))  # fmt: skip
    from analysis.io import load_rows_to_fit

    loaded = load_rows_to_fit(str(tmp_path))
    assert (loaded.superseded, loaded.unplanned) == (len(current) - 1, 1)
    kept = loaded.frame[loaded.frame["status"] == "ok"]
    assert f"earlier-{current[0]['cell_id']}" in set(kept["cell_id"]) and len(kept) == len(current)


def test_rows_scored_on_an_older_version_of_their_tasks_data_are_left_out_and_said(tmp_path: Path) -> None:
    """A task whose splits changed gives its cells new ids; until the rerun has replaced every old
    row, the store holds rows scored on two test sets. Only the newest version's rows are fitted."""
    rng = np.random.default_rng(0)
    new = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, BUDGETS[:5], seeds=2, noise=0.01, rng=rng)
    old = synthetic_rows({("t", "lora", "m1"): WORSE}, {"m1": 10**6}, BUDGETS, seeds=2, noise=0.01, rng=rng)
    other = synthetic_rows({("u", "lora", "m1"): TUNE}, {"m1": 10**6}, BUDGETS, seeds=1, noise=0.01, rng=rng)
    new = [dict(r, versions=json.dumps({"task_data": {"t": 2}})) for r in new]  # the rerun so far: the smaller budgets
    old = [dict(r, cell_id=f"v1-{r['cell_id']}") for r in old]  # rows from before tasks recorded versions: 1
    write_cells(tmp_path, new + old + other)
    summary = analysis.fit_results(str(tmp_path), bootstrap=0)
    (fit,) = [f for f in summary.analysis.fits if f.task == "t" and f.model == "m1"]
    (untouched,) = [f for f in summary.analysis.fits if f.task == "u" and f.model == "m1"]
    assert len(fit.points.value) == len(new) and len(untouched.points.value) == len(other)
    assert f"{len(old)} stored rows left out: scored on an older version of their task's questions" in summary.to_text()


def test_empty_results_dir_does_not_crash(tmp_path: Path) -> None:
    (tmp_path / "cells").mkdir()  # a sweep's folder, no row in it yet
    summary = analysis.fit_results(str(tmp_path))
    assert "0 rows" in summary.to_text()


def test_analysis_imports_neither_workers_orchestrator_nor_torch() -> None:
    forbidden = {"workers", "orchestrator", "torch"}
    for path in Path(analysis.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & forbidden, path.name


def _same_fits(fits: list, reference: list) -> None:
    by_key = {(f.task, f.method, f.model, f.law.name, f.x): f for f in reference}
    for fit in fits:
        other = by_key[(fit.task, fit.method, fit.model, fit.law.name, fit.x)]
        assert fit.ok == other.ok and fit.message == other.message
        if fit.ok:
            np.testing.assert_array_equal(fit.fit.theta, other.fit.theta)
            if fit.boot is not None:
                np.testing.assert_array_equal(fit.boot.thetas, other.boot.thetas)


def test_analysis_in_worker_processes_equals_the_serial_one(results: Path, summary: analysis.FitSummary) -> None:
    parallel = analyse(analysis.load_results(str(results)), bootstrap=200, seed=0, workers=2)
    assert len(parallel.fits) == len(summary.analysis.fits)
    _same_fits(parallel.fits, summary.analysis.fits)
    same = json.dumps(parallel.axes.record(), default=str) == json.dumps(summary.analysis.axes.record(), default=str)  # NaN as NaN
    assert same  # every axis' joint laws, fitted in the pool too


def test_a_groups_bootstrap_does_not_depend_on_the_other_groups(results: Path, summary: analysis.FitSummary) -> None:
    """One method's rows alone (fitted after lora's in the whole run): each group draws its own
    bootstrap stream, seeded by its name, so its fit and intervals are those of the whole run."""
    frame = analysis.load_results(str(results)).frame
    subset = fit_curves(frame[frame["method"] == "steer_mean"], metric="score", bootstrap=200, seed=0)
    assert len(subset) == sum(f.method == "steer_mean" for f in summary.analysis.fits) > 4
    _same_fits(subset, summary.analysis.fits)


def test_rows_of_an_older_schema_load_beside_newer_ones(tmp_path: Path) -> None:
    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, (8, 16), seeds=1, noise=0.01, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows[:1])
    older = to_table(rows[1:]).drop_columns(["neutral_kl"])  # written before the column existed
    pq.write_table(older, tmp_path / "cells" / "older.parquet")
    frame = analysis.load_results(str(tmp_path)).frame.set_index("cell_id")
    assert frame.loc[rows[0]["cell_id"], "neutral_kl"] == pytest.approx(rows[0]["neutral_kl"])
    assert np.isnan(frame.loc[rows[1]["cell_id"], "neutral_kl"]) and frame.loc[rows[1]["cell_id"], "score"] == pytest.approx(rows[1]["score"])


def test_a_file_that_disagrees_on_a_column_type_still_loads(tmp_path: Path) -> None:
    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, (8, 16), seeds=1, noise=0.01, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows[:1])
    foreign = pd.DataFrame([{"cell_id": "x", "status": "ok", "model": "m1", "task": "t", "method": "lora", "budget": "32", "score": "0.5"}])
    pq.write_table(pa.Table.from_pandas(foreign), tmp_path / "cells" / "strings.parquet")  # numbers as text
    loaded = analysis.load_results(str(tmp_path))
    assert loaded.skipped == () and len(loaded.frame) == 2
    assert loaded.frame.set_index("cell_id").loc["x", "score"] == 0.5 and sorted(loaded.frame["budget"]) == [8, 32]


def test_rows_without_params_still_make_budget_curves(tmp_path: Path) -> None:
    """params_nonembed is N for the joint laws only: a model that did not record it keeps its budget
    curve, and its rows are counted as missing N (not as a missing metric) where N is needed."""
    rng = np.random.default_rng(0)
    sizes = {"m1": 1_000_000, "m2": 4_000_000, "m3": 16_000_000}
    rows = synthetic_rows({("t", "lora", m): TUNE for m in sizes}, sizes, BUDGETS[:4], seeds=2, noise=0.01, rng=rng)
    rows = [dict(r, params_nonembed=None, params_total=None) if r["model"] == "m1" else r for r in rows]
    write_cells(tmp_path, rows)
    frame = analysis.load_results(str(tmp_path)).frame
    fits = {(f.model, f.law.name): f for f in fit_curves(frame, metric="score", bootstrap=0, seed=0)}
    curve = fits[("m1", "power_D")]
    assert curve.ok and len(curve.points.value) == 8 and np.isnan(curve.n_params)
    assert (curve.excluded.nan, curve.excluded.no_x) == (0, 0)
    joint = fits[("*", "additive")].record()
    assert (joint["n_nan"], joint["n_no_x"], joint["n_points"]) == (0, 8, 16)
    assert "On t, on the largest model measured (m3)" in best_measured("t", frame[frame["status"] == "ok"], "score")


# what a fitted LawFit says of its bounds, for the hand-made curves below: nothing at a bound
UNBOUNDED = {"exponents_at_bounds": dict, "floor_asymptote": lambda: False, "capped_coefficients": list, "worsening": ""}


def test_the_data_efficiency_interval_counts_the_resamples_that_never_reach_the_gain() -> None:
    """A fifth of the resamples put the asymptote above the base model's loss: they never reach half the gain,
    so they need more than any budget. Left out, the interval read [10.8, 22.8], as if those did not exist."""
    rng = np.random.default_rng(0)
    params = {"E": np.where(np.arange(100) < 20, 0.85, 0.3), "B": rng.uniform(0.8, 1.2, 100), "beta": np.full(100, 0.5)}
    curve = SimpleNamespace(ok=True, joint=False, task="t", method="lora", model="m", n_params=1e6, metric="score",
                            fit=SimpleNamespace(params={"E": 0.3, "B": 1.0, "beta": 0.5}), boot=SimpleNamespace(params=lambda: params, questions=0),
                            points=SimpleNamespace(d=np.array([4.0, 1024.0])), **UNBOUNDED)  # fmt: skip
    base = pd.DataFrame({"task": ["t"], "model": ["m"], "method": ["base"], "score_base": [0.2]})  # base loss 0.8
    (half,) = data_efficiency([curve], base, fractions=(0.5,))
    assert half.examples == pytest.approx(16.0) and half.finite_share == 0.8
    assert 10 < half.examples_lo < 16 and half.examples_hi == np.inf
    assert _examples_needed(half).startswith(f"16 [{half.examples_lo:.3g}, > 1.02e+05] (the interval reaches past the largest budget measured, 1024)")


def test_a_data_efficiency_outside_the_measured_budgets_is_extrapolated(summary: analysis.FitSummary) -> None:
    """m3's steering curve reaches half its gain over the base model at D ≈ 2, below the smallest budget (8):
    that is the law's extrapolation. An asymptote equal to the base model's level has no D_x at all."""
    found = {(e.task, e.method, e.model, e.fraction): e for e in summary.analysis.efficiency}
    below = found[("facts", "steer_mean", "m3", 0.5)]
    assert below.examples < 8 and below.extrapolated and below.smallest_budget == 8 and below.finite_share == 1
    assert not found[("facts", "lora", "m1", 0.5)].extrapolated
    assert np.isnan(examples_to_reach({"E": 0.8 - 1e-15, "B": 1e-13, "beta": 1.75}, 0.8, 0.5)).all()  # flat at the base level


def test_a_d_x_past_float_range_is_counted_as_one_not_as_none() -> None:
    """β = 0.00145 (a curve that barely rises) puts 90 % of the gain at 10^(hundreds): inf in floats. The
    report said "none: the asymptote does not beat the base model" of an asymptote of 0 against a base of 0.775."""
    d = examples_to_reach({"E": 0.0, "B": 0.78, "beta": 0.00145}, 0.775, 0.9)
    assert np.isposinf(d).all()
    params = {"E": np.zeros(10), "B": np.full(10, 0.78), "beta": np.full(10, 0.00145)}
    curve = SimpleNamespace(ok=True, joint=False, task="t", method="lora", model="m", n_params=1e6, metric="score",
                            fit=SimpleNamespace(params={k: v[0] for k, v in params.items()}), boot=SimpleNamespace(params=lambda: params, questions=0),
                            points=SimpleNamespace(d=np.array([4.0, 256.0])), **UNBOUNDED)  # fmt: skip
    base = pd.DataFrame({"task": ["t"], "model": ["m"], "method": ["base"], "score_base": [0.225]})
    (ninety,) = data_efficiency([curve], base, fractions=(0.9,))
    assert ninety.finite_share == 1.0
    assert _examples_needed(ninety).startswith("> 100× the largest budget measured (256)"), _examples_needed(ninety)


def _falling_rows(scores: tuple[float, ...]) -> pd.DataFrame:
    """One steering curve over budgets 8–2048, 2 seeds .005 apart, far above the base model's .2."""
    return pd.DataFrame([{"status": "ok", "task": "t", "method": "steer_mean", "model": "m", "params_nonembed": 1e6, "budget": budget,
                          "seed": seed, "score": score + 0.005 * seed, "score_base": 0.2}
                         for budget, score in zip((8, 32, 128, 512, 2048), scores) for seed in (0, 1)])  # fmt: skip


@pytest.mark.parametrize("scores", [(0.62, 0.60, 0.58, 0.56, 0.55), (0.6,) * 5], ids=["falling", "level"])
def test_a_curve_above_the_base_model_with_a_flat_exponent_reaches_its_gain_at_every_budget(scores: tuple[float, ...]) -> None:
    """Scores of .55 to .62 against a base model's .2. Falling, they fit β = 0 at its bound (the curve is the constant
    E + B): D_x read "none: the asymptote does not beat the base model" and every resample counted as never reaching
    it (finite share 0), while level scores (β = 2.35, B = e^-30) read "< 8": the verdict flipped with the noise.
    Falling past the seeds' noise, the law does not describe them, and that D_x is no finding (helper-127)."""
    from analysis.curves import GroupJob, fit_group
    from analysis.laws import POWER_D

    rows = _falling_rows(scores)
    curve = fit_group(GroupJob("t", "steer_mean", "m", POWER_D, rows, "score", None, 50, 0))
    found = data_efficiency([curve], rows)
    assert [e.fraction for e in found] == [0.5, 0.9]
    for e in found:
        assert (e.examples, e.examples_lo, e.finite_share) == (0, 0, 1), e  # every resample reaches it, some at once
        text = _examples_needed(e)  # with its interval where resamples reach past the data (the level case)
        assert text.startswith("< 8") and "the smallest budget measured: reached before the data start (extrapolated)" in text, text
        worse = " — not a finding: score worsens as the budget grows (0.623 at D=8, 0.552 at D=2048; past noise)"
        assert (worse in text) == (scores[0] != scores[-1]) and (e.caveat != "") == (scores[0] != scores[-1]), text


def test_a_d_x_that_the_exponents_bound_sets_is_no_finding(tmp_path) -> None:
    """Scores at the base level at D=4, then a jump by D=32: the fit puts β at its upper bound (a step), and D_x at
    4·2^(1/3) or so whatever the scores after the jump: it read "4.99 [4.97, 5.11]", a tight interval of the bound's."""
    from analysis.curves import GroupJob, fit_group
    from analysis.io import write_json
    from analysis.laws import POWER_D

    level = {32: 0.60, 256: 0.55, 1024: 0.50}
    rows = pd.DataFrame([{"task": "t", "model": "m", "method": "full_ft", "budget": b, "seed": s, "status": "ok", "score_base": 0.2,
                          "params_nonembed": 1e6, "score": (0.2 if b == 4 else level[b]) + (0.01 if s else -0.01)}
                         for b in (4, 32, 256, 1024) for s in (0, 1)])  # fmt: skip
    curve = fit_group(GroupJob("t", "full_ft", "m", POWER_D, rows, "score", None, 50, 0))
    assert curve.exponents_at_bounds() == {"beta": 1}
    for e in data_efficiency([curve], rows):
        assert 4 < e.examples < 32 and e.caveat.startswith("beta at its upper bound")
        assert _examples_needed(e).endswith(f"— not a finding: {e.caveat}")
    # a resample past every budget stays apart from a missing interval in fits.json: "inf", not null
    saved = json.loads(Path(write_json(str(tmp_path), "e.json", [{"hi": np.inf, "lo": -np.inf, "none": np.nan}])).read_text())
    assert saved == [{"hi": "inf", "lo": "-inf", "none": None}] and float(saved[0]["hi"]) == np.inf


def test_a_constant_curve_is_judged_by_its_level_e_plus_b() -> None:
    """β = 0: the curve is E + B at every budget, so that, not E, is what must beat the base model's loss."""
    assert examples_to_reach({"E": 0.3, "B": 0.1, "beta": 0.0}, 0.8, 0.5).tolist() == [0.0]
    assert np.isnan(examples_to_reach({"E": 0.3, "B": 0.1, "beta": 0.0}, 0.35, 0.5)).all()  # level .4: worse than the base's .35


def test_a_small_gain_is_not_reached_before_the_data_where_b_is_negligible_next_to_e_alone() -> None:
    """E .5, B 4e-4 (under a thousandth of E), β .1, base .502: the law reaches 90 % of the .002 gain at D = 1024; the
    B term was called negligible next to E and D_90 said 0, reached before the data start (helper-139)."""
    assert examples_to_reach({"E": 0.5, "B": 4e-4, "beta": 0.1}, 0.502, 0.9) == pytest.approx(1024)
    assert examples_to_reach({"E": 0.5, "B": 1e-7, "beta": 0.1}, 0.8, 0.9).tolist() == [0.0]  # negligible next to both


def _cell(cell_id: str, model: str, seed: int = 0) -> dict:
    slug = f"{model.rstrip('/').split('/')[-1]}__t__lora__n64__s{seed}"  # as workers/cell.py builds it: the id's tail only
    return {"schema_version": 1, "sweep": "s", "cell_id": cell_id, "slug": slug, "status": "ok", "model": model, "task": "t",
            "method": "lora", "budget": 64, "seed": seed, "score": 0.5}  # fmt: skip


def test_an_unplanned_model_sharing_a_planned_cells_slug_is_not_superseded(tmp_path: Path) -> None:
    """Slugs name a model by the tail of its id: a local checkpoint .../pythia-160m and EleutherAI/pythia-160m share
    `pythia-160m__t__lora__n64__s0`, as do ladder:recipeA/xs and ladder:recipeB/xs. The checkpoint's row was left
    out as the planned hub model's, "superseded"; only an earlier row of the same model, task, method, budget and
    seed is."""
    from analysis.io import Plan, load_rows_to_fit

    rows = [_cell("new", "EleutherAI/pythia-160m"), _cell("ckpt", "/ckpt/my-finetuned/pythia-160m"),
            _cell("earlier", "EleutherAI/pythia-160m"), _cell("seed1", "EleutherAI/pythia-160m", seed=1),
            _cell("ladder-a", "ladder:recipeA/xs"), _cell("ladder-b", "ladder:recipeB/xs")]  # fmt: skip
    write_cells(tmp_path, rows)
    (tmp_path / "plan.json").write_text(json.dumps([{"cell_id": r["cell_id"], "slug": r["slug"], "model": r["model"], "method": "lora"}
                                                    for r in rows if r["cell_id"] in ("new", "ladder-a")]))  # fmt: skip
    loaded = load_rows_to_fit(str(tmp_path))
    assert sorted(loaded.frame["cell_id"]) == ["ckpt", "ladder-a", "ladder-b", "new", "seed1"]
    assert (loaded.superseded, loaded.unplanned) == (1, 3)
    yaml_grid = load_rows_to_fit(str(tmp_path), plan=Plan("x.yaml's grid", frozenset({"new", "ladder-b"})))
    assert sorted(yaml_grid.frame["cell_id"]) == ["ckpt", "ladder-a", "ladder-b", "new", "seed1"] and yaml_grid.superseded == 1


@pytest.mark.parametrize("plan", ['{"a": 1}', '[{"slug": "x"}]', "[1, 2]", '"cells"', "null", '[{"cell_id": ["x"]}]'])
def test_a_plan_of_the_wrong_shape_is_read_as_no_plan(tmp_path: Path, plan: str) -> None:
    """plan.json that is JSON but not a list of cells with ids (a file edited or written by something else) raised a
    TypeError or KeyError out of `steerscale fit`; like a damaged one, it is no plan: every row is fitted, and
    --planned-only, which would then leave out nothing it asked to, is refused (it fitted every row, silently)."""
    rows = synthetic_rows({("t", "lora", "m1"): TUNE}, {"m1": 10**6}, BUDGETS[:4], seeds=1, noise=0.01, rng=np.random.default_rng(0))
    write_cells(tmp_path, rows)
    (tmp_path / "plan.json").write_text(plan)
    summary = analysis.fit_results(str(tmp_path), bootstrap=0)
    (curve,) = [f for f in summary.analysis.fits if f.model == "m1"]
    assert len(curve.points.value) == 4 and summary.analysis.loaded.unplanned == 0
    with pytest.raises(analysis.NoResultsError, match="--planned-only needs the sweep's plan: .* has no readable plan.json"):
        analysis.fit_results(str(tmp_path), bootstrap=0, planned_only=True)
