"""Claims between drivers on one results directory: a cell is run by one driver only."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from orchestrator.claims import Claims
from orchestrator.store import ResultsStore
from workers.schema import SCHEMA_VERSION


def _claim(claims: Claims, cells: list[str], planned_at: float | None = None) -> set[str]:
    """What a driver handing out `cells` one by one gets to run."""
    return {cell for cell in cells if claims.acquire(cell, planned_at=time.time() if planned_at is None else planned_at)}


def _drivers(tmp_path) -> tuple[Claims, Claims]:
    store = ResultsStore(str(tmp_path / "r"))
    return Claims(store, owner={"host": "h", "pid": 1, "run": "a"}), Claims(store, owner={"host": "h", "pid": 1, "run": "b"})


def test_two_drivers_claiming_at_once_never_share_a_cell(tmp_path):
    """Both claim every cell side by side, many times over: each cell goes to exactly one. A claim
    used to be created empty and written after, and a driver reading it in between took it for
    stale, deleted it and ran the cell too."""
    cells = [f"c{i}" for i in range(300)]
    for _ in range(5):
        a, b = _drivers(tmp_path)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda claims: _claim(claims, cells), (a, b)))
        assert not got[0] & got[1] and got[0] | got[1] == set(cells)
        a.release_all()
        b.release_all()


def test_a_claim_being_heartbeaten_is_never_taken_over(tmp_path):
    holder, other = _drivers(tmp_path)
    cells = [f"c{i}" for i in range(100)]
    assert _claim(holder, cells) == set(cells)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            holder.heartbeat()

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        taken = [_claim(other, cells) for _ in range(20)]
    finally:
        stop.set()
        beating.join()
    assert taken == [set()] * 20


def test_a_cell_another_driver_stored_after_this_one_planned_is_not_claimed(tmp_path):
    """The other driver stores the row and then releases its claim; one that planned before that
    (while its Ray was starting) must not run the cell again. A row older than the plan is rerun
    (`--force`, `--retry-failed`)."""
    a, _ = _drivers(tmp_path)
    now = datetime.now(timezone.utc)
    row = {"schema_version": SCHEMA_VERSION, "sweep": "s", "slug": "x", "status": "ok", "started_at": now, "finished_at": now}
    a.store.write({**row, "cell_id": "old"})
    planned_at = time.time()
    a.store.write({**row, "cell_id": "new"})
    assert _claim(a, ["old", "new", "never"], planned_at) == {"old", "never"}
    assert a.held == {"old", "never"}
