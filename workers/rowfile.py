"""Write result rows as one Parquet file, atomically, to a local path or a `pyarrow.fs` URI.

The file appears under its final name only once complete (temp file + fsync + rename), so a process
killed mid-write leaves at most a `.tmp-*.partial` file that readers ignore (not `*.parquet`, which DuckDB's and
Polars' globs would take, hidden or not), never half a row; `steerscale run` deletes such files an hour old.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from workers.schema import to_table

TEMP_PREFIX = ".tmp-"
# A write in flight (or one a kill cut short) ends in this, not in `.parquet`: readers that glob `cells/*.parquet`
# (DuckDB, Polars) take hidden files too, and a truncated one stopped their read, a whole one doubled a row.
TEMP_SUFFIX = ".partial"


def filesystem_and_path(uri: str) -> tuple[fs.FileSystem, str]:
    """(`pyarrow` filesystem, path inside it) for a local path or a URI such as file://, s3://, gs://."""
    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(uri)


def write_rows(uri: str, rows: list[dict]) -> None:
    """`write_rows_at` a local path or URI (a one-off write: `python -m workers.run_cell`)."""
    write_rows_at(*filesystem_and_path(uri), rows)


def write_rows_at(filesystem: fs.FileSystem, path: str, rows: list[dict]) -> None:
    """Write `rows` to `path` inside `filesystem`. A store passes the filesystem it already has: a URI
    rebuilt from it would lose (or garble) options such as `?region=` and cost a new client per row."""
    buffer = pa.BufferOutputStream()
    pq.write_table(to_table(rows), buffer)
    write_atomically(filesystem, path, buffer.getvalue().to_pybytes())


def write_atomically(filesystem: fs.FileSystem, path: str, data: bytes) -> None:
    """`data` at `path`, whole or not at all: written to a temp name, synced, then renamed."""
    directory, name = path.rsplit("/", 1)
    filesystem.create_dir(directory, recursive=True)
    temp = f"{directory}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}{TEMP_SUFFIX}"
    if isinstance(filesystem, fs.LocalFileSystem):
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)  # atomic on POSIX
            # the time it appeared, not the temp file's: another driver that listed the store meanwhile and planned
            # after the write began reads the row's mtime to tell it was stored since (ResultsStore.written_since)
            os.utime(path)
        except BaseException:
            with contextlib.suppress(OSError):  # the write's own error is the one to report
                os.remove(temp)
            raise
        _sync_directory(directory)
    else:  # object stores publish an object only when its upload completes; the move keeps that true elsewhere
        try:
            with filesystem.open_output_stream(temp) as stream:
                stream.write(data)
            filesystem.move(temp, path)  # a copy and a delete on S3 and GCS: a failed delete leaves a whole copy
        except BaseException:
            with contextlib.suppress(OSError):
                if filesystem.get_file_info(temp).type != fs.FileType.NotFound:
                    filesystem.delete_file(temp)
            raise


def check_writable_at(filesystem: fs.FileSystem, directory: str) -> None:
    """Raise the OSError that writing a row into `directory` would (made if missing): a probe file written and
    removed, before hours of compute whose row the write would then lose."""
    probe = f"{directory}/{TEMP_PREFIX}probe-{uuid.uuid4().hex}{TEMP_SUFFIX}"
    write_atomically(filesystem, probe, b"")
    filesystem.delete_file(probe)


def _sync_directory(directory: str) -> None:
    """Make a rename in `directory` survive a power loss (the entry lives in the directory, not the file)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
