"""The results store: atomic writes, skipping what is done, setting aside unreadable files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from interrupts import exited_pid
from orchestrator.claims import Claims
from orchestrator.cli import main
from orchestrator.store import MTIME_SLACK_SECONDS, ResultsStore, write_manifest
from workers.rowfile import write_atomically
from workers.schema import COLUMNS, SCHEMA_VERSION


def _row(cell_id: str, status: str = "ok", **extra) -> dict:
    now = datetime.now(timezone.utc)
    return {
        "schema_version": SCHEMA_VERSION, "sweep": "s", "cell_id": cell_id, "slug": f"slug-{cell_id}",
        "status": status, "score": 0.5, "started_at": now, "finished_at": now, **extra,
    }


def test_rows_round_trip_with_every_schema_column(tmp_path):
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("a1"))
    store.write(_row("b2", status="failed", error="boom"))
    table = store.read()
    assert table.column_names == list(COLUMNS)
    assert sorted(table.column("cell_id").to_pylist()) == ["a1", "b2"]
    assert store.scan().statuses() == {"a1": "ok", "b2": "failed"}
    meta = pq.read_schema(tmp_path / "r" / "cells" / "a1.parquet").metadata
    assert meta[b"steerscale.schema_version"] == str(SCHEMA_VERSION).encode()


def test_rewriting_a_cell_replaces_its_row_instead_of_duplicating(tmp_path):
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("a1", status="failed", error="first try"))
    store.write(_row("a1", status="ok"))
    assert store.read().num_rows == 1 and store.scan().statuses() == {"a1": "ok"}


def test_file_uri_works_like_a_path(tmp_path):
    store = ResultsStore(f"file://{tmp_path}/uri")
    store.write(_row("c3"))
    assert (tmp_path / "uri" / "cells" / "c3.parquet").exists()
    assert store.scan().statuses() == {"c3": "ok"}


def test_write_killed_halfway_leaves_no_readable_partial_file(tmp_path):
    """SIGKILL a writer after its bytes are on disk but before the rename: no row may appear."""
    results = tmp_path / "r"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from datetime import datetime, timezone
        real_fsync = os.fsync
        def stall(fd):
            real_fsync(fd)
            print("written", flush=True)
            time.sleep(60)  # killed here, between the data and the rename
        os.fsync = stall
        from orchestrator.store import ResultsStore
        now = datetime.now(timezone.utc)
        ResultsStore({str(results)!r}).write({{"schema_version": 1, "sweep": "s", "cell_id": "k1", "slug": "k",
            "status": "ok", "error": "x" * 200000, "started_at": now, "finished_at": now}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = os.listdir(results / "cells")
    assert "k1.parquet" not in leftovers
    assert any(name.startswith(".tmp-") for name in leftovers), "the kill should have hit the temp file"
    # DuckDB's and Polars' `cells/*.parquet` take hidden files too: a truncated one stopped their read (helper-144)
    assert not [name for name in leftovers if name.endswith(".parquet")], "a write in flight must not look like a row file"
    store = ResultsStore(str(results))
    scan = store.scan()
    assert scan.statuses() == {} and scan.quarantined == [] and store.read().num_rows == 0, "a write in flight is not a broken file"


def test_a_write_that_fails_raises_and_leaves_no_temp_file(tmp_path):
    """Not a kill but an error (here the final name is taken by a folder; a full disk alike): it is raised,
    and its temp file does not linger in the results folder."""
    blocked = tmp_path / "cells" / "k1.parquet"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomically(fs.LocalFileSystem(), str(blocked), b"row bytes")
    assert sorted(os.listdir(tmp_path / "cells")) == ["k1.parquet"]


def test_run_clears_temp_files_of_writes_killed_long_ago_and_leaves_recent_ones(tmp_path):
    """A killed write's temp file stayed for good: a whole one is a second copy of its row to readers that take hidden
    files. A scan that may set files aside (run's) deletes those an hour old; a recent one may be a write in flight."""
    store = ResultsStore(str(tmp_path))
    store.write(_row("c1"))
    cells = tmp_path / "cells"
    old, recent = cells / ".tmp-aa-c2.parquet.partial", cells / ".tmp-bb-c3.parquet.partial"
    for path in (old, recent):
        path.write_bytes((cells / "c1.parquet").read_bytes())
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert store.scan(set_aside=False).statuses() == {"c1": "ok"} and old.exists(), "status and plan only read"
    assert store.scan().statuses() == {"c1": "ok"}
    assert sorted(os.listdir(cells)) == [".tmp-bb-c3.parquet.partial", "c1.parquet"]


def test_a_write_to_an_object_store_that_fails_leaves_no_temp_file(tmp_path):
    """The object-store path (an upload, then a move: on S3 and GCS a copy and a delete) kept its temp object when the
    move failed, a whole second copy of the row under a hidden name. A filesystem that is not LocalFileSystem takes it."""
    blocked = tmp_path / "cells" / "k1.parquet"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        write_atomically(fs.SubTreeFileSystem(str(tmp_path), fs.LocalFileSystem()), "cells/k1.parquet", b"row bytes")
    assert sorted(os.listdir(tmp_path / "cells")) == ["k1.parquet"]


def test_a_row_renamed_into_place_after_another_driver_planned_counts_as_written_since_then(tmp_path, monkeypatch):
    """A row's time was its temp file's: written (and synced, slowly on a busy NFS) before another driver planned, renamed
    into place after that driver had listed the store, it read as older than the plan, so that driver ran the cell
    again and replaced the row. The row's time is now when it appeared."""
    import threading

    store, synced, real_fsync = ResultsStore(str(tmp_path)), threading.Event(), os.fsync

    def slow_fsync(descriptor: int) -> None:
        synced.set()
        time.sleep(0.3)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    writer = threading.Thread(target=store.write, args=(_row("c1"),))
    writer.start()
    synced.wait(10)
    time.sleep(0.05)
    planned_at = time.time()  # the other driver reads the store: the row is not there yet
    assert not os.path.exists(store.cell_path("c1"))
    writer.join()
    assert store.written_since("c1", planned_at)


def test_truncated_and_foreign_files_are_set_aside_and_reported(tmp_path):
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("good"))
    cells = tmp_path / "r" / "cells"
    data = (cells / "good.parquet").read_bytes()
    (cells / "trunc.parquet").write_bytes(data[: len(data) // 2])
    (cells / "foreign.parquet").write_bytes(b"not parquet at all")
    (cells / "renamed.parquet").write_bytes(data)  # a whole row under another cell's name: `good`'s row twice
    scan = store.scan()
    assert scan.statuses() == {"good": "ok"}
    assert sorted(name for name, _ in scan.quarantined) == ["foreign.parquet", "renamed.parquet", "trunc.parquet"]
    assert sorted(os.listdir(tmp_path / "r" / "quarantine")) == ["foreign.parquet", "renamed.parquet", "trunc.parquet"]
    assert store.read().num_rows == 1


def test_a_damaged_footer_or_a_row_without_status_is_set_aside_not_raised(tmp_path):
    """pyarrow reports a garbled footer as OSError ("Couldn't deserialize thrift"): still the file's fault."""
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("good"))
    cells = tmp_path / "r" / "cells"
    data = (cells / "good.parquet").read_bytes()
    (cells / "garbled.parquet").write_bytes(data[:-60] + b"\x07" * 52 + data[-8:])
    pq.write_table(pa.table({"cell_id": ["nostatus"]}), cells / "nostatus.parquet")
    scan = store.scan()
    assert scan.statuses() == {"good": "ok"}
    assert sorted(name for name, _ in scan.quarantined) == ["garbled.parquet", "nostatus.parquet"]
    assert sorted(os.listdir(tmp_path / "r" / "quarantine")) == ["garbled.parquet", "nostatus.parquet"]


def test_a_bad_file_another_driver_set_aside_first_is_not_an_error_and_none_is_overwritten(tmp_path):
    """Two drivers starting on one directory both find the same bad file: the second's move raised FileNotFoundError
    out of `run`. A later bad file of the same cell used to overwrite the first in quarantine/: both are kept."""
    first, second = ResultsStore(str(tmp_path / "r")), ResultsStore(str(tmp_path / "r"))
    first.write(_row("good"))
    bad = tmp_path / "r" / "cells" / "cut.parquet"
    bad.write_bytes(b"PAR1 cut short")
    listed = second._listing()
    assert [name for name, _ in first.scan().quarantined] == ["cut.parquet"]
    monkeypatched = second._listing
    second._listing = lambda: listed  # listed before the first driver moved the file
    assert second.scan().statuses() == {"good": "ok"}
    second._listing = monkeypatched
    bad.write_bytes(b"PAR1 cut short again")
    assert [name for name, _ in first.scan().quarantined] == ["cut.parquet"]
    quarantine = tmp_path / "r" / "quarantine"
    assert sorted(os.listdir(quarantine)) == ["cut.1.parquet", "cut.parquet"]
    assert (quarantine / "cut.parquet").read_bytes() == b"PAR1 cut short"


def test_read_only_commands_report_unreadable_files_without_moving_them(tmp_path):
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("good"))
    (tmp_path / "r" / "cells" / "trunc.parquet").write_bytes(b"PAR1 cut short")
    scan = store.scan(set_aside=False)
    assert scan.statuses() == {"good": "ok"} and [name for name, _ in scan.quarantined] == ["trunc.parquet"]
    assert store.read(set_aside=False).num_rows == 1
    assert sorted(os.listdir(tmp_path / "r" / "cells")) == ["good.parquet", "trunc.parquet"]
    assert not (tmp_path / "r" / "quarantine").exists()


def test_an_io_error_is_raised_and_moves_no_good_row_aside(tmp_path, monkeypatch):
    """A remote store's hiccup is not a broken file: quarantining the row would run its cell again."""
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("good"))

    class FlakyStore:  # the store's filesystem, timing out on every read
        def __getattr__(self, name):
            return getattr(store_fs, name)

        def open_input_file(self, path):
            raise OSError("When reading information for key 'cells/good.parquet': AWS Error NETWORK_CONNECTION")

    store_fs = store.filesystem
    monkeypatch.setattr(store, "filesystem", FlakyStore())
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        store.scan()
    assert os.listdir(tmp_path / "r" / "cells") == ["good.parquet"]


def test_status_counts_what_remains_of_the_plan_and_shows_rows_from_outside_it(tmp_path, capsys):
    store = ResultsStore(str(tmp_path / "r"))
    plan = [{"cell_id": f"p{i}", "slug": f"p{i}", "model": "ladder:xs" if i < 5 else "ladder:l", "method": "lora"}
            for i in range(10)]  # fmt: skip
    write_manifest(store, plan)
    for cell_id in ["p0", "p1", "p2", "p3", "p4"]:
        store.write(_row(cell_id, model="ladder:xs", method="lora"))
    for cell_id in ["old0", "old1", "old2"]:  # an earlier config's cells
        failed = cell_id == "old2"
        store.write(_row(cell_id, status="failed" if failed else "ok", model="gpt2", method="prompt",
                         error="OSError: gpt2 is not on this machine\nTraceback ..." if failed else None))  # fmt: skip
    assert main(["status", str(tmp_path / "r")]) == 0
    out, failures = capsys.readouterr().out.split("failed cells, by error")
    assert ": 5 ok, 0 failed, 5 remaining" in out
    assert "3 more stored rows (2 ok, 1 failed) are from cells not in the latest run's plan" in out
    # the plan's config with --retry-failed would never rerun it: said so, not "rerun them with --retry-failed"
    assert failures.splitlines()[0] == " (rerun them with the config that planned them, `--retry-failed`: none is in the plan):"
    assert failures.splitlines()[1:] == ["  1 × prompt on gpt2 (unplanned): OSError: gpt2 is not on this machine"]
    table = [line.split() for line in out.splitlines()[3:]]  # after the summary, the note, the header and its rule
    assert table[1:] == [  # the plan's models in its order (smallest first), not alphabetical; then the unplanned rows
        ["ladder:xs", "lora", "5", "0", "0", "5"],
        ["ladder:l", "lora", "0", "0", "5", "5"],
        ["gpt2", "prompt", "(unplanned)", "2", "1", "0", "3"],
    ], out


def test_status_never_counts_rows_outside_the_plan_under_its_cells(tmp_path, capsys):
    """Another sweep's rows of the same model and method in the same directory: the plan's 2 lora cells
    stay 2 in the headline and in their table row."""
    store = ResultsStore(str(tmp_path / "r"))
    write_manifest(store, [{"cell_id": f"p{i}", "slug": f"p{i}", "model": "ladder:xs", "method": "lora"} for i in range(2)])
    store.write(_row("p0", model="ladder:xs", method="lora"))
    for i in range(5):
        store.write(_row(f"other{i}", model="ladder:xs", method="lora"))
    assert main(["status", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert ": 1 ok, 0 failed, 1 remaining" in out and "5 more stored rows (5 ok, 0 failed)" in out, out
    table = [line.split() for line in out.splitlines()[4:]]
    assert table == [["ladder:xs", "lora", "1", "0", "1", "2"], ["ladder:xs", "lora", "(unplanned)", "5", "0", "0", "5"]], out


def test_status_of_a_sweep_yaml_counts_that_yamls_grid_not_the_latest_runs_plan(write_sweep, capsys):
    """Another config run into the same directory last wrote plan.json; `status THIS.yaml` is about this one."""
    from orchestrator.grid import expand
    from orchestrator.spec import load_spec

    path = write_sweep({"sweep": "mine", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "methods": {"base": {}},
                        "budgets": [0], "seeds": [0, 1, 2]})  # fmt: skip
    spec = load_spec(str(path), [], check_models=False)
    store = ResultsStore(spec.results_dir)
    write_manifest(store, [{"cell_id": "theirs", "slug": "theirs", "model": "gpt2", "method": "prompt"}])  # the other config's
    store.write(_row(expand(spec)[0].cell_id, model="ladder:test/xs", method="base"))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert ": 1 ok, 0 failed, 2 remaining\n" in out, out
    running, dead = Claims(store), Claims(store, owner={**Claims(store).owner, "pid": exited_pid(), "run": "dead"})
    assert running.acquire(expand(spec)[1].cell_id, planned_at=time.time()) and dead.acquire(expand(spec)[2].cell_id, planned_at=time.time())
    assert main(["status", str(path)]) == 0  # a SIGKILLed driver's claim is no cell running
    assert ": 1 ok, 0 failed, 2 remaining (1 of them claimed by a running driver: running or next)" in capsys.readouterr().out
    # run with overrides (`run THIS.yaml seeds=[0]`): the same overrides give the grid that ran; they were refused
    assert main(["status", str(path), "seeds=[0]"]) == 0
    assert ": 1 ok, 0 failed, 0 remaining" in capsys.readouterr().out
    assert main(["status", spec.results_dir, "seeds=[0]"]) == 2
    assert "apply to a sweep YAML" in capsys.readouterr().err


def test_the_plan_the_driver_writes_is_the_one_the_fit_reads():
    """The name is written twice (analysis may not import the orchestrator, and importing the
    analysis package would cost `status` two seconds): they must agree."""
    from analysis.io import PLAN_NAME
    from orchestrator.store import MANIFEST

    assert MANIFEST == PLAN_NAME


def test_a_reader_that_stops_early_ends_the_output_quietly(tmp_path):
    """`steerscale status DIR | head`: exit 0 and no BrokenPipeError traceback once head has its lines."""
    store = ResultsStore(str(tmp_path / "r"))
    write_manifest(store, [{"cell_id": f"c{i}", "slug": "", "model": f"model-{i}", "method": "lora"} for i in range(20_000)])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "status", str(tmp_path / "r")], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline().startswith(b"/")  # the first line names the results directory
    proc.stdout.close()
    errors = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in errors, errors


def test_rows_are_written_through_the_stores_own_filesystem(tmp_path, monkeypatch):
    """The store used to rebuild a URI per row and parse it again: `s3://b/x?region=r` became
    `...?region=r/cells/id.parquet` (the region garbled, the object written at the prefix)."""
    store = ResultsStore(str(tmp_path / "r"))

    def no_reparsing(uri: str):
        raise AssertionError(f"the store re-parsed {uri}")

    monkeypatch.setattr("workers.rowfile.filesystem_and_path", no_reparsing)
    store.write(_row("a1"))
    assert store.scan().statuses() == {"a1": "ok"}


@pytest.mark.parametrize("damage", ["cut short", '{"a": 1}', '[{"cell_id": "x"}]', "[1, 2]"])
def test_status_goes_by_the_rows_when_the_plan_file_is_damaged(tmp_path, capsys, damage):
    """Cut short outside steerscale, or valid JSON of another shape (which ended in a TypeError / KeyError traceback)."""
    store = ResultsStore(str(tmp_path / "r"))
    write_manifest(store, [{"cell_id": "p0", "slug": "p0", "model": "ladder:xs", "method": "lora"}])
    store.write(_row("p0", model="ladder:xs", method="lora"))
    plan = tmp_path / "r" / "plan.json"
    plan.write_bytes(plan.read_bytes()[:-7] if damage == "cut short" else damage.encode())
    assert main(["status", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "plan.json is unreadable" in captured.err and ": 1 ok, 0 failed, 0 remaining" in captured.out


def test_a_rerun_runs_the_unstored_cells_and_failed_ones_only_when_asked(tmp_path):
    from orchestrator.cli import cells_to_run
    from orchestrator.store import StoredCell, StoreScan

    class Planned:  # what cells_to_run reads of a planned cell
        def __init__(self, cell_id: str) -> None:
            self.cell_id = cell_id

    cells = [Planned(i) for i in ("ok", "failed", "new")]
    scan = StoreScan(cells={"ok": StoredCell("ok", "ok", "m", "base", 1.0), "failed": StoredCell("failed", "failed", "m", "base", None)})
    ids = lambda **flags: [c.cell_id for c in cells_to_run(cells, scan, **flags)]  # noqa: E731
    assert ids(force=False, retry_failed=False) == ["new"]
    assert ids(force=False, retry_failed=True) == ["failed", "new"]
    assert ids(force=True, retry_failed=False) == ["ok", "failed", "new"]


def test_a_run_into_a_directory_holding_rows_it_does_not_plan_says_so(tmp_path, capsys):
    from types import SimpleNamespace

    from orchestrator.cli import _note_rows_outside

    planned = lambda *ids: [SimpleNamespace(cell_id=i) for i in ids]  # noqa: E731 - what the note reads of a planned cell
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("a"))  # sweep "s"
    store.write({**_row("b"), "sweep": "mine"})
    _note_rows_outside("mine", ["mine.yaml"], planned("a", "b"), store.scan())
    assert "also holds rows of other sweeps: 's' (1)" in capsys.readouterr().out
    _note_rows_outside("s", ["s.yaml"], planned("a", "b"), ResultsStore(str(tmp_path / "r")).scan())
    assert "'mine' (1)" in capsys.readouterr().out
    store.write({**_row("a"), "sweep": "mine"})
    _note_rows_outside("mine", ["mine.yaml"], planned("a", "b"), store.scan())
    assert capsys.readouterr().out == ""
    # the same sweep, its config changed (eval.test_size=60: every cell id new): `plan` was silent about the 2 stored rows
    # a plain `fit` would mix in with the new ones
    _note_rows_outside("mine", ["mine.yaml", "eval.test_size=60", "seeds=[0]"], planned("c", "d"), store.scan())
    out = capsys.readouterr().out
    assert "2 rows of 'mine' from cells this grid does not plan" in out and "other sweeps" not in out
    # the overrides repeated: without them the `fit` it named fitted the YAML's own grid, not this one (helper-179)
    assert "`steerscale fit mine.yaml eval.test_size=60 'seeds=[0]' --planned-only` this grid alone" in out


def test_plan_says_which_stored_rows_its_grid_does_not_plan(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"sweep: mine\nresults_dir: {tmp_path / 'r'}\nmodels: [ladder:xs]\ntasks: [facts]\nmethods: {{base: {{}}}}\nbudgets: [0]\nseeds: [0]\n")
    store = ResultsStore(str(tmp_path / "r"))
    store.write(_row("x"))  # sweep "s"
    store.write({**_row("y"), "sweep": "mine"})  # this sweep's, from a cell of an earlier config
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "also holds rows of other sweeps: 's' (1)" in out and "1 row of 'mine' from cells this grid does not plan" in out


@pytest.mark.parametrize("uri", ["nosuch://bucket/results", "s3://bucket/results?endpoint_override=127.0.0.1:{port}&scheme=http"])
@pytest.mark.parametrize("command", ["status", "fit"])
def test_a_results_uri_that_cannot_be_reached_is_a_clean_error(uri, command, capsys):
    """An unknown scheme or an object store that does not answer (here a closed port on this machine) was
    pyarrow's OSError / ArrowInvalid traceback; now exit 2 with the URI and pyarrow's reason."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = uri.format(port=port)
    assert main([command, uri]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {uri} (" in err or f"results_dir {uri}: cannot reach it (" in err, err


def test_paths_inside_a_results_uri_are_shown_without_its_query():
    from orchestrator.store import shown_inside

    assert shown_inside("s3://bucket/sweeps/q?region=eu-west-1", "cells/") == "s3://bucket/sweeps/q/cells/"
    assert shown_inside("results/q", "adaptive.jsonl") == "results/q/adaptive.jsonl"
    assert shown_inside("/tmp/what?/q", "cells/") == "/tmp/what?/q/cells/"  # a local name may hold a '?'


def test_a_row_whose_time_reads_a_little_early_counts_as_written_since(tmp_path):
    """S3 keeps whole seconds: a row another driver stored 7 ms after this one planned read as 78 ms before the plan,
    and the cell was claimed and run again over it. Times within MTIME_SLACK_SECONDS before the plan count."""
    store = ResultsStore(str(tmp_path))
    store.write(_row("c1"))
    stored_at = os.stat(store.cell_path("c1")).st_mtime
    assert store.written_since("c1", stored_at + 0.5)  # the store's time truncated by half a second
    assert not store.written_since("c1", stored_at + MTIME_SLACK_SECONDS + 0.5)
    assert not store.written_since("c2", stored_at)
