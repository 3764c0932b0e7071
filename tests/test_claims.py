"""Claims between drivers on one results directory: a cell is run by one driver only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest

from interrupts import exited_pid
from orchestrator.claims import Claims, _process_start
from orchestrator.store import MTIME_SLACK_SECONDS, ResultsStore
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


def test_a_claim_taken_over_is_left_to_its_new_owner(tmp_path):
    """A's claim went a ttl without a heartbeat (a paused machine) and B took it over: A's next heartbeat used to
    write A's claim over B's and A's release to delete B's, so a third driver ran the cell too. Now A's
    heartbeat reports the claim lost and leaves it, as does A's release."""
    a, b = _drivers(tmp_path)
    assert _claim(a, ["c1", "c2"]) == {"c1", "c2"}
    claim = tmp_path / "r" / "claims" / "c1.json"
    os.utime(claim, (time.time() - 2 * a.ttl_seconds,) * 2)
    assert _claim(b, ["c1", "c2"]) == {"c1"}
    assert a.heartbeat() == ["c1"] and a.held == {"c2"}
    assert '"run": "b"' in claim.read_text()
    a.release("c1")
    assert claim.exists() and '"run": "b"' in claim.read_text()
    a.release("c2")
    assert not (tmp_path / "r" / "claims" / "c2.json").exists()


def test_a_cell_another_driver_stored_after_this_one_planned_is_not_claimed(tmp_path):
    """The other driver stores the row and then releases its claim; one that planned before that
    (while its Ray was starting) must not run the cell again. A row older than the plan is rerun
    (`--force`, `--retry-failed`)."""
    a, _ = _drivers(tmp_path)
    now = datetime.now(timezone.utc)
    row = {"schema_version": SCHEMA_VERSION, "sweep": "s", "slug": "x", "status": "ok", "started_at": now, "finished_at": now}
    a.store.write({**row, "cell_id": "old"})
    planned_at = time.time()
    stored_at = planned_at - MTIME_SLACK_SECONDS - 1  # older than the store's times may read early (`written_since`)
    os.utime(a.store.cell_path("old"), (stored_at, stored_at))
    a.store.write({**row, "cell_id": "new"})
    assert _claim(a, ["old", "new", "never"], planned_at) == {"old", "never"}
    assert a.held == {"old", "never"}



def _resumed_drivers(tmp_path, cells: list[str]) -> tuple[Claims, Claims]:
    """Two drivers on this host started after a driver that held `cells` was killed."""
    store = ResultsStore(str(tmp_path / "r"))
    dead = Claims(store, owner={"host": socket.gethostname(), "pid": exited_pid(), "run": "dead"})
    assert _claim(dead, cells) == set(cells)
    return Claims(store, owner={**OWNER, "run": "b"}), Claims(store, owner={**OWNER, "run": "c"})


OWNER = {"host": socket.gethostname(), "pid": os.getpid()}


def test_two_drivers_taking_over_the_same_stale_claim_do_not_both_run_the_cell(tmp_path):
    """Resumed after a crash, both walk the cells in the same order and find the dead driver's claim
    stale at once. C judged it stale; before C replaces it, B takes it over. C used to delete B's
    fresh claim and write its own: both ran the cell."""
    b, c = _resumed_drivers(tmp_path, ["c1"])
    judged = c._is_stale

    def b_takes_it_over_meanwhile(path: str) -> bool:
        verdict = judged(path)
        if path.endswith("c1.json") and not b.held:
            assert b.acquire("c1", planned_at=time.time())
        return verdict

    c._is_stale = b_takes_it_over_meanwhile
    assert not c.acquire("c1", planned_at=time.time())
    assert b.held == {"c1"} and not c.held


def test_a_guard_left_by_a_driver_killed_mid_takeover_is_taken_over_by_one_driver(tmp_path):
    """The dead driver also left `<claim>.takeover`. C judged that guard stale; before C cleared it, B did and made
    its own to take the claim over. C used to delete B's fresh guard, and both took the claim; now C backs off."""
    b, c = _resumed_drivers(tmp_path, ["c1"])
    guard = c._path("c1") + ".takeover"
    dead = Claims(b.store, owner={"host": socket.gethostname(), "pid": exited_pid(), "run": "dead"})
    assert dead._create(guard)
    judged = c._is_stale

    def b_clears_the_guard_meanwhile(path: str) -> bool:
        verdict = judged(path)
        if path == guard and '"run": "dead"' in open(path).read():
            b._delete(guard)
            assert b._create(guard)  # B, mid-takeover, holds the guard
        return verdict

    c._is_stale = b_clears_the_guard_meanwhile
    assert not c.acquire("c1", planned_at=time.time()) and not c.held
    assert '"run": "b"' in open(guard).read()
    b._delete(guard)  # B's takeover goes on: the claim is B's alone
    assert b.acquire("c1", planned_at=time.time()) and not c.acquire("c1", planned_at=time.time())
    assert sorted(p.name for p in (tmp_path / "r" / "claims").iterdir()) == ["c1.json"]


def test_a_pid_is_looked_up_only_in_its_own_namespace_and_only_as_the_process_that_claimed(tmp_path):
    """A driver in another container on this host (`docker --network host`: one host name, its own pids) is not
    dead because its pid is not running here; a claim whose pid now belongs to another process is a dead driver's."""
    store = ResultsStore(str(tmp_path / "r"))
    here = Claims(store)
    elsewhere = Claims(store, owner={**here.owner, "pidns": "pid:[1]", "pid": exited_pid(), "run": "other"})
    assert elsewhere.acquire("c1", planned_at=time.time())
    assert not here.acquire("c1", planned_at=time.time())  # by its age, as another host's
    reused = Claims(store, owner={**here.owner, "pid": os.getppid(), "started": "an earlier process's start", "run": "old"})
    assert reused.acquire("c2", planned_at=time.time())
    assert here.acquire("c2", planned_at=time.time())  # the pid runs, but not the process that claimed
    alive = Claims(store, owner={**here.owner, "run": "alive"})  # this very process: alive, same start
    assert alive.acquire("c4", planned_at=time.time()) and not here.acquire("c4", planned_at=time.time())
    ticks = int(open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[19])  # since boot: no wall clock in it
    assert here.owner["started"] == _process_start(os.getpid()) and here.owner["started"].endswith(f":{ticks}")


def test_resumed_drivers_taking_over_side_by_side_split_the_cells(tmp_path):
    cells = [f"c{i}" for i in range(300)]
    b, c = _resumed_drivers(tmp_path, cells)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda claims: _claim(claims, cells), (b, c)))
    assert not got[0] & got[1] and got[0] | got[1] == set(cells)
    assert not list((tmp_path / "r" / "claims").glob("*.takeover"))


def test_a_claim_released_while_another_driver_looks_at_it_is_taken_not_a_crash(tmp_path):
    """The holder stores the row and releases between the other driver's failed create and its look
    at the claim: the claim is gone, so the other takes the cell (and `written_since` then decides),
    where deleting the vanished file raised FileNotFoundError out of the driver."""
    holder, other = _drivers(tmp_path)
    assert holder.acquire("c1", planned_at=time.time())
    judged = other._is_stale

    def released_meanwhile(path: str) -> bool:
        holder.release("c1")
        return judged(path)

    other._is_stale = released_meanwhile
    assert other.acquire("c1", planned_at=time.time())


def test_a_claim_released_during_a_takeover_is_not_deleted_from_under_a_third_driver(tmp_path):
    """C takes over the dead driver's claim; as C looks again under its guard, the claim has just gone (released) and
    B, with a plain create, claims the cell. C used to delete what was there, B's fresh claim, and make its own:
    both ran the cell. Gone, there is nothing to delete: C's create fails on B's claim."""
    b, c = _resumed_drivers(tmp_path, ["c1"])
    judged, looks = c._is_stale, []

    def released_and_claimed_meanwhile(path: str):
        looks.append(path)
        if path.endswith("c1.json") and len(looks) == 2:  # the look under the guard
            os.remove(path)  # released (its row stored) by whoever held it
            verdict = judged(path)
            assert b.acquire("c1", planned_at=time.time())  # B finds no claim: its plain create succeeds
            return verdict
        return judged(path)

    c._is_stale = released_and_claimed_meanwhile
    assert not c.acquire("c1", planned_at=time.time()) and not c.held
    assert b.held == {"c1"} and '"run": "b"' in (tmp_path / "r" / "claims" / "c1.json").read_text()


def test_claims_stay_exclusive_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    """A bucket mounted with FUSE or an SMB share refuses os.link: claims are then created with
    O_EXCL and written after, and a claim caught empty in between is judged by its age, not taken."""

    def no_links(_source: str, _target: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    cells = [f"c{i}" for i in range(300)]
    a, b = _drivers(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda claims: _claim(claims, cells), (a, b)))
    assert not got[0] & got[1] and got[0] | got[1] == set(cells)
    (tmp_path / "r" / "claims" / "empty.json").write_bytes(b"")  # created, not yet written
    assert not a.acquire("empty", planned_at=time.time())



def test_a_claim_holding_json_that_is_not_a_claim_is_judged_by_its_age(tmp_path):
    """`[]` where a claim's object should be raised AttributeError out of `acquire`; fresh, it is held."""
    a, _ = _drivers(tmp_path)
    a.store.filesystem.create_dir(a.directory, recursive=True)
    (tmp_path / "r" / "claims" / "odd.json").write_text("[]")
    assert not a.acquire("odd", planned_at=time.time())
    a.ttl_seconds = 0.0  # as old as a dead driver's
    assert a.acquire("odd", planned_at=time.time())


def test_a_claim_write_cut_short_leaves_no_temp_file(tmp_path, monkeypatch):
    """Ctrl-C while a claim was written left `<claim>.<hex>.tmp` in claims/ for good."""
    import os

    from orchestrator import claims

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claims._write_local(str(tmp_path / "cell.json"), b"{}", exclusive=True)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        claims._write_local(str(tmp_path / "cell.json"), b"{}", exclusive=False)
    assert list(tmp_path.iterdir()) == []


def test_a_live_driver_on_another_machine_of_the_same_name_keeps_its_claims(tmp_path):
    """Host names repeat, and outside containers every kernel's pid namespace reads the same: a fresh claim of a live
    driver on another machine named alike was judged by its pid looked up here (not running), and taken over at once."""
    store = ResultsStore(str(tmp_path / "r"))
    here = Claims(store, owner={**Claims(store).owner, "machine": "this machine's id"})  # whether or not this box has one
    twin = Claims(store, owner={**here.owner, "machine": "another machine's id", "pid": exited_pid(), "run": "twin"})
    assert twin.acquire("c1", planned_at=time.time())
    assert not here.acquire("c1", planned_at=time.time())  # by its age, as another host's


def test_a_killed_driver_its_parent_has_not_reaped_holds_no_claims(tmp_path):
    """A driver SIGKILLed under a parent that does not wait() for it (a notebook's Popen) is a zombie: its pid answers
    signals and its start time reads as before, so a rerun left its cells alone for 15 minutes."""
    store = ResultsStore(str(tmp_path / "r"))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        here = Claims(store)
        killed = Claims(store, owner={**here.owner, "pid": child.pid, "started": _process_start(child.pid), "run": "killed"})
        assert killed.acquire("c1", planned_at=time.time())
        assert here.acquire("c1", planned_at=time.time())
    finally:
        child.wait()


def test_a_claim_whose_stored_row_check_failed_is_still_this_drivers_on_the_next_try(tmp_path):
    """The store's "stored since?" check failed after the claim was made; the driver tries again (a hiccup), and the
    claim, now on file and this live driver's own, read as another live driver's: the cell was skipped as claimed."""

    class HiccupStore(ResultsStore):
        hiccups = 1

        def written_since(self, cell_id: str, since: float) -> bool:
            if self.hiccups:
                self.hiccups -= 1
                raise OSError("the store did not answer")
            return super().written_since(cell_id, since)

    claims = Claims(HiccupStore(str(tmp_path / "r")))
    with pytest.raises(OSError, match="did not answer"):
        claims.acquire("c1", planned_at=time.time())
    assert claims.acquire("c1", planned_at=time.time()) and claims.held == {"c1"}


def test_a_claim_written_though_its_write_reported_an_error_is_this_drivers_on_the_next_try(tmp_path):
    """A write that landed but raised (an object store's PUT timing out client-side): the next try read the claim as
    another live driver's, skipped the cell, and never released the claim (not held), which outlived the run."""

    class LandedThenRaised(Claims):
        failures = 1

        def _create(self, path: str) -> bool:
            created = super()._create(path)
            if self.failures:
                self.failures -= 1
                raise OSError("the store timed out")
            return created

    claims = LandedThenRaised(ResultsStore(str(tmp_path / "r")))
    with pytest.raises(OSError, match="timed out"):
        claims.acquire("c1", planned_at=time.time())
    assert claims.acquire("c1", planned_at=time.time()) and claims.held == {"c1"}
    claims.release_all()
    assert not claims.held_by_live_drivers()
