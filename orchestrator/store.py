"""The results store: `<results_dir>/cells/<cell_id>.parquet`, one row per cell.

It is a plain Parquet dataset (any reader — pandas, polars, duckdb — can open `cells/`), on a local
disk or any `pyarrow.fs` URI. Writes are atomic (see `workers.rowfile`); a file whose content cannot
be read (truncated, foreign) is reported, and moved to `quarantine/` by `run` (not by the read-only
`plan` and `status`), so reading and fitting go on. An I/O error reading the store raises instead;
a permission denied as a ConfigError naming the results directory (the user's to fix, not a bug).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from analysis.io import holds_sweep, probe
from workers.config import ConfigError
from workers.rowfile import TEMP_PREFIX, check_writable_at, filesystem_and_path, write_atomically, write_rows_at
from workers.schema import RESULT_SCHEMA


READ_THREADS = 8  # cell files read at once by `scan`
MTIME_SLACK_SECONDS = 2.0  # a stored row's time may read this much early (`ResultsStore.written_since`)
# A temp file of a row this old is a killed writer's (a write takes seconds), not one in flight: `run` clears it
STALE_TEMP_SECONDS = 3600.0
SECONDS = ("train_seconds", "eval_seconds")  # a cell's own compute, summed by `scan` for `plan`'s estimate


class StoredCell(NamedTuple):
    """What `scan` reads of one cell file: enough for status tables and compute estimates."""

    cell_id: str
    status: str  # "ok" | "failed"
    model: str
    method: str
    seconds: float | None  # train + eval seconds, where recorded
    sweep: str = ""  # the sweep that stored it (cell ids leave the sweep's name out: another sweep's identical cell is this one)
    error: str = ""  # a failed cell's error, its first line (what `status` lists)


@dataclass
class StoreScan:
    """Every readable cell file, and the files that were set aside."""

    cells: dict[str, StoredCell] = field(default_factory=dict)  # by cell_id
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def statuses(self) -> dict[str, str]:
        """cell_id -> "ok" | "failed", built on each call (a method, so a loop does not rebuild it unseen)."""
        return {cell_id: cell.status for cell_id, cell in self.cells.items()}

    def counts(self) -> Counter:
        return Counter(cell.status for cell in self.cells.values())


class ResultsStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        try:  # an unknown scheme, or a bucket that cannot be reached: said here, not as a traceback mid-scan
            self.filesystem, self.root = filesystem_and_path(self.uri)
            if "://" in self.uri:
                probe(self.uri)  # a gs:// bucket without credentials answers in seconds, not 15 minutes
            else:
                self.filesystem.get_file_info(self.root)
        except (OSError, pa.ArrowInvalid) as err:
            raise ConfigError(f"results_dir {self.uri}: cannot reach it ({err})") from None
        self.cells_dir = f"{self.root}/cells"

    def cell_path(self, cell_id: str) -> str:
        """Where the cell's row is stored, inside `self.filesystem`."""
        return f"{self.cells_dir}/{cell_id}.parquet"

    def where(self, name: str) -> str:
        return shown_inside(self.uri, name)

    def check_readable(self) -> None:
        """Refuse a directory (or its cells/) this user may not list, before a command reads half of it.
        Local stores only: where a permission denied comes from (a remote store's access is `probe`'s)."""
        if self.filesystem.type_name != "local":
            return
        try:
            for folder in (self.root, self.cells_dir):
                self.filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
        except PermissionError as err:
            raise self._unreadable(err) from None
        except NotADirectoryError:
            raise self._cells_not_a_folder() from None

    def check_writable(self) -> None:
        """Refuse a directory this user may not write to, before a command spends minutes on what it would write
        there: a probe file written and removed (a run's plan is written once its models and data are ready)."""
        try:
            check_writable_at(self.filesystem, self.root)
        except OSError as err:
            raise self.unwritable(err) from None

    def unwritable(self, err: OSError) -> ConfigError:
        """The error for a write to this store refused (the user's to fix: another results_dir, or its rights)."""
        return ConfigError(f"results_dir {self.uri}: cannot write there ({err})")

    def _cells_not_a_folder(self) -> ConfigError:
        return ConfigError(f"results_dir {self.uri}: {self.where('cells')} is a file, not the folder of the cells' rows; "
                           "move it aside, or give another results_dir")  # fmt: skip

    def _unreadable(self, err: PermissionError) -> ConfigError:
        return ConfigError(f"results_dir {self.uri}: cannot read it ({err})")

    def exists(self) -> bool:
        """Whether the results directory is there (an object store's prefix exists once a row is written under it)."""
        return self.filesystem.get_file_info(self.root).type == fs.FileType.Directory

    def holds_sweep(self) -> bool:
        """Whether there is a sweep here (`analysis.io.holds_sweep`: the fit refuses a folder that holds none)."""
        return holds_sweep(self.filesystem, self.root)

    def write(self, row: dict) -> None:
        write_rows_at(self.filesystem, self.cell_path(row["cell_id"]), [row])

    def holds_ok_row(self, cell_id: str) -> bool:
        """Whether the cell's stored row is a readable `ok` one (what a failed rerun must not replace)."""
        info = self.filesystem.get_file_info(self.cell_path(cell_id))
        if info.type != fs.FileType.File:
            return False
        try:
            stored = self._status_of(info)
        except FileNotFoundError:  # set aside or replaced since the listing: nothing to keep
            return False
        return not isinstance(stored, Exception) and stored.status == "ok"

    def written_since(self, cell_id: str, since: float) -> bool:
        """Whether the cell's row was stored at or after `since` (epoch seconds): by another driver,
        between this one's plan and its claim. Judged with `MTIME_SLACK_SECONDS` to spare: S3 keeps whole seconds
        (a row stored 7 ms after `since` read as 78 ms before it, and its cell ran again over it), and a shared
        filesystem's clock is its server's. Erring early costs only this run's try at a cell whose row was stored
        just before it planned (a failed row it would retry): a rerun takes it."""
        info = self.filesystem.get_file_info(self.cell_path(cell_id))
        return info.type == fs.FileType.File and info.mtime is not None and info.mtime.timestamp() >= since - MTIME_SLACK_SECONDS

    def _listing(self) -> list[fs.FileInfo]:
        try:
            listed = self.filesystem.get_file_info(fs.FileSelector(self.cells_dir, allow_not_found=True))
        except NotADirectoryError:  # a traceback from `plan`, `run` and `status` (helper-141)
            raise self._cells_not_a_folder() from None
        return [info for info in listed if info.type == fs.FileType.File]

    @staticmethod
    def _cell_files(listed: list[fs.FileInfo]) -> list[fs.FileInfo]:
        return [info for info in listed if info.base_name.endswith(".parquet") and not info.base_name.startswith(TEMP_PREFIX)]

    def _clear_stale_temps(self, listed: list[fs.FileInfo]) -> None:
        """Delete the temp files of writes killed long ago: only steerscale skips them (a complete one is a second copy
        of its row to a reader that takes hidden files). One deleted meanwhile by another driver, or one this user may
        not delete, is left as it is."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for info in listed:
            if info.base_name.startswith(TEMP_PREFIX) and info.mtime is not None and info.mtime.timestamp() < cutoff:
                try:  # best effort: a store this user may not delete in is the writability check's to report
                    self.filesystem.delete_file(info.path)
                except OSError:
                    pass

    def _quarantine(self, info: fs.FileInfo) -> None:
        """Move a bad cell file to quarantine/, beside (not over) an earlier bad file of the same cell; one that
        another driver scanning at the same time has moved already is left to it."""
        folder = f"{self.root}/quarantine"
        self.filesystem.create_dir(folder, recursive=True)
        stem, taken = info.base_name.removesuffix(".parquet"), 0
        target = f"{folder}/{info.base_name}"
        while self.filesystem.get_file_info(target).type != fs.FileType.NotFound:
            taken += 1
            target = f"{folder}/{stem}.{taken}.parquet"
        try:
            self.filesystem.move(info.path, target)
        except OSError:  # S3's move (copy, then delete) reports a missing source as a plain OSError
            if self.filesystem.get_file_info(info.path).type != fs.FileType.NotFound:
                raise

    def scan(self, *, set_aside: bool = True) -> StoreScan:
        """Read the status column of every cell file; set aside what is unreadable or foreign.

        Only what a file holds sends it to quarantine (not Parquet, no such columns, a row under
        another id): an I/O error (a remote store's hiccup) is raised, since moving a good row
        aside would run its cell again. `set_aside=False` only reports (read-only commands).
        """
        scan = StoreScan()
        try:  # not the files' fault either: a cell file this user may not read is not set aside
            listed = self._listing()
            files = self._cell_files(listed)
            if set_aside:
                self._clear_stale_temps(listed)
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:  # Arrow releases the GIL; a remote read is a round trip
                read = list(pool.map(self._status_if_there, files))
        except PermissionError as err:
            raise self._unreadable(err) from None
        for info, found in zip(files, read):
            if found is None:
                continue
            if isinstance(found, Exception):
                scan.quarantined.append((info.base_name, f"{type(found).__name__}: {found}"))
                if set_aside:
                    self._quarantine(info)
            else:
                scan.cells[found.cell_id] = found
        return scan

    def _status_if_there(self, info: fs.FileInfo) -> StoredCell | Exception | None:
        """`_status_of`, or None for a file gone since the listing (another driver's scan set it aside)."""
        try:
            return self._status_of(info)
        except FileNotFoundError:
            return None

    def _status_of(self, info: fs.FileInfo) -> StoredCell | Exception:
        """What `scan` needs of one cell file, or what is wrong with its content.

        The bytes are read first, so an I/O error (the store, not the file) raises; whatever goes
        wrong parsing them (a cut file, a foreign one, an unknown codec) is the file's own fault.
        """
        with self.filesystem.open_input_file(info.path) as source:
            data = source.read()
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
            optional = [name for name in (*SECONDS, "error") if name in parquet.schema_arrow.names]
            row = parquet.read(columns=["cell_id", "status", "model", "method", "sweep", *optional]).to_pylist()[0]
            error = (row.get("error") or "").strip().split("\n", 1)[0]
            cell = StoredCell(row["cell_id"], row["status"], row["model"], row["method"], None, row["sweep"], error)
            if f"{cell.cell_id}.parquet" != info.base_name:
                raise ValueError(f"row's cell_id {cell.cell_id} does not match its file name")
        except Exception as err:  # any parse failure is the file's content (I/O errors raised above)
            return err
        seconds = [row[name] for name in SECONDS if row.get(name) is not None]
        return cell._replace(seconds=sum(seconds)) if len(seconds) == len(SECONDS) else cell

    def read(self, *, set_aside: bool = True) -> pa.Table:
        """All rows, in the current schema (older files' missing columns become null)."""
        unreadable = {name for name, _ in self.scan(set_aside=set_aside).quarantined}
        files = [info for info in self._cell_files(self._listing()) if info.base_name not in unreadable]
        tables = [pq.read_table(info.path, filesystem=self.filesystem) for info in files]
        if not tables:
            return RESULT_SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="default")


def shown_inside(uri: str, name: str) -> str:
    """`name` inside the results directory `uri`, as a user would write it: a URI's query (?region=…) left off,
    where it read "s3://b/r?region=x/cells/"."""
    base = urlsplit(uri)._replace(query="").geturl() if "://" in uri else uri
    return f"{base}/{name}"


MANIFEST = "plan.json"  # analysis.io.PLAN_NAME reads it too (the fit leaves out cells no longer planned)


def write_manifest(store: ResultsStore, cells: list[dict]) -> None:
    """Record the planned cells (id, slug, model, method) so `status` knows what remains from the store alone."""
    write_atomically(store.filesystem, f"{store.root}/{MANIFEST}", json.dumps(cells, indent=0).encode())


def read_manifest(store: ResultsStore) -> list[dict]:
    """The planned cells, or [] when there is no plan or it cannot be read (the rows are what counts;
    the next `run` writes the plan again)."""
    try:
        with store.filesystem.open_input_stream(f"{store.root}/{MANIFEST}") as stream:
            entries = json.loads(stream.read().decode())
        if not _is_manifest(entries):
            raise ValueError("not a list of planned cells (cell_id, model, method)")
    except FileNotFoundError:
        return []
    # JSONDecodeError, UnicodeDecodeError, the wrong shape: a file damaged or written outside steerscale; or one not ours to read
    except (ValueError, PermissionError) as err:
        print(f"note: {store.root}/{MANIFEST} is unreadable ({err}); going by the stored rows alone", file=sys.stderr)
        return []
    return entries


def _is_manifest(entries: object) -> bool:
    """Whether `entries` has the shape `write_manifest` gives: a list of objects naming cell_id, model, method."""
    keys = ("cell_id", "model", "method")
    return isinstance(entries, list) and all(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in keys) for e in entries)
