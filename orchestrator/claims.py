"""Claims: so two drivers on the same results directory never run the same cell at once.

A driver claims a cell by creating `claims/<cell_id>.json` exclusively when it hands the cell to a
worker and deletes the claim once the row is stored, so two drivers split a sweep's cells between them. A claim is stale — and may be taken over — when its
driver's process is gone (same host, machine id and pid namespace, that pid not alive or another process since: e.g. a
SIGKILLed driver, so an immediate rerun resumes at once) or when its heartbeat is older than `ttl` (a driver on another host that died).
Exclusive creation is atomic on local and shared POSIX filesystems; on object stores it is
best effort (check, then write), which the docs say. Taking over a stale claim goes through a
second exclusive file, `<claim>.takeover`: drivers that find the same claim stale at once (two
resumed after a crash walk the cells in the same order) do not each delete the other's fresh claim.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from pyarrow import fs

from orchestrator.store import ResultsStore

IO_THREADS = 16  # claim files written or deleted at once (each a round trip on an object store)
TAKEOVER_DEPTH = 2  # guards of guards (`Claims._take_over`): each level left stale needs a driver killed inside a takeover


def _write_local(path: str, payload: bytes, *, exclusive: bool) -> bool:
    """Put a whole claim at `path` at once; with `exclusive`, only if none is there (False if one is).

    Written to a temp name first, then linked (exclusive: fails on an existing claim) or renamed into
    place: opening the claim itself with O_EXCL and writing after left an instant in which another
    driver read an empty claim, took it for stale, and ran the cell too.
    """
    temp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:  # the temp goes however this ends (a Ctrl-C mid-write left one in claims/)
        with open(temp, "wb") as handle:
            handle.write(payload)
        if not exclusive:
            os.replace(temp, path)
            return True
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (a FUSE mount of a bucket, SMB): create it exclusively, then write
            return _create_then_write(path, payload)
        return True
    finally:
        with suppress(FileNotFoundError):  # renamed into place, or never created
            os.unlink(temp)


def _create_then_write(path: str, payload: bytes) -> bool:
    """Exclusive creation where links are not to be had (best effort across hosts on a FUSE mount of a
    bucket, as on object stores); for the instant the claim is empty, a reader judges it by its age
    alone (`Claims._is_stale`), so it is not taken for a dead driver's (a driver killed in that instant
    leaves a claim taken over only after `ttl_seconds`)."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return False
    with os.fdopen(handle, "wb") as claim:
        claim.write(payload)
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Process `pid`'s fields in Linux's /proc/<pid>/stat from its state on (field 3), counted after the command name
    in parentheses (which may hold spaces); None where /proc has no such entry (another OS; a pid hidden from this user)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """When process `pid` started, as this boot's id and the start in clock ticks since boot (Linux's /proc), which
    names one process for good: psutil's create_time adds the boot time in wall-clock seconds, which moves when
    the clock is stepped (NTP, a VM resumed), and a live driver read as another process lost its claims. None
    where /proc has no such entry."""
    return _start_in(_stat_fields(pid))


def _start_in(fields: list[str] | None) -> str | None:
    """`_process_start` from a process's `_stat_fields`, read once where its state is wanted too."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return None if fields is None else f"{boot}:{fields[19]}"  # field 22


def _alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` runs, and is the one that started at `started` (`_process_start`, where the claim says):
    a pid reused since by another process does not keep a dead driver's claims, nor does a killed driver its parent
    has not reaped yet (a zombie: a notebook's `Popen`, a container's init that reaps nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's: not to be looked into further
        return True
    fields = _stat_fields(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False
    now = None if started is None else _start_in(fields)
    return now is None or now == started


def _machine_id() -> str | None:
    """This machine's id (systemd's /etc/machine-id, or D-Bus's), None where it has none: host names repeat across
    machines, and the pid namespace outside containers is the same constant on every Linux kernel, so a live driver
    on another machine of the same name had its claims judged by a pid looked up here. (Machines cloned from one
    image may share an id: then the host name and pids decide, as before; a claim without one is judged by its age.)"""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with suppress(OSError):
            if machine := Path(path).read_text().strip():
                return machine
    return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers sharing a host name (`docker --network host`) number their
    processes apart, so a pid is looked up only in the namespace of the driver that wrote it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner() -> dict:
    return {"host": socket.gethostname(), "machine": _machine_id(), "pidns": _pid_namespace(), "pid": os.getpid(),
            "started": _process_start(os.getpid()), "run": uuid.uuid4().hex[:8]}  # fmt: skip


@dataclass
class Claims:
    store: ResultsStore
    ttl_seconds: float = 900.0
    owner: dict = field(default_factory=_owner)
    held: set[str] = field(default_factory=set)
    _directory_made: bool = False

    @property
    def directory(self) -> str:
        return f"{self.store.root}/claims"

    def _path(self, cell_id: str) -> str:
        return f"{self.directory}/{cell_id}.json"

    def _read(self, path: str) -> dict:
        """The claim at `path`: FileNotFoundError if there is none; ValueError if it holds no claim (empty, half written)."""
        with self.store.filesystem.open_input_stream(path) as stream:
            claim = json.loads(stream.read().decode())
        if not isinstance(claim, dict):
            raise ValueError("not a claim")
        return claim

    def _is_stale(self, path: str) -> Literal["gone", "stale"] | None:
        """Why the claim at `path` may be taken: "gone" (released meanwhile: nothing to delete) or "stale" (its driver
        is dead, or silent past `ttl_seconds`); None while a live driver holds it."""
        try:
            info = self.store.filesystem.get_file_info(path)
            if info.type == fs.FileType.NotFound:
                return "gone"
            claim = self._read(path)
        except FileNotFoundError:
            return "gone"
        except (ValueError, OSError):
            claim = {}  # empty or half written (see `_create_then_write`), or a read that failed: judged by its age alone
        same_processes = all(claim.get(key) == self.owner.get(key) for key in ("host", "machine", "pidns"))
        if same_processes and not _alive(int(claim.get("pid", -1)), claim.get("started")):
            return "stale"
        age = time.time() - (info.mtime.timestamp() if info.mtime else 0)
        return "stale" if age > self.ttl_seconds else None

    def _delete(self, path: str) -> None:
        try:
            self.store.filesystem.delete_file(path)
        except FileNotFoundError:
            pass  # released or taken over by another driver meanwhile

    def _take_over(self, path: str, depth: int = 0) -> bool:
        """Replace the stale claim at `path` with this driver's; False when another driver got there first.

        Whoever creates `<claim>.takeover` first checks the claim again and replaces it; a driver that
        judged the same claim stale a moment earlier then finds the guard, or the new claim, and backs
        off, where deleting and creating straight away let both delete, create and run the cell. A guard
        left by a driver that died mid-takeover is stale itself: it is taken over the same way, under a
        guard of its own (clearing it outright let a driver that judged it stale delete the guard another
        had just made, and both took the claim); past `TAKEOVER_DEPTH` such leftovers, it is deleted.
        """
        guard = f"{path}.takeover"
        if not self._create(guard):
            if not self._is_stale(guard):
                return False  # another driver is taking it over now
            if depth < TAKEOVER_DEPTH:
                if not self._take_over(guard, depth + 1):
                    return False
            else:
                self._delete(guard)
                if not self._create(guard):
                    return False
        try:
            why = self._is_stale(path)
            if why is None:
                return False
            if why == "stale":  # gone: a claim made since is a third driver's, made plainly, and must not be deleted
                self._delete(path)
            return self._create(path)
        finally:
            self._delete(guard)

    def _create(self, path: str) -> bool:
        payload = json.dumps({**self.owner, "claimed_at": time.time()}).encode()
        if isinstance(self.store.filesystem, fs.LocalFileSystem):
            return _write_local(path, payload, exclusive=True)
        if self.store.filesystem.get_file_info(path).type != fs.FileType.NotFound:
            return False
        with self.store.filesystem.open_output_stream(path) as stream:
            stream.write(payload)
        return True

    def acquire(self, cell_id: str, *, planned_at: float) -> bool:
        """Claim the cell; False when another live driver holds it, or stored its row after this
        driver read the store at `planned_at` (and released its claim: the row is written first).

        The driver claims a cell when it hands it to a worker, not all of them up front: a second
        driver started on the same directory then takes the cells the first has not reached yet."""
        if not self._directory_made:
            self.store.filesystem.create_dir(self.directory, recursive=True)
            self._directory_made = True
        path = self._path(cell_id)
        # A claim on file that is this run's own is a try that failed after making it (the stored-row check below, or
        # a write that landed though it reported an error) and the driver tries again: read as another live driver's,
        # its cell was skipped, and the claim, not held, outlived the run
        if not self._create(path) and not self._still_ours(cell_id) and not (self._is_stale(path) and self._take_over(path)):
            return False
        self.held.add(cell_id)
        if self.store.written_since(cell_id, planned_at):
            self.release(cell_id)
            return False
        return True

    def _still_ours(self, cell_id: str) -> bool:
        """Whether the cell's claim is still this driver's run's: another driver takes one over once it has gone
        `ttl_seconds` without a heartbeat (a paused VM, a store unreachable that long), and this driver's
        heartbeat or release must not then overwrite or delete the new owner's claim."""
        try:
            return self._read(self._path(cell_id)).get("run") == self.owner["run"]
        except (FileNotFoundError, ValueError):
            return False

    def release(self, cell_id: str) -> None:
        self.held.discard(cell_id)
        if self._still_ours(cell_id):
            self._delete(self._path(cell_id))

    def heartbeat(self) -> list[str]:
        """Refresh the mtime of every held claim, so long cells are not taken over by other hosts
        (side by side: on an object store each is a round trip, and the driver schedules no cell while this runs).
        Returns the cells whose claims another driver took over meanwhile (they are no longer held): both run them."""
        payload = json.dumps({**self.owner, "heartbeat_at": time.time()}).encode()

        def refresh(cell_id: str) -> bool:
            if not self._still_ours(cell_id):
                return False
            if isinstance(self.store.filesystem, fs.LocalFileSystem):  # never an empty claim another driver could read as stale
                _write_local(self._path(cell_id), payload, exclusive=False)
                return True
            with self.store.filesystem.open_output_stream(self._path(cell_id)) as stream:
                stream.write(payload)
            return True

        held = list(self.held)
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            lost = [cell_id for cell_id, kept in zip(held, pool.map(refresh, held)) if not kept]
        self.held.difference_update(lost)
        return lost

    @contextmanager
    def exclusive(self, path: str, wait_seconds: float = 120.0) -> Iterator[None]:
        """Hold the lock file `path` while the block runs: a short critical section among drivers (the
        adaptive log's read, append and rewrite, which two drivers at once would each write over the
        other's). Waits for a live holder; a stale one (dead process, or older than `ttl_seconds`) is taken over."""
        deadline = time.monotonic() + wait_seconds
        while not (self._create(path) or (self._is_stale(path) and self._take_over(path))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} has been held by another driver for over {wait_seconds:g}s; if none is running, delete it")
            time.sleep(0.05)
        try:
            yield
        finally:
            self._delete(path)

    def held_by_live_drivers(self) -> set[str]:
        """The cells some driver holds a claim on now, a dead driver's stale claims left out: what runs (or waits
        for a worker) in a sweep in progress, for `status`."""
        listing = fs.FileSelector(self.directory, allow_not_found=True)
        names = [info.base_name for info in self.store.filesystem.get_file_info(listing) if info.base_name.endswith(".json")]
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:  # on an object store each is two round trips
            stale = list(pool.map(self._is_stale, [f"{self.directory}/{name}" for name in names]))
        return {name.removesuffix(".json") for name, gone in zip(names, stale) if not gone}

    def release_all(self) -> None:
        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            list(pool.map(self.release, list(self.held)))
