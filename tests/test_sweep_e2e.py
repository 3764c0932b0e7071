"""End to end on a real local Ray: CLI -> grid -> Ray tasks -> real training -> Parquet -> rerun."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest


def steerscale(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=900, env=env
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, test_ladder):
    root = tmp_path_factory.mktemp("e2e")
    import yaml

    (root / "broken-model").mkdir()  # a broken checkpoint: it passes planning, and loading it fails in every cell
    for name in ("config.json", "tokenizer.json", "model.safetensors"):  # every file plan looks for, none loadable
        (root / "broken-model" / name).write_text("{}")

    spec = {
        "sweep": "e2e",
        "results_dir": str(root / "results"),
        "models": [{"id": m} for m in test_ladder] + [{"id": str(root / "broken-model")}],
        "tasks": ["facts"],
        "methods": {"base": {}, "steer_mean": {"scales": [0.0, 1.0, 4.0]}, "lora": {"rank": 2, "train": {"lr": 3e-2, "checkpoints": 0}}},  # always keep the trained LoRA
        "budgets": [8, 32],
        "method_budgets": {"base": [0]},
        "eval": {"test_size": 60, "validation_size": 16, "neutral_size": 4},
        "resources": {"cpus_per_cell": 1},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    # without RAY_AUTH_MODE, as a user's shell has it (a ray.init in this pytest process sets it to token, which
    # every later subprocess would inherit: Ray's notice about it, checked below, is printed only where it is unset)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    first = steerscale("run", str(path), "--no-progress", "--no-dashboard", env=env)
    return path, root / "results", first


def test_every_cell_has_exactly_one_row_and_ok_rows_are_real(sweep):
    _, results, first = sweep
    assert first.returncode == 0, first.stderr[-3000:]
    assert "RAY_AUTH_MODE=disabled" not in first.stderr  # Ray's notice inviting a private Ray's user to turn its authentication off
    table = pq.read_table(results / "cells").to_pandas()
    assert len(table) == 15 and table.cell_id.is_unique  # 3 models x (1 base + 2x2) cells
    ok = table[table.status == "ok"]
    assert len(ok) == 10
    assert ok.score.between(0, 1).all() and ok.nll.gt(0).all() and ok.params_nonembed.gt(0).all()
    lora = ok[ok.method == "lora"]
    assert (lora.trainable_params > 0).all() and (lora.post_train_flops > 0).all()
    # a method may choose "do nothing" on validation; then, and only then, nothing may have changed
    untouched = ok[ok.neutral_kl.abs() < 1e-12]
    assert (untouched.score == untouched.score_base).all() and (untouched.nll - untouched.nll_base).abs().max() < 1e-6
    assert (lora.neutral_kl > 0).all(), "a LoRA kept after training must move the next-token distribution"
    base = ok[ok.method == "base"]
    assert (base.score == base.score_base).all() and (base.neutral_kl.abs() < 1e-9).all()
    steer = ok[ok.method == "steer_mean"]
    assert steer.alpha.isin([0.0, 1.0, 4.0]).all() and steer.selection.eq("shared_validation_nll").all()
    assert ((steer.alpha > 0) == (steer.neutral_kl > 0)).all(), "a non-zero vector must shift the distribution"
    # the bigger rung has more parameters: the two ladder sizes really differ
    assert ok.groupby("model").params_nonembed.first().nunique() == 2


def test_a_failing_cell_is_a_failed_row_and_the_sweep_goes_on(sweep):
    _, results, first = sweep
    table = pq.read_table(results / "cells").to_pandas()
    failed = table[table.status == "failed"]
    assert len(failed) == 5 and failed.model.str.endswith("broken-model").all()
    assert failed.error.str.len().gt(0).all() and failed.score.isna().all()
    assert "5 failed" in first.stdout


def test_rerun_runs_nothing_twice(sweep):
    path, results, _ = sweep
    before = {p.name: p.stat().st_mtime_ns for p in (results / "cells").iterdir()}
    again = steerscale("run", str(path), "--no-progress", "--no-dashboard")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (results / "cells").iterdir()}
    assert after == before


def test_plan_and_status_read_the_store(sweep):
    path, results, _ = sweep
    plan = steerscale("plan", str(path))
    assert plan.returncode == 0 and "grid: 15 cells" in plan.stdout and "done 10 · failed 5 · to run 0" in plan.stdout
    # two budgets per trained method: said before anything runs, not first by `fit`
    assert "needs at least 4 distinct budgets > 0; these methods have fewer: lora (2), steer_mean (2)" in plan.stdout
    for where in (results, path):  # the results directory, or the sweep's YAML naming it
        status = steerscale("status", str(where))
        assert status.returncode == 0 and "10 ok, 5 failed, 0 remaining" in status.stdout, status.stdout + status.stderr
        # why they failed, without pandas: the five cells of the model that cannot load share one error
        failures = status.stdout.split("failed cells, by error")[1].splitlines()[1:]
        assert len(failures) == 1 and failures[0].startswith("  5 × ") and "Error" in failures[0], status.stdout


def test_plan_estimates_the_compute_to_go_from_stored_cells(sweep):
    """A second seed doubles the grid: its cells should take about what the first seed's took, model, method and budget
    alike (each priced on the line through its model and method's stored cells; tiny cells' times are noisy)."""
    path, results, _ = sweep
    ok = pq.read_table(results / "cells").to_pandas().query("status == 'ok'")
    expected = float((ok.train_seconds + ok.eval_seconds).sum())
    plan = steerscale("plan", str(path), "seeds=[0, 1]")
    assert plan.returncode == 0, plan.stderr
    amount, unit = re.search(r"cell compute to go: ≈ ([\d.]+) (s|min) over 10 cells", plan.stdout).groups()
    assert float(amount) * (60 if unit == "min" else 1) == pytest.approx(expected, rel=0.3, abs=1.0), (plan.stdout, expected)
    assert "5 cells have no stored cell of their model and method" in plan.stdout  # the broken model has no ok cell


def test_retry_failed_reruns_only_the_failed_cells(sweep):
    path, results, _ = sweep
    ok_before = {p.name: p.stat().st_mtime_ns for p in (results / "cells").iterdir()}
    rerun = steerscale("run", str(path), "--no-progress", "--no-dashboard")  # without the flag: nothing runs, and it says why
    assert rerun.returncode == 0 and "0 to run" in rerun.stdout, rerun.stdout + rerun.stderr[-2000:]
    assert "5 stored cells failed and are not rerun; rerun them with --retry-failed" in rerun.stdout
    retry = steerscale("run", str(path), "--retry-failed", "--no-progress", "--no-dashboard")
    assert retry.returncode == 0 and "5 to run" in retry.stdout, retry.stdout + retry.stderr[-2000:]
    table = pq.read_table(results / "cells").to_pandas()
    changed = {name for name, t in ok_before.items() if (results / "cells" / name).stat().st_mtime_ns != t}
    assert changed == {f"{cid}.parquet" for cid in table[table.status == "failed"].cell_id}


def test_a_single_cell_runs_without_ray(tmp_path, sweep):
    """`python -m workers.run_cell cell.json out.parquet` on a machine where Ray cannot be imported."""
    from orchestrator.grid import expand
    from orchestrator.spec import load_spec

    path, _, _ = sweep
    cell = next(c.config for c in expand(load_spec(path)) if c.config.method == "steer_mean")
    printed = steerscale("plan", str(path), "--cell", cell.slug)  # what the README tells a user to run
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "cell.json").write_text(printed.stdout)
    blocker = "import runpy, sys; sys.modules['ray'] = None; sys.argv = ['run_cell'] + sys.argv[1:]; runpy.run_module('workers.run_cell', run_name='__main__')"
    out = subprocess.run(
        [sys.executable, "-c", blocker, str(tmp_path / "cell.json"), str(tmp_path / "out.parquet")],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    row = pq.read_table(tmp_path / "out.parquet").to_pylist()[0]
    assert row["status"] == "ok" and row["cell_id"] == cell.cell_id and row["slug"] == cell.slug
