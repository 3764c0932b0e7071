"""Fault injection with real processes: a worker killed mid-cell, a driver SIGKILLed mid-sweep,
two drivers on one results directory, joining a cluster started with `ray start --head`, and cells
that raise, whose loss goes NaN, or that run out of memory (Python's MemoryError, torch's allocator)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from workers.config import ConfigError

pytestmark = pytest.mark.slow  # ~10 minutes on 2 cores: CI runs them after `make test`

RAY_BIN = str(Path(sys.executable).parent / "ray")
TOKEN_ENV = {**os.environ, "RAY_AUTH_MODE": "token"}  # joining by address sends the head's token (~/.ray/auth_token)
OWN_RAY_ENV = {**os.environ, "RAY_ADDRESS": "local"}  # a driver starts its own Ray, whose workers are its descendants


def _spec(root: Path, test_ladder: list[str], **changes) -> Path:
    spec = {
        "sweep": "faults",
        "results_dir": str(root / "results"),
        "models": [{"id": m} for m in test_ladder],
        "tasks": ["facts"],
        "methods": {"lora": {"rank": 2, "train": {"min_steps": 60, "max_steps": 60}}, "steer_mean": {}},
        "budgets": [16, 64],
        "seeds": [0, 1],
        "eval": {"test_size": 60, "validation_size": 16, "neutral_size": 4},
        "resources": {"cpus_per_cell": 1, "max_retries": 1},
        **changes,
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def _rows(results: Path):
    return pq.read_table(results / "cells").to_pandas() if (results / "cells").exists() else None


def _cell_files(results: Path) -> dict[str, int]:
    cells = results / "cells"
    files = cells.glob("*.parquet") if cells.exists() else []
    return {p.name: p.stat().st_mtime_ns for p in files if not p.name.startswith(".tmp-")}  # not a write in flight


def _running_cell_pids(driver: subprocess.Popen) -> list[int]:
    """The driver's Ray workers titled after a running cell's slug (`ray::ladder-...`): only its own, so a
    sweep that another Ray on the machine runs (a `make demo` beside the tests) loses no worker. The driver
    must start its own Ray (`OWN_RAY_ENV`): one that joined a `ray start` cluster has no workers below it."""
    with contextlib.suppress(psutil.NoSuchProcess):
        own = psutil.Process(driver.pid).children(recursive=True)
        return [p.pid for p in own if _title(p).startswith("ray::ladder-")]
    return []


def _title(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def test_worker_killed_mid_cell_is_retried_and_recorded(tmp_path, test_ladder):
    path = _spec(tmp_path, test_ladder)
    driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--no-dashboard"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=OWN_RAY_ENV)  # fmt: skip
    deadline, killed = time.time() + 300, None
    while killed is None and time.time() < deadline and driver.poll() is None:
        pids = _running_cell_pids(driver)
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = driver.communicate(timeout=600)
    assert killed is not None, "never saw a worker running a cell"
    assert driver.returncode == 0, err[-3000:]
    rows = _rows(tmp_path / "results")
    assert len(rows) == 16 and rows.cell_id.is_unique
    assert (rows.status == "ok").all(), rows[rows.status != "ok"].error.tolist()
    assert rows.attempt.max() == 2, "the killed cell must have been rerun as attempt 2"


def test_worker_dying_on_every_attempt_becomes_a_failed_row(tmp_path, test_ladder):
    path = _spec(tmp_path, test_ladder[:1], methods={"steer_mean": {}}, budgets=[16], seeds=[0], resources={"max_retries": 1})
    driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--no-dashboard"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=OWN_RAY_ENV)  # fmt: skip
    kills = 0
    deadline = time.time() + 300
    while driver.poll() is None and time.time() < deadline:
        for pid in _running_cell_pids(driver):
            try:
                os.kill(pid, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    out, err = driver.communicate(timeout=60)
    assert driver.returncode == 0, err[-3000:]
    rows = _rows(tmp_path / "results")
    assert len(rows) == 1 and rows.status[0] == "failed" and rows.attempt[0] == 2
    assert "died" in rows.error[0].lower() or "crash" in rows.error[0].lower() or "worker" in rows.error[0].lower()


def _driver_past_three_rows(path: Path, results: Path, **popen) -> subprocess.Popen:
    """`steerscale run` started, returned once it has stored 3 rows (or after 5 minutes): to interrupt it mid-sweep."""
    driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--no-dashboard"), **popen)
    deadline = time.time() + 300
    while len(_cell_files(results)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    return driver


def test_driver_sigkilled_mid_sweep_resumes_without_duplicates(tmp_path, test_ladder):
    path = _spec(tmp_path, test_ladder)
    results = tmp_path / "results"
    driver = _driver_past_three_rows(path, results, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    driver.wait(timeout=30)
    before = _cell_files(results)
    assert 3 <= len(before) < 16, f"kill landed at {len(before)} rows"
    again = subprocess.run(_cli("run", str(path), "--no-progress", "--no-dashboard"), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{16 - len(before)} to run" in again.stdout
    after = _cell_files(results)
    assert len(after) == 16 and all(after[name] == t for name, t in before.items()), "stored rows must not be redone"
    rows = _rows(results)
    assert rows.cell_id.is_unique and len(rows) == 16 and (rows.status == "ok").all()


@pytest.mark.parametrize("sent, status, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_mid_sweep_says_how_to_resume_and_a_rerun_finishes(tmp_path, test_ladder, sent, status, said):
    """SIGTERM too (`timeout`, Slurm, Kubernetes): Ray's handler printed a C++ stack dump and exited 15, saying nothing."""
    path = _spec(tmp_path, test_ladder)
    results = tmp_path / "results"
    driver = _driver_past_three_rows(path, results, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver.send_signal(sent)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == status, err[-3000:]
    assert f"{said}; every finished row is stored: rerun the same command to resume" in err and "Traceback" not in err, err[-3000:]
    assert "SIGTERM received" not in err, err[-3000:]
    again = subprocess.run(_cli("run", str(path), "--no-progress", "--no-dashboard"), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "were left alone" not in again.stdout, again.stdout + again.stderr[-3000:]  # no claim left behind
    rows = _rows(results)
    assert rows.cell_id.is_unique and len(rows) == 16 and (rows.status == "ok").all()


def test_sigterm_while_the_driver_waits_on_its_first_cell_exits_143(tmp_path, test_ladder):
    """Handled inside `ray.wait` (where a driver spends a sweep of long cells), a SIGTERM reached the CLI as a plain
    KeyboardInterrupt: the run said "interrupted" and exited 130, as if a user had pressed Ctrl-C."""
    path = _spec(tmp_path, test_ladder, methods={"lora": {"rank": 2, "train": {"min_steps": 50000, "max_steps": 50000}}}, budgets=[16])
    mark = f"sigterm-first-cell-{os.getpid()}-{time.time_ns()}"
    driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--no-dashboard"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "STEERSCALE_TEST_MARK": mark})  # fmt: skip

    def workers_up() -> bool:
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("STEERSCALE_TEST_MARK") == mark and "CellWorker" in " ".join(process.cmdline()):
                    return True
        return False

    deadline = time.time() + 180
    while not workers_up() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3.0)  # the driver waits on its workers' start, then on their first cells: in ray.wait
    assert not _cell_files(tmp_path / "results"), "a row stored already: the cell is not long enough for this test"
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 143 and "terminated; every finished row is stored" in err, err[-3000:]


def test_two_drivers_never_run_the_same_cell(tmp_path, test_ladder):
    path = _spec(tmp_path, test_ladder)
    drivers = [
        subprocess.Popen(_cli("run", str(path), "--no-progress", "--no-dashboard"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [d.communicate(timeout=900) for d in drivers]
    assert all(d.returncode == 0 for d in drivers), [o[1][-2000:] for o in outputs]
    ran = [int(re.search(r"ran (\d+) cells? in", o[0]).group(1)) for o in outputs]
    rows = _rows(tmp_path / "results")
    assert len(rows) == 16 and rows.cell_id.is_unique and (rows.attempt == 1).all()
    assert sum(ran) == 16, f"cells run per driver: {ran} (a cell run by both would make the sum exceed 16)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_joins_a_cluster_started_with_ray_start(tmp_path, test_ladder):
    port = _free_port()
    start = subprocess.run(
        [RAY_BIN, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        path = _spec(tmp_path, test_ladder[:1], budgets=[16], seeds=[0])
        run = subprocess.run(
            _cli("run", str(path), "--no-progress", "--address", "auto"), capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
        rows = _rows(tmp_path / "results")
        assert len(rows) == 2 and (rows.status == "ok").all()
    finally:
        subprocess.run([RAY_BIN, "stop", "--force"], capture_output=True, timeout=120)


def _cpu_less_head() -> str:
    """`ray start --head` with no CPUs (as KubeRay runs its head); returns the address to join."""
    head = subprocess.run(
        [RAY_BIN, "start", "--head", f"--port={_free_port()}", "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    return re.search(r"ray start --address='([^']+)'", head.stdout).group(1)  # Ray binds the machine's own address


def _worker_node(address: str) -> subprocess.Popen:
    """A 2-CPU node joining `address`; --block keeps its processes (raylet, object store, workers) under this one."""
    return subprocess.Popen([RAY_BIN, "start", f"--address={address}", "--num-cpus=2", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=TOKEN_ENV)  # fmt: skip


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):  # a node already gone
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _wait_for_cpus(address: str, cpus: int) -> None:
    # Asks the GCS, as the driver does (ray.cluster_resources): `ray status` can still list a dead
    # node's CPUs after the GCS has dropped it, and a rerun started then finds 0 CPUs.
    probe = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(ray.cluster_resources().get('CPU', 0))"
    deadline = time.time() + 180
    while float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=TOKEN_ENV).stdout.split()[-1]) != cpus:
        assert time.time() < deadline, f"the cluster never reached {cpus} CPUs"
        time.sleep(1)


def test_a_node_dying_mid_sweep_ends_the_run_cleanly_and_a_rerun_on_a_new_node_finishes_it(tmp_path, test_ladder):
    """A head with no CPUs and one worker node: when that node dies, the cells left have nowhere to run.

    What the driver sees depends on when Ray marks the node dead (a missed-heartbeat timeout): once it
    is, cells still waiting find no room and the run ends with exit 3 and a message (no traceback);
    before it is, the workers asked for in their place die starting, and three in a row end the run
    the same way. Either way every finished row is kept, and a rerun with --retry-failed on a new
    node stores all 16 ok, with no duplicates and no ok row redone."""
    address = _cpu_less_head()
    env = TOKEN_ENV
    node = _worker_node(address)
    try:
        _wait_for_cpus(address, 2)
        path = _spec(tmp_path, test_ladder)
        results = tmp_path / "results"
        driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--address", address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while len(_cell_files(results)) < 3 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.05)
        _kill_tree(node.pid)  # the node's raylet, its object store and the workers on it
        node.wait(timeout=30)
        out, err = driver.communicate(timeout=600)
        assert "Traceback" not in err, err[-3000:]
        first = _rows(results)
        ok_before = {name: t for name, t in _cell_files(results).items() if name.removesuffix(".parquet") in set(first.cell_id[first.status == "ok"])}
        assert 3 <= len(ok_before) < 16, f"the node died after {len(ok_before)} ok rows"
        print(f"node killed after {len(ok_before)} ok rows; the driver exited {driver.returncode}; {len(first)} rows stored")
        if driver.returncode == 3:
            assert "rerun the same command" in err, err[-3000:]
        else:
            assert driver.returncode == 0, (out, err[-3000:])
            failed = first[first.status != "ok"]
            assert len(first) == 16 and len(failed) and all("died" in e.lower() or "worker" in e.lower() for e in failed.error), failed.error.tolist()
        _wait_for_cpus(address, 0)  # the dead node is out of the cluster, so the CPUs counted next are the new node's
        node = _worker_node(address)
        _wait_for_cpus(address, 2)
        again = subprocess.run(_cli("run", str(path), "--retry-failed", "--no-progress", "--address", address),
                               capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        rows = _rows(results)
        assert len(rows) == 16 and rows.cell_id.is_unique and (rows.status == "ok").all(), "zero lost cells, zero duplicates"
        assert all(_cell_files(results)[name] == t for name, t in ok_before.items()), "stored ok rows must not be redone"
    finally:
        _kill_tree(node.pid)
        subprocess.run([RAY_BIN, "stop", "--force"], capture_output=True, timeout=120)


def test_a_run_asking_for_workers_the_cluster_cannot_hold_yet_waits_for_a_node(tmp_path, test_ladder):
    """An autoscaling cluster: a head with no CPUs, and nodes only once workers ask for them.

    With `resources.max_workers` the run is not refused for the CPUs missing now, and no cell goes
    to a worker that has not started: it waits. Past `start_timeout_s` it ends with exit 3, a message
    and nothing stored; run again, it waits until a node joins (as an autoscaler's would), then runs
    every cell there."""
    address = _cpu_less_head()
    node = None
    results = tmp_path / "results"
    try:
        path = _spec(tmp_path, test_ladder[:1], budgets=[16], seeds=[0], resources={"max_workers": 2, "start_timeout_s": 10})
        gave_up = subprocess.run(_cli("run", str(path), "--no-progress", "--address", address), capture_output=True, text=True, timeout=300, env=TOKEN_ENV)
        assert gave_up.returncode == 3, gave_up.stderr[-3000:]
        assert "resources.start_timeout_s (10 s)" in gave_up.stderr and "Traceback" not in gave_up.stderr, gave_up.stderr[-3000:]
        assert "in use now: 0 of 0 CPUs (0 by this run's workers, up to 2 more by those starting)" in gave_up.stderr, gave_up.stderr[-3000:]
        assert _rows(results) is None

        path = _spec(tmp_path, test_ladder[:1], budgets=[16], seeds=[0], resources={"max_workers": 2})
        driver = subprocess.Popen(_cli("run", str(path), "--no-progress", "--address", address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=TOKEN_ENV)
        time.sleep(15)
        assert driver.poll() is None and _rows(results) is None, "the run must wait for a node, not refuse or end"
        node = _worker_node(address)
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
        rows = _rows(results)
        assert len(rows) == 2 and (rows.status == "ok").all() and rows.cell_id.is_unique
    finally:
        if node is not None:
            _kill_tree(node.pid)
        subprocess.run([RAY_BIN, "stop", "--force"], capture_output=True, timeout=120)


# --- cells that fail inside their own code: each a `failed` row with its error; the sweep goes on ---

FAULT_CELLS = 15  # 5 models x 3 methods


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory, test_ladder):
    """One sweep whose cells fail every way a cell's own code can, next to cells that must be ok.

    Real triggers where there are: a model that does not exist (raises), full fine-tuning at an
    absurd learning rate (the loss goes NaN), a LoRA of rank 10^9 (torch's allocator cannot allocate
    the matrices: a CPU allocation error here, torch.OutOfMemoryError on a GPU). Python's MemoryError
    and torch's OutOfMemoryError cannot be provoked on a CPU box by any setting, so two copies of a
    rung are named in the test-only $STEERSCALE_TEST_LOAD_FAULTS, which makes loading them raise.
    """
    from workers.cell import ModelSpec
    from workers.models.loading import resolve_path

    root = tmp_path_factory.mktemp("failing")
    xs, s = test_ladder
    rung = resolve_path(ModelSpec(id=xs))
    oom_python, oom_torch = root / "too-big-python", root / "too-big-torch"
    (root / "not-a-model").mkdir()  # a broken checkpoint: it passes planning, and loading it raises in every cell
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (root / "not-a-model" / name).write_text("{}")
    oom_python.symlink_to(rung, target_is_directory=True)
    oom_torch.symlink_to(rung, target_is_directory=True)
    path = _spec(
        root,
        [xs, s, str(root / "not-a-model"), str(oom_python), str(oom_torch)],
        methods={
            "steer_mean": {},
            "full_ft": {"train": {"lr": 1e30, "min_steps": 3, "max_steps": 3, "checkpoints": 0}},
            "lora": {"rank": 10**9, "train": {"min_steps": 1, "max_steps": 1, "checkpoints": 0}},
        },
        budgets=[16], seeds=[0], eval={"test_size": 30, "validation_size": 8, "neutral_size": 2},
    )  # fmt: skip
    env = {**os.environ, "STEERSCALE_TEST_LOAD_FAULTS": json.dumps({str(oom_python): "MemoryError", str(oom_torch): "OutOfMemoryError"})}
    run = subprocess.run(_cli("run", str(path), "--no-progress", "--no-dashboard"), capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _rows(root / "results")
    assert len(rows) == FAULT_CELLS and rows.cell_id.is_unique, "zero lost cells, zero duplicates"
    return path, root / "results", run, rows, env


def _failed(rows, mask):
    chosen = rows[mask]
    assert len(chosen) and (chosen.status == "failed").all() and (chosen.attempt == 1).all(), chosen[["slug", "status", "attempt"]]
    assert chosen.score.isna().all() and chosen.finished_at.notna().all()
    return chosen.error.tolist()


def test_a_cell_that_raises_is_a_failed_row(failing_sweep):
    *_, rows, _ = failing_sweep
    errors = _failed(rows, rows.model.str.endswith("not-a-model"))
    assert len(errors) == 3 and all("not-a-model" in e for e in errors), errors


def test_a_cell_whose_loss_goes_nan_is_a_failed_row(failing_sweep):
    *_, rows, _ = failing_sweep
    errors = _failed(rows, (rows.method == "full_ft") & rows.model.str.startswith("ladder:"))
    assert len(errors) == 2 and all(e.startswith("NonFiniteLossError: loss became") for e in errors), errors


def test_a_cell_out_of_memory_is_a_failed_row(failing_sweep):
    *_, rows, _ = failing_sweep
    python = _failed(rows, rows.model.str.endswith("too-big-python"))
    torch_oom = _failed(rows, rows.model.str.endswith("too-big-torch"))
    allocator = _failed(rows, (rows.method == "lora") & rows.model.str.startswith("ladder:"))
    assert len(python) == 3 and all(e.startswith("MemoryError: ") for e in python), python
    assert len(torch_oom) == 3 and all(e.startswith("OutOfMemoryError: ") for e in torch_oom), torch_oom
    assert len(allocator) == 2 and all("can't allocate memory" in e or "out of memory" in e.lower() for e in allocator), allocator


def test_the_sweep_goes_on_past_failed_cells_and_a_rerun_adds_nothing(failing_sweep, test_ladder):
    path, results, run, rows, env = failing_sweep
    ok = rows[rows.status == "ok"]
    assert sorted(ok.model) == sorted(test_ladder)
    assert (ok.method == "steer_mean").all() and ok.score.between(0, 1).all()
    assert f"2 ok, {FAULT_CELLS - 2} failed" in run.stdout
    before = _cell_files(results)
    again = subprocess.run(_cli("run", str(path), "--no-progress", "--no-dashboard"), capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr[-2000:]
    assert _cell_files(results) == before


def test_a_forced_rerun_that_fails_keeps_the_ok_row_it_would_replace(failing_sweep, test_ladder):
    """`--force` on a day the model no longer loads: the failure is said, the stored result stays."""
    path, results, _, rows, env = failing_sweep
    xs = test_ladder[0]
    stored = rows[(rows.model == xs) & (rows.status == "ok")]
    assert len(stored) == 1
    env = {**env, "STEERSCALE_TEST_LOAD_FAULTS": json.dumps({xs: "MemoryError"})}
    again = subprocess.run(_cli("run", str(path), "--no-progress", "--no-dashboard", "--force"), capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(its stored ok row is kept)" in again.stdout + again.stderr
    assert "1 of the failed cells had an ok row, which was kept" in again.stdout
    after = _rows(results).set_index("cell_id")
    kept = after.loc[stored.cell_id.iloc[0]]
    assert kept.status == "ok" and kept.finished_at == stored.finished_at.iloc[0] and kept.score == stored.score.iloc[0]
    assert len(after) == FAULT_CELLS


def test_an_address_with_no_cluster_is_a_clean_error_with_the_clusters_exit_code(tmp_path, capsys):
    """`run --address auto` with no cluster up printed Ray's ConnectionError traceback, exit 1."""
    import ray

    from orchestrator.cli import main
    from orchestrator.driver import connect
    from orchestrator.errors import ClusterUnreachableError

    from ray._private.services import find_gcs_addresses

    if ray.is_initialized() or find_gcs_addresses():  # "auto" joins any Ray on this machine (another test's)
        pytest.skip("a Ray is running here: --address auto would join it")
    with pytest.raises(ClusterUnreachableError, match="no Ray cluster to join at --address auto"):
        connect("auto")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": "unreachable", "results_dir": str(tmp_path / "r"), "models": [{"id": "ladder:test/xs"}],
                                      "tasks": ["facts"], "methods": {"base": {}}, "budgets": [0]}))  # fmt: skip
    assert main(["run", str(config), "--address", "auto"]) == 3
    assert "no Ray cluster to join" in capsys.readouterr().err


@pytest.mark.parametrize("listener", ["none", "silent"])
def test_an_address_where_nothing_listens_fails_in_seconds(tmp_path, listener):
    """`run --address host:port` with no cluster there retried Ray's GCS connection for over 10 minutes,
    printing only Ray's warnings. Now it stops with the cluster's clean error (exit 3) at once when the
    port refuses, and within JOIN_TIMEOUT_SECONDS when nothing answers (a listener whose backlog is full
    drops the SYN, as a firewall would), before it writes the sweep's plan."""
    from orchestrator.address import JOIN_TIMEOUT_SECONDS

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": "unreachable", "results_dir": str(tmp_path / "r"), "models": [{"id": "ladder:test/xs"}],
                                      "tasks": ["facts"], "methods": {"base": {}}, "budgets": [0]}))  # fmt: skip
    with contextlib.ExitStack() as stack:
        if listener == "silent":
            server = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=0))
            port = server.getsockname()[1]
            for _ in range(3):  # queued, never accepted: they fill the backlog
                filler = stack.enter_context(socket.socket())
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
        else:
            port = _free_port()
        started = time.monotonic()
        run = subprocess.run(_cli("run", str(config), "--no-progress", "--address", f"127.0.0.1:{port}"),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        took = time.monotonic() - started
    assert run.returncode == 3, run.stderr[-3000:]
    assert f"no Ray cluster to join at --address 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    reason = f"within {JOIN_TIMEOUT_SECONDS:g} s" if listener == "silent" else "Connection refused"
    assert reason in run.stderr, run.stderr[-3000:]
    assert took < JOIN_TIMEOUT_SECONDS + 60, f"took {took:.0f} s"  # Ray's own retries: over 600 s
    assert not (tmp_path / "r" / "plan.json").exists(), "a run that never started must not leave a plan for `status` to report"


@pytest.mark.parametrize("address", ["bogus", "ray://headnode"])
def test_an_address_without_a_port_is_refused_before_ray_is_asked(address):
    """`--address bogus` reached ray.init, whose ValueError ("Invalid address format") was a traceback, exit 1."""
    from orchestrator.address import check_listening

    with pytest.raises(ConfigError, match=rf"--address {address}: give the head's host:port .* or auto / local"):
        check_listening(address)
    check_listening("auto")  # left to Ray: no port to try


def test_ctrl_c_as_a_run_ends_leaves_no_traceback_and_no_ray_behind(tmp_path, test_ladder):
    """Ctrl-C just after the last row was stored, during Ray's ~2 s shutdown (left to its exit hook), printed
    "Exception ignored in atexit callback ... KeyboardInterrupt" and left Ray's agents running, orphaned."""
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": "late-ctrl-c", "results_dir": str(tmp_path / "r"), "models": [{"id": "ladder:test/xs"}],
                                      "tasks": ["facts"], "methods": {"base": {}}, "budgets": [0],
                                      "eval": {"test_size": 4, "validation_size": 0, "neutral_size": 2}}))  # fmt: skip
    before = set(psutil.pids())
    driver = subprocess.Popen(_cli("run", str(config), "--no-progress", "--no-dashboard"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    assert driver.stdout is not None
    for line in driver.stdout:
        if line.startswith("results:"):  # the run's last line: what follows is Ray's shutdown
            break
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    # 0 once Ctrl-C is held off; 130 if it broke off the run; or killed by it (what a shell reports as 130) if it
    # landed in the interpreter's teardown, where Python has given SIGINT back to the system's default action
    assert driver.returncode in (0, 130, -signal.SIGINT), err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert len(_rows(tmp_path / "r")) == 1

    def ray_left() -> list[str]:
        found = []
        for pid in set(psutil.pids()) - before:
            with contextlib.suppress(psutil.Error):
                command = " ".join(psutil.Process(pid).cmdline())
                if "ray" in command:
                    found.append(command[:200])
        return found

    deadline = time.time() + 30
    while ray_left() and time.time() < deadline:
        time.sleep(1)
    assert not ray_left(), ray_left()


_INTERRUPTED_AS_RAY_STARTS = """
import ray._private.node as node
from orchestrator.driver import connect

started = node.Node.start_ray_processes

def interrupted(self):
    started(self)
    raise KeyboardInterrupt  # Ctrl-C once Ray's processes run, before ray.init has recorded its node

node.Node.start_ray_processes = interrupted
try:
    connect(None, dashboard=False)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_while_ray_starts_leaves_no_ray_behind():
    """Ctrl-C in the seconds ray.init takes to start a private Ray left its agents running, orphaned (in a third to
    all of the tries here, and 5 of 7 Ctrl-Cs from a shell): ray.init records the node only once it is up, so
    ray.shutdown() knew of none, and a raylet ended while it starts its agents leaves them behind."""
    mark = f"ctrl-c-as-ray-starts-{os.getpid()}-{time.time_ns()}"  # inherited by every process Ray starts: finds them, and only them
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_AS_RAY_STARTS], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "STEERSCALE_TEST_MARK": mark})  # fmt: skip
    assert done.stdout.strip() == "interrupted", done.stderr[-3000:]

    def marked() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.status() != psutil.STATUS_ZOMBIE and process.environ().get("STEERSCALE_TEST_MARK") == mark:
                    found.append(process)
        return found

    deadline = time.time() + 30
    while marked() and time.time() < deadline:
        time.sleep(1)
    left = [" ".join(p.cmdline())[:200] for p in marked()]
    for process in marked():  # a failing run leaves nothing behind for the next test
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not left, left


def test_a_ray_the_caller_started_is_left_running(tmp_path):
    """`main` stops the Ray it started; one a notebook (or a script) had up before calling it is the caller's."""
    import ray

    from orchestrator.cli import main

    if ray.is_initialized():
        pytest.skip("a Ray is already up in this process")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["status", str(tmp_path / "none.yaml")]) == 2
        assert ray.is_initialized()
    finally:
        ray.shutdown()
