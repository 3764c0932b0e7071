"""Malformed sweeps fail before anything runs: exit status 2, one paragraph naming the problem, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from workers.tasks import get_task

GOOD = {
    "sweep": "bad",
    "models": [{"id": "ladder:test/xs"}],
    "tasks": ["facts"],
    "methods": {"base": {}, "lora": {}},
    "budgets": [4],
}

CASES = {
    "unknown key": ({**GOOD, "seedz": [0]}, "seedz: unknown key (did you mean 'seeds'?)"),
    "wrong type": ({**GOOD, "budgets": "many"}, "budgets: Input should be a valid list"),
    "negative budget": ({**GOOD, "budgets": [-4]}, "budgets must be >= 0"),
    "negative seed": ({**GOOD, "seeds": [0, -1]}, "seeds must be between 0 and 2**32 - 1"),
    "unknown method": ({**GOOD, "methods": {"steer_maen": {}}}, "unknown method 'steer_maen' (did you mean 'steer_mean'?)"),
    "unknown task": ({**GOOD, "tasks": ["gridwrld"]}, "unknown task 'gridwrld' (did you mean 'gridworld'?)"),
    "empty grid": ({**GOOD, "models": []}, "models: List should have at least 1 item"),
    "budget larger than the dataset": (
        {**GOOD, "budgets": [4, 5000]},
        f"budgets: task 'facts' has only {get_task('facts').pool_size('train')} distinct training examples, but the sweep asks for a budget of 5000;",
    ),
    "a method's budget larger than the dataset": (  # named `budgets`, the key the value was not under
        {**GOOD, "method_budgets": {"lora": [4, 6000]}},
        f"method_budgets.lora: task 'facts' has only {get_task('facts').pool_size('train')} distinct training examples, but the sweep asks for a budget of 6000;",
    ),
    "test draw larger than the test split": (
        {**GOOD, "eval": {"test_size": 5000}},
        f"eval.test_size: 5000 exceeds the {get_task('facts').pool_size('test')} distinct test examples of task 'facts'",
    ),
    "a setting for a method that takes none": ({**GOOD, "methods": {"base": {"rank": 4}}}, "methods.base.rank: unknown key; it takes no settings (give it {})"),
    "a choice on the validation set without one": (
        {**GOOD, "methods": {"steer_mean": {"scales": [0.0, 1.0]}, "lora+steer_mean": {}}, "eval": {"validation_size": 0}},
        "methods.steer_mean: steer_mean chooses a layer among the fractions [0.25, 0.5, 0.75] and a scale among [0.0, 1.0]",
    ),
    "a choice of layer on the validation set without one": (  # one scale, the default three layers: still a choice
        {**GOOD, "methods": {"steer_mean": {"scales": [1.0]}}, "eval": {"validation_size": 0}},
        "methods.steer_mean: steer_mean chooses a layer among the fractions [0.25, 0.5, 0.75] and a scale among [1.0]",
    ),
    "a learning-rate search without a validation set": (  # it chooses on validation checkpoints: every cell failed
        {**GOOD, "methods": {"lora": {"train": {"lr_search": [1e-2]}}}, "eval": {"validation_size": 0}},
        "methods.lora: train.lr_search chooses a learning rate among [0.001, 0.01] on the shared validation set",
    ),
    "a nested learning-rate search without a validation set": (  # named by its path inside the composition
        {**GOOD, "methods": {"steer_mean+lora": {"first": {"layers": [0.5], "scales": [1.0]}, "second": {"train": {"lr_search": [1e-2]}}}},
         "eval": {"validation_size": 0}},  # fmt: skip
        "methods.steer_mean+lora: second.train.lr_search chooses a learning rate among [0.001, 0.01] on the shared validation set",
    ),
    "a choice of demonstrations without a validation set": (  # it used all that fit, reported as choose_shots: true
        {**GOOD, "methods": {"prompt": {}}, "eval": {"validation_size": 0}},
        "methods.prompt: prompt chooses how many demonstrations among 0, 1, 2, 4, … and all that fit (set choose_shots: false",
    ),
    "a ladder revision that is not its recipe's hash": (  # it could never load, and re-planning kept it
        {**GOOD, "models": [{"id": "ladder:test/xs", "revision": "main"}]},
        "models.0.revision: main is not the hash of ladder:test/xs's recipe (",
    ),
    "no sweep name": (  # said once, with what a name may hold: not also "results_dir: Field required"
        {k: v for k, v in GOOD.items() if k != "sweep"},
        "sweep: Field required (sweep: the sweep's name: letters, digits, '_', '.', '-' (no spaces)",
    ),
    "unknown method setting": ({**GOOD, "methods": {"lora": {"train": {"lr": 1e-3, "epoch": 2}}}}, "methods.lora.train.epoch: unknown key (did you mean 'epochs'?)"),
}


def _plan(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(path)], capture_output=True, text=True, timeout=120)


def _assert_clean_error(out: subprocess.CompletedProcess, expected: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert expected in out.stderr, out.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_config_is_a_clean_error(case, tmp_path):
    data, expected = CASES[case]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "r"), **data}))
    _assert_clean_error(_plan(path), expected)
    assert not (tmp_path / "r").exists(), "nothing may be written for a config that does not validate"


def test_a_grid_error_names_the_config_and_the_override_that_caused_it(tmp_path):
    """Errors found when the grid is laid out (too few steps for a budget, a budget past a task's pool) said
    neither the file nor that the offending value came from an override, as key errors do."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "budgets": [64], "results_dir": str(tmp_path / "r")}))
    override = "methods.lora.train.max_steps=1"
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(path), override], capture_output=True, text=True, timeout=120)
    _assert_clean_error(out, f"error: {path} with {override}:\nmethods.lora.train: a budget of 64 needs ")
    assert out.stderr.rstrip().endswith(f"[set by the override {override}]"), out.stderr


def test_bad_yaml_syntax(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep: bad\nmodels: [ {id: x\n")
    _assert_clean_error(_plan(path), "not valid YAML")


def test_a_typo_in_a_method_and_one_in_the_sweep_come_in_one_message(write_sweep):
    """`eval.tset_size` and `methods.lora.rnak`: the method's was said only once the sweep's was fixed (helper-179); a
    method the sweep's own check names already (a settings value that is no mapping) is not named twice."""
    from orchestrator.spec import load_spec
    from workers.config import ConfigError

    sweep = {"sweep": "s", "models": ["ladder:xs"], "tasks": ["facts"], "budgets": [4], "eval": {"tset_size": 3}}
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**sweep, "methods": {"lora": {"rnak": 4}, "base": {}}}))
    lines = str(err.value).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["eval.tset_size", "methods.lora.rnak"], lines
    assert "(did you mean 'rank'?)" in lines[1]
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**sweep, "methods": {"lora": 5, "steer_men": {}}}))
    keys = [line.split(":")[0] for line in str(err.value).splitlines()[1:]]
    assert sorted(keys) == ["eval.tset_size", "methods.lora", "methods.steer_men"], keys


def test_missing_file(tmp_path):
    _assert_clean_error(_plan(tmp_path / "nope.yaml"), "no such sweep config")
    (tmp_path / "quickstart.yaml").write_text("sweep: s\n")  # a mistyped name beside it is named (helper-179)
    _assert_clean_error(_plan(tmp_path / "quickstrat.yaml"), f"no such sweep config (did you mean '{tmp_path}/quickstart.yaml'?)")
    from orchestrator.spec import no_such_config

    assert str(no_such_config(tmp_path / "full.yaml")).endswith("no such sweep config")  # `.yaml` alone is no likeness (helper-180)


@pytest.mark.parametrize("command", ["status", "fit", "report"])
def test_reading_a_directory_without_a_sweep_is_a_clean_error(command, tmp_path):
    nowhere = tmp_path / "results" / "typo"
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", command, str(nowhere)], capture_output=True, text=True, timeout=120)
    _assert_clean_error(out, str(nowhere))
    assert not nowhere.exists(), "nothing may be written where no sweep is"


def test_more_gpus_per_cell_than_the_cluster_has(tmp_path, test_ladder):
    path = tmp_path / "sweep.yaml"
    data = {**GOOD, "models": [{"id": test_ladder[0], "gpus_per_cell": 64}], "results_dir": str(tmp_path / "r")}
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--no-progress", "--no-dashboard"],
        capture_output=True, text=True, timeout=300,
    )
    _assert_clean_error(out, "gpus_per_cell asks for 64 GPUs per cell but the cluster has 0")
    assert not list((tmp_path / "r").glob("cells/*.parquet")), "no cell may have run"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_results_dir_that_cannot_be_written_is_a_clean_error_before_ray_starts(tmp_path, test_ladder):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "methods": {"base": {}}, "budgets": [0], "results_dir": str(tmp_path / "a-file" / "r")}))
    _assert_clean_error(_cli("run", str(path), "--no-progress", "--no-dashboard"), f"results_dir {tmp_path / 'a-file' / 'r'}: cannot write there")


def test_a_report_directory_that_cannot_be_written_is_refused_before_the_fit(tmp_path):
    from datetime import datetime, timezone

    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    results, now = tmp_path / "results", datetime.now(timezone.utc)
    ResultsStore(str(results)).write({"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "a", "slug": "a", "status": "ok",
                                      "score": 0.5, "started_at": now, "finished_at": now})  # fmt: skip
    (tmp_path / "a-file").write_text("")
    _assert_clean_error(_cli("report", str(results), "--out", str(tmp_path / "a-file" / "report")), "cannot write there")
    assert not (results / "fits.json").exists(), "the fit must not have run"


def test_fitting_rows_in_a_folder_that_cannot_be_written_is_refused_before_the_fit(tmp_path, monkeypatch, capsys):
    """A colleague's results, read-only: the fits are written beside the rows, and `fit` raised an OSError traceback after
    the whole analysis; `report nowhere --out DIR` left an empty DIR behind (helper-141). (The tests run as root, which
    mode bits do not stop: the store's writes are made to fail as a read-only mount's do.)"""
    from datetime import datetime, timezone

    import analysis
    import workers.rowfile
    from orchestrator.cli import main
    from orchestrator.store import ResultsStore
    from workers.schema import SCHEMA_VERSION

    results, now = tmp_path / "results", datetime.now(timezone.utc)
    ResultsStore(str(results)).write({"schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": "a", "slug": "a", "status": "ok",
                                      "score": 0.5, "started_at": now, "finished_at": now})  # fmt: skip

    def read_only(filesystem, path, data):
        raise OSError(30, "Read-only file system", path)

    def no_fit(*args, **kwargs):
        raise AssertionError("the fit ran before the folder was found unwritable")

    monkeypatch.setattr(workers.rowfile, "write_atomically", read_only)
    monkeypatch.setattr(analysis, "fit_results", no_fit)
    assert main(["fit", str(results), "--bootstrap", "0"]) == 2
    assert f"results_dir {results}: cannot write there ([Errno 30] Read-only file system" in capsys.readouterr().err
    monkeypatch.undo()
    _assert_clean_error(_cli("report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")), "no results directory")
    (tmp_path / "empty").mkdir()  # what a run refused while preparing leaves (its writability probe made the folder)
    _assert_clean_error(_cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")), "no sweep at")
    assert not (tmp_path / "out").exists()


def test_an_abbreviated_flag_is_refused(tmp_path):
    out = _cli("run", str(tmp_path / "sweep.yaml"), "--max-cell", "3")
    assert out.returncode == 2 and "unrecognized arguments: --max-cell 3" in out.stderr, out.stderr


def test_a_hub_model_that_cannot_be_fetched_stops_a_local_run_before_any_cell(tmp_path):
    """Once, up front, naming the model: not one network timeout and one failed row per cell."""
    import os

    path = tmp_path / "sweep.yaml"
    data = {**GOOD, "models": [{"id": "nobody-here/no-such-model"}], "methods": {"base": {}}, "budgets": [0], "results_dir": str(tmp_path / "r")}
    path.write_text(yaml.safe_dump(data))
    earlier = '[{"cell_id": "a", "slug": "a", "model": "m", "method": "lora"}]'  # the plan of the run before: its rows stay planned
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "plan.json").write_text(earlier)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path), "--no-progress", "--no-dashboard"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    _assert_clean_error(out, "model nobody-here/no-such-model cannot be loaded here: LocalEntryNotFoundError")
    assert not (tmp_path / "r" / "cells").exists(), "no cell may have run"
    assert (tmp_path / "r" / "plan.json").read_text() == earlier, "a refused run replaced the plan: `status` called 870 ok rows unplanned"
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["plan.json"], "the writability probe is left behind"


def test_an_unreachable_gcs_bucket_is_a_clean_error_in_seconds_not_a_quarter_hour(tmp_path):
    """Google Cloud Storage's client retries for 15 minutes by default: `status gs://…` without credentials sat
    silent that long. The reachability probe asks with a short retry limit, unless the URI sets one."""
    from analysis.io import probe_uri

    assert probe_uri("gs://b/r?project_id=p") == "gs://b/r?project_id=p&retry_limit_seconds=10"
    assert probe_uri("gs://b/r?retry_limit_seconds=60") == "gs://b/r?retry_limit_seconds=60"
    assert probe_uri("s3://b/r") == "s3://b/r"
    # both commands at once: each waits out the retry limit (~20 s), which is the test's time
    running = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli", command, "gs://steerscale-no-such-bucket/r"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in ("status", "fit")]  # fmt: skip
    try:
        for process in running:
            stdout, stderr = process.communicate(timeout=150)
            _assert_clean_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), "gs://steerscale-no-such-bucket/r")
            assert "cannot reach" in stderr
    finally:
        for process in running:
            process.kill()  # after a timeout or a failed check: no process left behind


@pytest.mark.parametrize("methods", [
    {"lora": {"target_modules": ["q_proj", "v_porj"]}},
    {"steer_mean+task_vector": {"second": {"finetune": "lora", "lora": {"target_modules": ["v_porj"]}}}},
])  # fmt: skip
def test_a_lora_target_the_model_lacks_stops_the_run_before_any_cell(methods, tmp_path, test_ladder):
    """Each cell would fail on it (PEFT itself would adapt q_proj alone): refused once, up front, naming the entry."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "models": [{"id": test_ladder[0]}], "methods": methods, "results_dir": str(tmp_path / "r")}))
    name = next(iter(methods))
    expected = f"methods.{name} on {test_ladder[0]}: lora target_modules: 'v_porj' matches no module of LlamaForCausalLM (did you mean 'v_proj'?)"
    _assert_clean_error(_cli("run", str(path), "--no-progress", "--no-dashboard"), expected)
    assert not (tmp_path / "r").exists(), "refused before the store is touched (no plan.json replaced, no cell run)"


def test_a_model_the_driver_cannot_build_leaves_the_target_check_to_the_workers(tmp_path):
    """An architecture this driver's transformers does not know (workers may run a newer one) or remote code:
    the up-front check is skipped for it, not a traceback."""
    from orchestrator.cli import _refuse_what_models_lack
    from orchestrator.grid import PlannedCell
    from workers.cell import CellConfig, EvalConfig, ModelSpec

    (tmp_path / "config.json").write_text('{"model_type": "no_such_architecture"}')
    cell = CellConfig(sweep="s", model=ModelSpec(id=str(tmp_path)), task="facts", method="lora",
                      method_config={"target_modules": ["q_proj"]}, budget=4, seed=0, eval=EvalConfig())  # fmt: skip
    assert _refuse_what_models_lack([PlannedCell(cell, 0.0)]) is None


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """`steerscale ARGV` in this process: (exit status, stderr)."""
    from orchestrator.cli import main

    try:
        status = main(list(argv))
    except SystemExit as exit:  # argparse's errors
        status = exit.code
    return status, capsys.readouterr().err


def test_plan_refuses_a_lora_target_the_model_lacks_as_run_does(tmp_path, capsys, test_ladder):
    """`plan` said nothing (exit 0) where `run` refused; the refusal names the file and the override, as other config errors do."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "models": [{"id": test_ladder[0]}], "results_dir": str(tmp_path / "r")}))
    override = "methods.lora.target_modules=[q_projj]"
    for command in ("plan", "run"):
        status, err = _main(capsys, command, str(path), override)
        assert status == 2 and "Traceback" not in err, err
        assert err.startswith(f"error: {path} with {override}:\nmethods.lora on {test_ladder[0]}: lora target_modules: 'q_projj' matches no "
                              "module of LlamaForCausalLM (did you mean 'q_proj'?)"), err  # fmt: skip
        assert err.rstrip().endswith(f"[set by the override {override}]"), err
    assert not (tmp_path / "r").exists()


def test_an_adaptive_grid_error_names_the_config(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "results_dir": str(tmp_path / "r")}))
    status, err = _main(capsys, "run", str(path), "--adaptive", "--max-cells", "3")
    assert status == 2 and err.startswith(f"error: {path}:\nan adaptive sweep fits loss(D)"), err


class _Locked:
    """A local filesystem on which `folder` cannot be listed nor anything inside it read: a directory of
    mode 000, which root (who runs CI containers) could read anyway, so chmod cannot stand in for it."""

    def __init__(self, local: object, folder: str) -> None:
        self._local, self._folder = local, folder

    def _check(self, path: str) -> None:
        if path.startswith(self._folder + "/"):
            raise PermissionError(13, "Permission denied", path)

    def get_file_info(self, what: object) -> object:
        from pyarrow import fs

        if isinstance(what, fs.FileSelector):
            self._check(what.base_dir + "/")
        else:
            self._check(str(what))
        return self._local.get_file_info(what)

    def __getattr__(self, name: str) -> object:
        return getattr(self._local, name)


@pytest.mark.parametrize("command", ["plan", "status", "fit"])
def test_a_results_dir_that_cannot_be_read_is_a_clean_error(command, tmp_path, capsys, monkeypatch):
    """It was a PermissionError traceback (exit 1)."""
    from pyarrow import fs

    results = tmp_path / "r"
    (results / "cells").mkdir(parents=True)
    (results / "plan.json").write_text("[]")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "results_dir": str(results)}))
    local = fs.LocalFileSystem()
    monkeypatch.setattr(fs, "LocalFileSystem", lambda: _Locked(local, str(results)))
    status, err = _main(capsys, command, str(path) if command == "plan" else str(results))
    assert status == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: results_dir {results}: cannot read it (") and "Permission denied" in err, err


class _ReadOnly(_Locked):
    """`folder` can be read but nothing made, written or moved in it: read-only credentials on a bucket, which
    refuse with a plain OSError (S3's ACCESS_DENIED carries no errno: no PermissionError)."""

    def _check(self, path: str) -> None:
        if path.startswith(self._folder + "/"):
            raise OSError(f"When creating key '{path}': AWS Error ACCESS_DENIED during PutObject operation")

    def create_dir(self, path: str, recursive: bool = True) -> None:
        self._check(path)
        self._local.create_dir(path, recursive=recursive)

    def move(self, source: str, target: str) -> None:
        self._check(target)
        self._local.move(source, target)

    def open_output_stream(self, path: str, *args: object, **options: object) -> object:
        self._check(path)
        return self._local.open_output_stream(path, *args, **options)

    def get_file_info(self, what: object) -> object:
        return self._local.get_file_info(what)


def test_run_on_a_results_dir_it_can_read_but_not_write_is_a_clean_error_even_with_a_bad_file_in_it(tmp_path, capsys, monkeypatch):
    """Setting the bad file aside (to quarantine/) came before the check that the store takes writes: a
    PermissionError traceback (exit 1), not the clean refusal (exit 2) an empty read-only store gets."""
    from pyarrow import fs

    results = tmp_path / "r"
    (results / "cells").mkdir(parents=True)
    (results / "cells" / "cut.parquet").write_bytes(b"PAR1 cut short")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "results_dir": str(results)}))
    local = fs.LocalFileSystem()

    class Bucket:  # a type still (writes check `isinstance(filesystem, fs.LocalFileSystem)`), whose instances are not it
        def __new__(cls) -> _ReadOnly:
            return _ReadOnly(local, str(results))

    monkeypatch.setattr(fs, "LocalFileSystem", Bucket)
    status, err = _main(capsys, "run", str(path))
    assert status == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: results_dir {results}: cannot write there (") and "ACCESS_DENIED" in err, err
    assert (results / "cells" / "cut.parquet").exists()


def test_plan_without_a_config_asks_for_the_config_alone(capsys):
    """It said "the following arguments are required: config, key.sub=value": overrides are optional."""
    status, err = _main(capsys, "plan")
    assert status == 2 and err.rstrip().endswith("the following arguments are required: config"), err


def test_an_unknown_flag_after_an_override_is_named_alone(tmp_path, capsys):
    """`run X.yaml --retry-failed seeds=[3] --bogus` said "unrecognized arguments: seeds=[3] --bogus", under the usage of
    `steerscale` itself ({plan,run,...}) rather than of `run`, whose flags the user needs to see."""
    status, err = _main(capsys, "run", str(tmp_path / "sweep.yaml"), "--retry-failed", "seeds=[3]", "--bogus")
    assert status == 2 and err.rstrip().endswith("unrecognized arguments: --bogus"), err
    assert err.startswith("usage: steerscale run ") and "--retry-failed" in err, err
    status, err = _main(capsys, "ladder", "build", "--bogus")
    assert status == 2 and err.startswith("usage: steerscale ladder build ") and "--recipe" in err, err


def test_ctrl_c_in_a_forced_run_does_not_say_the_same_command_resumes():
    """Rerunning `run --force` after Ctrl-C redid every cell, as --force says: "rerun the same command to resume" was wrong there."""
    import argparse

    from orchestrator.cli import _how_to_resume

    assert _how_to_resume(argparse.Namespace(force=False)) == "rerun the same command to resume"
    forced = _how_to_resume(argparse.Namespace(force=True))
    assert "rerun without --force" in forced and "resume" not in forced


def test_ctrl_c_twice_while_rows_are_stored_does_not_say_every_finished_row_is(tmp_path, capsys, monkeypatch):
    """A second Ctrl-C while finished rows are being stored stops at once and loses them (driver._held_until_stored);
    the last line said "every finished row is stored" all the same."""
    from orchestrator import cli
    from orchestrator.errors import ROWS_LOST_NOTE

    def broken_off(args):
        stop = KeyboardInterrupt()
        stop.add_note(ROWS_LOST_NOTE)
        raise stop

    monkeypatch.setattr(cli, "cmd_run", broken_off)
    status, err = _main(capsys, "run", str(tmp_path / "sweep.yaml"))
    assert status == 130 and "interrupted; some finished rows were not stored" in err and "every finished row is stored" not in err, err


def test_a_forced_run_counts_the_stored_cells_it_runs_again():
    """`run --force` over 8 stored cells said "0 already stored, 8 to run"."""
    from orchestrator.cli import count_line
    from orchestrator.store import StoreScan

    cells = [SimpleNamespace(cell_id=f"c{i}") for i in range(8)]
    scan = StoreScan(cells={f"c{i}": SimpleNamespace(status="ok" if i < 5 else "failed") for i in range(8)})
    assert count_line("s", cells, scan, cells) == "sweep s: 8 cells, 8 already stored, 8 to run (8 of them stored ones, run again)"
    assert count_line("s", cells, scan, cells[5:]) == "sweep s: 8 cells, 8 already stored, 3 to run (3 of them stored ones, run again)"
    assert count_line("s", [*cells, SimpleNamespace(cell_id="new")], scan, cells[8:] + [SimpleNamespace(cell_id="new")]) == \
        "sweep s: 9 cells, 8 already stored, 1 to run"


def test_sigterm_while_ray_starts_is_a_clean_stop_too(monkeypatch):
    """While ray.init runs, Ray's own SIGTERM handler is in (sys.exit(15)): the caller's handler takes that stop as its
    own (the CLI's: a clean exit 143), other exits pass, and an ignored SIGTERM stays ignored after ray.init."""
    import signal

    from orchestrator import driver

    class Stopped(Exception):
        pass

    def callers(signum, frame):
        raise Stopped

    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    previous = signal.signal(signal.SIGTERM, callers)
    try:
        monkeypatch.setattr(driver.ray, "init", lambda **_: sys.exit(signal.SIGTERM))
        with pytest.raises(Stopped):
            driver.connect(None)
        assert signal.getsignal(signal.SIGTERM) is callers
        monkeypatch.setattr(driver.ray, "init", lambda **_: sys.exit(3))
        with pytest.raises(SystemExit, match="3"):
            driver.connect(None)

        def ray_init(**_):
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(15))  # as Ray's does
            return SimpleNamespace(dashboard_url="")

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        monkeypatch.setattr(driver.ray, "init", ray_init)
        driver.connect(None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("command", ["status", "fit"])
def test_a_cells_folder_that_is_a_file_is_a_clean_error(tmp_path, command):
    """`status`, `fit`, `plan` and `run` met a results_dir whose cells/ is a file with a NotADirectoryError traceback (helper-141)."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "cells").write_text("")
    _assert_clean_error(_cli(command, str(tmp_path / "r")), f"{tmp_path / 'r' / 'cells'} is a file, not the folder of the cells' rows")


def test_ladder_without_its_subcommand_names_it():
    """`steerscale ladder` said "the following arguments are required: ladder_command", an internal name (helper-141)."""
    out = _cli("ladder")
    assert out.returncode == 2 and "the following arguments are required: build" in out.stderr, out.stderr


def test_ladder_build_sizes_given_none_is_refused_not_read_as_all(capsys):
    """`--sizes` with nothing after it built every rung of the recipe, the most a slip could cost (helper-169)."""
    status, err = _main(capsys, "ladder", "build", "--sizes")
    assert status == 2 and "argument --sizes: expected at least one argument" in err


def test_the_version_is_asked_for_as_usual(capsys):
    from importlib.metadata import version

    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"steerscale {version('steerscale')}"


def test_status_of_a_sweep_whose_only_row_file_is_unreadable_says_so(tmp_path, capsys):
    """It said "no sweep at …: neither a plan nor stored rows" under the unreadable file's own warning, while `fit` of the
    same folder counted the file (helper-169)."""
    from orchestrator.cli import main

    (tmp_path / "r" / "cells").mkdir(parents=True)
    (tmp_path / "r" / "cells" / "cut.parquet").write_bytes(b"PAR1 cut short")
    assert main(["status", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unreadable results file cut.parquet" in err and f"error: no readable row at {tmp_path / 'r'}: its 1 cell file (above) cannot be read" in err
    assert "no sweep at" not in err and (tmp_path / "r" / "cells" / "cut.parquet").exists()  # status sets nothing aside
