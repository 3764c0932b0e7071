"""Ctrl-C as a terminal sends it: to every process of a command's foreground group, here while the
process pool the command spawned is still starting (its workers import for seconds). And the pid of a
process gone, as a SIGKILLed driver's claims name it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil


def interrupt_as_workers_start(args: list[str], *, workers: int, env: dict[str, str] | None = None) -> tuple[int, str, list[psutil.Process]]:
    """Run `python -m orchestrator.cli *args` in its own process group, send the group SIGINT once
    `workers` pool workers exist, and return its exit code, its stderr and those of the workers still running after it."""
    command = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(started := pool_workers(command.pid)) < workers and command.poll() is None:
            assert time.monotonic() < deadline, "the command never started its pool's workers"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers are importing
        os.killpg(command.pid, signal.SIGINT)
        _, err = command.communicate(timeout=120)
        survivors = _still_running(started, within=10.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(command.pid, signal.SIGKILL)  # a failed test leaves nothing running
    return command.returncode, err, survivors


def _still_running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of `processes` that have not ended (zombies count as ended) `within` seconds from now."""
    deadline = time.monotonic() + within
    while True:
        running = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


def pool_workers(pid: int) -> list[psutil.Process]:
    """A process pool's workers among `pid`'s children (not multiprocessing's resource tracker)."""
    workers = []
    for child in psutil.Process(pid).children():
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            if "spawn_main" in " ".join(child.cmdline()):
                workers.append(child)
    return workers


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped: what a SIGKILLed driver's claims name."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
