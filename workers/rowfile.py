"""Write result rows as one Parquet file, atomically, to a local path or a `pyarrow.fs` URI.

The file appears under its final name only once complete (temp file + fsync + rename), so a process
killed mid-write leaves at most a `.tmp-*` file that readers ignore, never half a row.
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
    temp = f"{directory}/{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"
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
        with filesystem.open_output_stream(temp) as stream:
            stream.write(data)
        filesystem.move(temp, path)


def _sync_directory(directory: str) -> None:
    """Make a rename in `directory` survive a power loss (the entry lives in the directory, not the file)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
