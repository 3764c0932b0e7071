"""`steerscale fit` from the command line: what it fits is what the flags ask for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis.synthetic import TrueCurve, synthetic_rows
from orchestrator.cli import main
from workers.schema import to_table


def test_fit_metric_nll_fits_the_nll_column(tmp_path: Path, capsys) -> None:
    """The NLL is twice the score's loss here, so its fitted floor E and coefficient B are twice the
    score's and its exponent the same; `--metric score` (the default) still fits the score. Each metric has its own
    files (fits.json, fits-nll.json): fitting the NLL leaves the score's fits as they were."""
    rows = synthetic_rows({("facts", "lora", "m1"): TrueCurve(0.1, 1.5, 0.5)}, {"m1": 10**6}, (4, 8, 16, 32, 64, 128, 256),
                          seeds=2, noise=0.0, rng=np.random.default_rng(0))  # fmt: skip
    (tmp_path / "cells").mkdir()
    for row in rows:
        pq.write_table(to_table([{**row, "nll": 2.0 * (1.0 - row["score"])}]), tmp_path / "cells" / f"{row['cell_id']}.parquet")

    def fitted(metric: str) -> dict:
        assert main(["fit", str(tmp_path), "--metric", metric, "--bootstrap", "0", "--workers", "1"]) == 0
        saved = json.loads((tmp_path / ("fits.json" if metric == "score" else f"fits-{metric}.json")).read_text())
        assert saved["metric"] == metric and saved["bootstrap"] == 0 and saved["planned_only"] is False  # how it was fitted
        (curve,) = [f for f in saved["fits"] if f["method"] == "lora" and f["law"] == "power_D"]
        return curve

    score, nll = fitted("score"), fitted("nll")
    assert json.loads((tmp_path / "fits.json").read_text())["metric"] == "score"
    assert set(pq.read_table(tmp_path / "fits-nll.parquet").column("E").to_pylist()) != set(pq.read_table(tmp_path / "fits.parquet").column("E").to_pylist())
    assert np.isclose(score["E"], 0.1, rtol=1e-3) and np.isclose(nll["E"], 0.2, rtol=1e-3)
    assert np.isclose(nll["B"], 2 * score["B"], rtol=1e-3) and np.isclose(nll["beta"], score["beta"], rtol=1e-3)
    # another axis has its own files too: `fit --x neutral_loss` replaced the fits.json a report had been written from (helper-141)
    assert main(["fit", str(tmp_path), "--x", "neutral_loss", "--bootstrap", "0", "--workers", "1"]) == 0
    assert json.loads((tmp_path / "fits-neutral_loss.json").read_text())["x"] == "neutral_loss"
    assert json.loads((tmp_path / "fits.json").read_text())["x"] == "params"
    capsys.readouterr()


def test_fit_of_a_sweep_yaml_with_planned_only_fits_that_yamls_grid_not_the_latest_plan(tmp_path: Path, write_sweep, capsys) -> None:
    """Another sweep run into the same directory last wrote plan.json: `fit MINE.yaml --planned-only`
    fits the cells of MINE.yaml, and says how many stored rows it left out."""
    from orchestrator.grid import expand
    from orchestrator.spec import load_spec
    from orchestrator.store import ResultsStore, write_manifest

    budgets = (4, 8, 16, 32, 64)
    path = write_sweep({"sweep": "mine", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "methods": {"steer_mean": {}},
                        "budgets": list(budgets), "seeds": [0]})  # fmt: skip
    spec = load_spec(str(path), [], check_models=False)
    planned = {c.config.budget: c for c in expand(spec)}
    mine = synthetic_rows({("facts", "steer_mean", "ladder:test/xs"): TrueCurve(0.1, 1.5, 0.5)}, {"ladder:test/xs": 10**6}, budgets,
                          seeds=1, noise=0.0, rng=np.random.default_rng(0))  # fmt: skip
    mine = [{**row, "cell_id": planned[row["budget"]].cell_id, "slug": planned[row["budget"]].config.slug} for row in mine]
    theirs = synthetic_rows({("facts", "steer_mean", "ladder:test/xs"): TrueCurve(0.5, 1.5, 0.5)}, {"ladder:test/xs": 10**6}, (128, 256, 512),
                            seeds=1, noise=0.0, rng=np.random.default_rng(1))  # another sweep's cells, another config  # fmt: skip
    theirs = [{**row, "cell_id": f"theirs{i}", "slug": f"theirs{i}"} for i, row in enumerate(theirs)]
    cells = Path(spec.results_dir) / "cells"
    cells.mkdir(parents=True)
    for row in mine + theirs:
        pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")
    write_manifest(ResultsStore(spec.results_dir), [{"cell_id": r["cell_id"], "slug": r["slug"], "model": r["model"], "method": r["method"]} for r in theirs])
    capsys.readouterr()
    assert main(["fit", str(path), "--planned-only", "--bootstrap", "0", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"left out 3 stored rows of cells not in {path}'s grid" in out, out
    (curve,) = [f for f in json.loads((Path(spec.results_dir) / "fits.json").read_text())["fits"] if f["law"] == "power_D"]
    assert curve["n_points"] == len(budgets) and np.isclose(curve["E"], 0.1, rtol=1e-3), curve
    # run with overrides: the same overrides give the grid that ran
    assert main(["fit", str(path), "budgets=[4,8,16]", "--planned-only", "--bootstrap", "0", "--workers", "1"]) == 0
    assert f"left out 5 stored rows of cells not in {path}'s grid (with budgets=[4,8,16])" in capsys.readouterr().out


def test_fit_of_a_folder_that_is_no_sweep_is_refused_and_writes_nothing(tmp_path: Path, capsys) -> None:
    """The parent of results dirs, or a sweep's own cells/: fitting either wrote fits.parquet and
    fits.json into it (in cells/, files that broke reading the rows as one Parquet dataset) and exited 0."""
    rows = synthetic_rows({("facts", "lora", "m1"): TrueCurve(0.1, 1.5, 0.5)}, {"m1": 10**6}, (4, 8, 16, 32),
                          seeds=1, noise=0.0, rng=np.random.default_rng(0))  # fmt: skip
    cells = tmp_path / "sweep" / "cells"
    cells.mkdir(parents=True)
    for row in rows:
        pq.write_table(to_table([row]), cells / f"{row['cell_id']}.parquet")
    for wrong in (tmp_path, cells, cells / f"{rows[0]['cell_id']}.parquet"):
        before = sorted(p.name for p in wrong.parent.rglob("*"))
        assert main(["fit", str(wrong), "--bootstrap", "0", "--workers", "1"]) == 2
        assert "give a sweep's results_dir" in capsys.readouterr().err
        assert sorted(p.name for p in wrong.parent.rglob("*")) == before
    assert main(["fit", str(tmp_path / "sweep"), "--bootstrap", "0", "--workers", "1"]) == 0  # cells/ without a plan: rows written some other way
    capsys.readouterr()


def test_status_of_a_file_and_plan_of_a_directory_are_clean_errors(tmp_path: Path, capsys) -> None:
    """`status some.json` and `plan results/x` ended in NotADirectoryError / IsADirectoryError tracebacks, exit 1."""
    afile = tmp_path / "fits.json"
    afile.write_text("{}")
    assert main(["status", str(afile)]) == 2
    assert "is a file: give a sweep's results_dir" in capsys.readouterr().err
    assert main(["plan", str(tmp_path)]) == 2
    assert "a directory; give a sweep config" in capsys.readouterr().err


def test_too_few_resamples_and_a_missing_sweep_yaml_are_refused(capsys):
    """`--bootstrap 1` printed "D* ≈ 4.14 CI [4.22, 4.22]": a point outside its own interval. `status nope.yaml`
    said "no sweep at nope.yaml", as if a results folder were missing."""
    from orchestrator.cli import parse

    assert parse(["fit", "r", "--bootstrap", "40"]).bootstrap == 40 and parse(["fit", "r", "--bootstrap", "0"]).bootstrap == 0
    with pytest.raises(SystemExit):
        parse(["fit", "r", "--bootstrap", "5"])
    assert "5 resamples cannot give a 95 % interval; give 0 (no intervals) or at least 40" in capsys.readouterr().err
    for command in ("status", "fit"):
        assert main([command, "nope.yaml"]) == 2
        assert "error: nope.yaml: no such sweep config" in capsys.readouterr().err


def test_a_sweep_yamls_relative_results_dir_is_named_in_full_when_nothing_is_there(tmp_path: Path, monkeypatch, capsys) -> None:
    """`status` of a YAML run from another directory read "res: 0 ok, 0 failed, 8 remaining" (exit 0), and
    `fit` "no results directory res": neither said where it had looked."""
    config = tmp_path / "sweep.yaml"
    config.write_text(Path("configs/quickstart.yaml").read_text() + "results_dir: res\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{elsewhere / 'res'}: 0 ok, 0 failed, ")
    assert f"nothing is stored at {elsewhere / 'res'} yet (a relative results_dir is read from the current directory, {elsewhere})" in out
    for command in ("fit", "report"):
        assert main([command, str(config)]) == 2
        err = capsys.readouterr().err  # given the YAML, "give a sweep's results_dir, or its YAML" read as a wrong argument
        assert f"nothing is stored at {elsewhere / 'res'} yet: `steerscale run {config}` stores its sweep's rows there" in err
        assert f"(a relative results_dir is read from the current directory, {elsewhere})" in err


def test_an_absolute_results_dir_gets_no_relative_hint_and_a_cells_folder_names_its_parent(tmp_path: Path, monkeypatch, capsys) -> None:
    """`status` of a YAML whose absolute results_dir was never run said a relative one is read from the current
    directory; `status`/`fit` of a sweep's cells/ folder said "no sweep" without naming the folder holding it."""
    config = tmp_path / "sweep.yaml"
    config.write_text(Path("configs/quickstart.yaml").read_text() + f"results_dir: {tmp_path / 'res'}\n")
    assert main(["status", str(config)]) == 0
    assert f"nothing is stored at {tmp_path / 'res'} yet\n" in capsys.readouterr().out
    assert main(["fit", str(config)]) == 2
    assert "relative" not in capsys.readouterr().err
    (tmp_path / "sweep" / "cells").mkdir(parents=True)
    (tmp_path / "sweep" / "plan.json").write_text("{}")
    for command in ("status", "fit"):
        assert main([command, str(tmp_path / "sweep" / "cells")]) == 2
        assert f"that is a sweep's cells/ folder: give the folder holding it, {tmp_path / 'sweep'}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "sweep")  # `fit cells` from inside the sweep: the folder holding it is named in full
    assert main(["fit", "cells"]) == 2
    assert f"give the folder holding it, {tmp_path / 'sweep'}" in capsys.readouterr().err


def test_the_command_that_would_store_a_yamls_rows_keeps_its_overrides(tmp_path: Path, capsys) -> None:
    """`fit q.yaml results_dir=X` said to run `steerscale run q.yaml`, which stores the rows in q.yaml's own folder."""
    config = tmp_path / "sweep.yaml"
    config.write_text(Path("configs/quickstart.yaml").read_text())
    assert main(["fit", str(config), f"results_dir={tmp_path / 'my results'}"]) == 2
    assert f"`steerscale run {config} 'results_dir={tmp_path / 'my results'}'` stores" in capsys.readouterr().err


def test_an_empty_out_is_refused_not_read_as_the_current_directory(tmp_path: Path, monkeypatch, capsys) -> None:
    """`report r --out "$OUT"` with OUT unset wrote report.md, report.html and the plots over the current directory's."""
    from orchestrator.cli import parse

    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        with pytest.raises(SystemExit):
            parse(["report", "r", "--out", empty])
        assert "argument --out: an empty directory name" in capsys.readouterr().err
    assert parse(["report", "r", "--out", "rep"]).out == "rep" and list(tmp_path.iterdir()) == []


def test_a_uri_out_is_refused_not_made_a_local_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """`report r --out s3://bucket/rep` wrote ./s3:/bucket/rep/report.html and said so, exit 0."""
    from orchestrator.cli import parse

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse(["report", "r", "--out", "s3://bucket/rep"])
    assert "argument --out: s3://bucket/rep is a URI; the report is written to a local folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fit", "report"])
def test_fit_and_report_of_rows_with_nothing_to_fit_exit_non_zero(tmp_path: Path, command: str, capsys) -> None:
    """A sweep whose every cell failed (or whose files are all unreadable) printed "0 cells …" and exited 0,
    which a script running `steerscale report` read as success."""
    from datetime import datetime, timezone

    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    now = datetime.now(timezone.utc)
    ResultsStore(str(tmp_path / "r")).write({"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "a", "slug": "a",
                                             "status": "failed", "error": "boom", "started_at": now, "finished_at": now})  # fmt: skip
    (tmp_path / "r" / "cells" / "junk.parquet").write_bytes(b"not parquet")
    earlier = {tmp_path / "r" / "fits.json": "{}", tmp_path / "rep" / "report.md": "# an earlier report"}
    (tmp_path / "rep").mkdir()
    for path, text in earlier.items():
        path.write_text(text)
    out = ["--out", str(tmp_path / "rep")] if command == "report" else []
    assert main([command, str(tmp_path / "r"), "--bootstrap", "0", *out]) == 1
    assert f"error: {tmp_path / 'r'} holds no ok rows to fit (1 failed row; 1 unreadable file)" in capsys.readouterr().err
    # nothing to fit does not replace an earlier fit or report with an empty one
    assert all(path.read_text() == text for path, text in earlier.items()) and not (tmp_path / "r" / "fits.parquet").exists()


def test_a_sweep_that_only_failed_gets_its_empty_report_after_fit_ran_first(tmp_path: Path, capsys) -> None:
    """`fit` wrote the empty fits.json, which `report` then took for an earlier fit to keep: no report at all, and
    `fit` said "any earlier fit and report are kept" right after "wrote …/fits.json"."""
    from datetime import datetime, timezone

    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    now = datetime.now(timezone.utc)
    ResultsStore(str(tmp_path / "r")).write({"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "a", "slug": "a",
                                             "status": "failed", "error": "boom", "started_at": now, "finished_at": now})  # fmt: skip
    assert main(["fit", str(tmp_path / "r"), "--bootstrap", "0"]) == 1
    err = capsys.readouterr().err
    assert "holds no ok rows to fit" in err and "kept" not in err and (tmp_path / "r" / "fits.json").exists()
    assert main(["report", str(tmp_path / "r"), "--bootstrap", "0"]) == 1
    assert capsys.readouterr().err.rstrip().endswith("; the earlier fit is kept as it was")  # fit's empty fits.json; the report is new
    page = (tmp_path / "r" / "report" / "report.md").read_text()  # a failed row naming no task is not "an older version" of one
    assert "1 cells (1 failed)" in page and "older version" not in page, page
    assert main(["report", str(tmp_path / "r"), "--bootstrap", "0"]) == 1  # now there is one to keep
    assert "the earlier fit and report are kept as they were" in capsys.readouterr().err


def test_fit_says_planned_only_left_every_row_out(tmp_path: Path, capsys) -> None:
    """Every row ok but none in the plan: "holds no ok rows to fit (see above: failed rows, unreadable files)"
    named two causes that were not there and not the one that was."""
    import json
    from datetime import datetime, timezone

    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    now = datetime.now(timezone.utc)
    ResultsStore(str(tmp_path / "r")).write({"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "a", "slug": "a",
                                             "status": "ok", "started_at": now, "finished_at": now})  # fmt: skip
    (tmp_path / "r" / "plan.json").write_text(json.dumps([{"cell_id": "b", "slug": "b"}]))
    assert main(["fit", str(tmp_path / "r"), "--bootstrap", "0", "--planned-only"]) == 1
    assert "holds no ok rows to fit (1 row of cells plan.json does not list, left out by --planned-only)" in capsys.readouterr().err
