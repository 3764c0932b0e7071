"""The README's cluster path for real: `ray start --head`, then `ray job submit` of a sweep.

A job runs in Ray's temporary copy of the working dir with the project pip-installed into a fresh
environment there; nothing else in the tests goes through that path (the runtime env, the
`${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}` placeholder, `--address auto` from inside a job).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.address import check_listening
from workers.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = '{"pip": ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]}'  # as in the README


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    return subprocess.run([ray, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_a_sweep_submitted_as_a_ray_job_stores_its_rows(tmp_path, test_ladder, write_sweep):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray 2.60's head enables token auth; its clients must say so
    dashboard = _free_port()
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths live under it
    started = _ray("start", "--head", "--num-cpus", "2", "--port", str(_free_port()), "--temp-dir", temp, "--include-dashboard",
                   "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), env=env)  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        head = re.search(r"ray start --address='([^']+)'", started.stdout).group(1)  # Ray binds the machine's own address
        check_listening(head)  # a real head's GCS answers the HTTP/2 preface
        with pytest.raises(ConfigError, match="an HTTP/1 server, such as the Ray dashboard"):
            check_listening(f"127.0.0.1:{dashboard}")  # its dashboard does not: Ray's own join retried it for 10 minutes
        config = write_sweep({
            "sweep": "job", "models": [{"id": test_ladder[0]}], "tasks": ["facts"], "methods": {"base": {}, "steer_mean": {}},
            "budgets": [8], "method_budgets": {"base": [0]}, "eval": {"test_size": 20, "validation_size": 8, "neutral_size": 2},
        })  # fmt: skip
        job = _ray("job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", ".",
                   "--runtime-env-json", RUNTIME_ENV, "--", "steerscale", "run", str(config), "--address", "auto",
                   "--no-progress", env=env)  # fmt: skip
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-4000:]
        rows = pq.read_table(tmp_path / "results" / "job" / "cells").to_pandas()
        assert sorted(rows.method) == ["base", "steer_mean"] and (rows.status == "ok").all(), rows[["method", "error"]]
    finally:
        _ray("stop", "--force", env=env, timeout=120)  # stops every local Ray process: tests never share the box with another
        shutil.rmtree(temp, ignore_errors=True)
