"""Reading cell rows from a results directory (local path or URI) and writing outputs beside them.

One unreadable file must not hide a thousand good ones, so a file that is truncated, not Parquet,
or lacks the columns analysis needs is recorded as skipped, with its name and the reason, and the
read goes on.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

READ_THREADS = 8
REQUIRED_COLUMNS = ("cell_id", "status", "model", "task", "method", "budget", "score")
NUMERIC_COLUMNS = (
    "params_total", "params_nonembed", "budget", "train_tokens", "seed", "score", "score_base",
    "score_elicited", "nll", "nll_base", "offtask_score_delta", "neutral_kl", "neutral_ppl_ratio",
    "trainable_params", "post_train_flops", "train_seconds", "eval_seconds",
)  # fmt: skip


class NoResultsError(ValueError):
    """The results directory asked for does not exist (fitting it would write fits into a typo)."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """The cells a sweep planned, and what to call that plan in notes: the results directory's
    plan.json (the latest run's), or a sweep YAML's own grid (`steerscale fit CONFIG.yaml`)."""

    name: str
    cell_ids: frozenset[str]


@dataclass(frozen=True)
class LoadedResults:
    """All rows found (ok and failed) and the files that could not be read, with why."""

    frame: pd.DataFrame
    skipped: tuple[SkippedFile, ...]
    unplanned: int = 0  # stored rows of cells the plan does not list (see `load_rows_to_fit`)
    planned_only: bool = False  # whether those rows were left out
    superseded: int = 0  # unplanned rows left out because the plan's cell of the same model, task, method, budget, seed has an ok row
    stale_data: int = 0  # rows left out because they were scored on an older version of their task's data
    plan_name: str = "plan.json"  # the plan those counts are against

    @property
    def ok(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] == "ok"]


def resolve(results_dir: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path for a local directory or a URI (file://, s3://, gs://)."""
    if "://" not in results_dir:
        return pafs.LocalFileSystem(), Path(results_dir).resolve().as_posix()
    try:  # an unknown scheme, or a bucket that cannot be reached: said here, not as a traceback mid-read
        fs, root = pafs.FileSystem.from_uri(results_dir)
        probe(results_dir)
    except (OSError, pa.ArrowInvalid) as err:
        raise NoResultsError(f"cannot reach {results_dir} ({err})") from None
    return fs, root


PROBE_RETRY_SECONDS = 10  # how long asking whether a gs:// results_dir is there may retry


def holds_sweep(fs: pafs.FileSystem, root: str) -> bool:
    """Whether `root` is a sweep's results_dir: it holds a plan or a cells/ folder (a run's writability probe leaves
    neither behind, so a folder only probed is still no sweep)."""
    return fs.get_file_info(f"{root}/{PLAN_NAME}").type == pafs.FileType.File or fs.get_file_info(f"{root}/cells").type == pafs.FileType.Directory


def probe(uri: str) -> None:
    """Raise OSError (or ArrowInvalid) unless the filesystem of `uri` answers for its path. Google Cloud
    Storage's client retries for 15 minutes by default, so a bucket without credentials looked like a
    hang; the probe asks with a short retry limit (the filesystem that reads and writes keeps the default)."""
    fs, root = pafs.FileSystem.from_uri(probe_uri(uri))
    fs.get_file_info(root)


def probe_uri(uri: str) -> str:
    """`uri`, for a gs:// one with a retry limit of PROBE_RETRY_SECONDS unless it sets its own."""
    parts = urlsplit(uri)
    if parts.scheme not in ("gs", "gcs") or "retry_limit_seconds" in parse_qs(parts.query):
        return uri
    return urlunsplit(parts._replace(query=urlencode([*parse_qsl(parts.query), ("retry_limit_seconds", str(PROBE_RETRY_SECONDS))])))


def _read_cell(fs: pafs.FileSystem, path: str) -> pa.Table | SkippedFile:
    try:
        with fs.open_input_file(path) as source:
            table = pq.ParquetFile(source).read()
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"not a results row: missing columns {missing}")
    except (OSError, ValueError, pa.ArrowException) as err:
        return SkippedFile(path, f"{type(err).__name__}: {err}")
    return table


def _frame(tables: list[pa.Table]) -> pd.DataFrame:
    """One DataFrame of all rows. Rows of older schema versions lack newer columns and all-null
    columns have no type, which Arrow promotes; files that disagree on a column's type (written by
    something else) cannot be joined as Arrow tables and go through pandas, as object columns."""
    try:
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


# path -> ((mtime, size) when read, what it read): files read by an earlier call, for `load_results(..., reread=)`
REREAD_SLACK_SECONDS = 3.0  # a file's stamp is trusted once its mtime is this old: past S3's whole seconds, clock skew
ReadCache = dict[str, tuple[tuple[object, int | None], "pa.Table | SkippedFile"]]


def load_results(results_dir: str, reread: ReadCache | None = None) -> LoadedResults:
    """Every `<results_dir>/cells/*.parquet` row; a cell id seen twice keeps its ok, latest row.

    With `reread` (a dict the caller keeps between calls), a file listed with the modification time and size it had
    when last read is not read again: the adaptive loop reads the store every round, and reading all of it each time
    cost O(cells) a round, O(cells²) a run (2.7 s a round at 2,000 rows here, more on an object store)."""
    fs, root = resolve(results_dir)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/cells", allow_not_found=True))
    # Hidden files are writes in flight (`.tmp-*.partial`, see workers/rowfile.py; older ones end in .parquet), ignored as
    # Parquet datasets do.
    listed = sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet") and not i.base_name.startswith((".", "_"))),
        key=lambda i: i.path,
    )
    cache: ReadCache = reread if reread is not None else {}
    settled = time.time_ns() - int(REREAD_SLACK_SECONDS * 1e9)

    def read_once(info: pafs.FileInfo) -> pa.Table | SkippedFile:
        stamp = (info.mtime_ns, info.size)
        known = cache.get(info.path)
        # Read again: a file unreadable last time (a remote hiccup passes), one whose filesystem gives no time, and one
        # modified within the slack of now — a row replaced by one of the same size within the clock's tick (S3 keeps
        # whole seconds) has the stamp it had, so a stamp is trusted only once that tick is past.
        if (known is not None and info.mtime_ns is not None and info.mtime_ns < settled and known[0] == stamp
                and isinstance(known[1], pa.Table)):  # fmt: skip
            return known[1]
        cache[info.path] = (stamp, _read_cell(fs, info.path))
        return cache[info.path][1]

    # Files are read by a few threads (Arrow releases the GIL; on object stores each read is a
    # round trip) and joined as Arrow tables, then converted once: a DataFrame per file cost ~4 ms each.
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        read = list(pool.map(read_once, listed))
    for gone in set(cache) - {i.path for i in listed}:
        del cache[gone]
    tables = [t for t in read if isinstance(t, pa.Table)]
    skipped = [t for t in read if isinstance(t, SkippedFile)]
    frame = _frame(tables) if tables else pd.DataFrame(columns=list(REQUIRED_COLUMNS))
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else float("nan")
    if "finished_at" in frame and frame["cell_id"].duplicated().any():
        frame = (
            frame.assign(_ok=frame["status"] == "ok")
            .sort_values(["_ok", "finished_at"], na_position="first")
            .drop_duplicates("cell_id", keep="last")
            .drop(columns="_ok")
            .sort_index()
        )
    return LoadedResults(frame.reset_index(drop=True), tuple(skipped))


def cells_folder_hint(results_dir: str) -> str:
    """'; … give its parent' where `results_dir` is a sweep's own cells/ folder (tab completion stops there), else ''."""
    fs, root = resolve(results_dir)
    parent = root.rstrip("/").rpartition("/")[0]
    if not root.rstrip("/").endswith("/cells") or fs.get_file_info(f"{parent}/{PLAN_NAME}").type != pafs.FileType.File:
        return ""
    shown = parent if "://" not in results_dir else results_dir.rstrip("/").removesuffix("cells").rstrip("/")
    return f"; that is a sweep's cells/ folder: give the folder holding it, {shown}"


def load_rows_to_fit(results_dir: str, *, planned_only: bool = False, plan: Plan | None = None) -> LoadedResults:
    """`load_results` for the fit and the report: a directory that does not exist is a mistyped path.

    An existing one without rows yet (a sweep just started: its plan is written) still gets its "0 rows"
    fit and report; a folder that holds neither a plan nor cells/ is no sweep, and is refused.
    Rows of cells that the plan (`plan`, by default the sweep's latest, `plan.json`, written by
    `steerscale run`) does not list are counted, and left out with `planned_only`: they come from an earlier config (another
    LoRA rank: a curve should not mix the two) or from a run that planned fewer seeds or budgets
    (rows a curve should keep), which only the user can tell apart. One case is not ambiguous: an
    unplanned row of the model, task, method, budget and seed of a planned cell that has its own ok row is
    that cell under an earlier config, superseded; it is always left out, or the fit would count the cell
    twice (`_same_cell_as`: the planned cell's key is read from its stored row, as a plan lists ids only).
    """
    fs, root = resolve(results_dir)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        raise NoResultsError(f"no results directory {results_dir}: give a sweep's results_dir, or its YAML")
    if kind != pafs.FileType.Directory:
        raise NoResultsError(f"{results_dir} is a file: give a sweep's results_dir, or its YAML")
    if not holds_sweep(fs, root):  # the parent of results dirs, or a sweep's cells/ itself: fitting it would write fits files in there
        raise NoResultsError(f"no sweep at {results_dir}: neither a plan ({PLAN_NAME}) nor a cells/ folder; give a sweep's results_dir "
                             f"(the folder holding cells/), or its YAML{cells_folder_hint(results_dir)}")  # fmt: skip
    loaded = load_results(results_dir)
    current = _on_current_task_data(loaded.frame)
    loaded = replace(loaded, frame=loaded.frame[current].reset_index(drop=True), stale_data=int((~current).sum()))
    if plan is None:
        stored_plan = planned_cells(fs, root)
        plan = None if stored_plan is None else Plan(PLAN_NAME, frozenset(stored_plan))
    if plan is None and planned_only:  # fitting every row instead would leave out nothing the flag asked to leave out
        raise NoResultsError(f"--planned-only needs the sweep's plan: {results_dir} has no readable {PLAN_NAME}; "
                             "give the sweep's YAML instead of its results_dir, or leave the flag off to fit every row")  # fmt: skip
    if plan is None or not len(loaded.frame):
        return loaded
    frame = loaded.frame
    listed = frame["cell_id"].isin(plan.cell_ids)
    # only a planned cell's ok row replaces its earlier config's: one that failed is a cell not run yet, whose earlier
    # row is fitted as an unrun cell's is (the failed row left that point with no data at all, helper-177)
    superseded = ~listed & _same_cell_as(frame, listed & (frame["status"] == "ok"))
    keep = listed if planned_only else ~superseded
    return LoadedResults(frame[keep].reset_index(drop=True), loaded.skipped, int((~listed & ~superseded).sum()), planned_only,
                         int(superseded.sum()), loaded.stale_data, plan.name)  # fmt: skip


CELL_KEY = ("model", "task", "method", "budget", "seed")  # what two configs of one cell share


def _same_cell_as(frame: pd.DataFrame, rows: pd.Series) -> pd.Series:
    """Rows whose model, task, method, budget and seed are those of one of `rows` (a mask). Matched on the
    columns, not the slugs: a slug names the model by its id's tail, which /ckpt/x/pythia-160m shares with
    EleutherAI/pythia-160m."""
    keys = pd.MultiIndex.from_frame(frame[list(CELL_KEY)])
    return pd.Series(keys.isin(keys[rows.to_numpy()]), index=frame.index)


def _task_data_version(versions: object, task: str) -> int:
    """The data version of `task` a row recorded in its `versions` (workers.run_cell.versions_json);
    1 for rows from before tasks had versions."""
    try:
        recorded = json.loads(versions) if isinstance(versions, str) else {}
    except ValueError:
        recorded = {}
    task_data = recorded.get("task_data") if isinstance(recorded, dict) else None
    version = task_data.get(task) if isinstance(task_data, dict) else None
    return version if isinstance(version, int) else 1


def _on_current_task_data(frame: pd.DataFrame) -> pd.Series:
    """Rows scored on the newest version of their task's questions found in the store. A task whose
    examples changed (`Task.data_version`) gave its cells new ids, so the old rows stay beside the new
    ones until the sweep's rerun supersedes them; until then a curve would mix two test sets."""
    if not len(frame):
        return pd.Series(True, index=frame.index)
    versions = frame["versions"] if "versions" in frame else pd.Series(None, index=frame.index)
    recorded = pd.Series([_task_data_version(v, task) for v, task in zip(versions, frame["task"])], index=frame.index)
    return recorded == recorded.groupby(frame["task"], dropna=False).transform("max")  # a row naming no task (a failed one) is not older


def unplanned_note(loaded: LoadedResults) -> str:
    """What the fit did with rows of cells the latest plan does not list, or scored on older task data,
    and how to do the other thing."""
    superseded = (f"{loaded.superseded} stored rows left out: the plan's cell of the same model, task, method, budget and seed "
                  "has its own ok row (an earlier config's row, superseded)") if loaded.superseded else ""  # fmt: skip
    stale = (f"{loaded.stale_data} stored rows left out: scored on an older version of their task's questions (task_data in "
             "`versions`; the task's splits changed) — rerun the sweep to replace them") if loaded.stale_data else ""  # fmt: skip
    if not loaded.unplanned:
        return "; ".join(filter(None, [superseded, stale]))
    if loaded.planned_only:
        unplanned = f"left out {loaded.unplanned} stored rows of cells not in {loaded.plan_name} (drop --planned-only to fit them)"
    else:
        which = ", the latest run's plan" if loaded.plan_name == PLAN_NAME else ""
        unplanned = (f"{loaded.unplanned} stored rows are of cells not in {loaded.plan_name}{which}: fitted too; if they come "
                     "from an earlier config of a method or another sweep (not just other seeds or budgets), --planned-only leaves them out")
    return "; ".join(filter(None, [unplanned, superseded, stale]))


# What a row's `versions` records about the weights (workers.models.loading.weights_provenance).
WEIGHTS_KEYS = ("model_commit", "model_weights_sha256", "model_weights_sample_sha256")


def _recorded(versions: object) -> dict:
    """A row's `versions` as a dict; empty where it is missing or unreadable (older rows)."""
    try:
        recorded = json.loads(versions) if isinstance(versions, str) else None
    except ValueError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _weights_of(recorded: dict, model: str) -> str | None:
    """A row's weights as "<key> <first 12 hex>", or None where it records none."""
    return next((f"{key} {recorded[key][:12]}" for key in WEIGHTS_KEYS if isinstance(recorded.get(key), str)), None)


def _task_rows_of(recorded: dict, task: str) -> str | None:
    """The digest of the hub rows a row's own task was scored on (workers.tasks.hub_data_digest), first 12 hex."""
    digests = recorded.get("task_rows")
    digest = digests.get(task) if isinstance(digests, dict) else None
    return f"rows {digest[:12]}" if isinstance(digest, str) else None


def neutral_text_of(recorded: dict) -> str:
    """What a row measured neutral text on (workers.tasks.neutral_text_digest): natural texts, by the first 12 hex of
    their digest, or the offline world's grammar (rows from before `eval.neutral_source` existed too)."""
    digest = recorded.get("neutral_texts")
    return f"texts {digest[:12]}" if isinstance(digest, str) else "the world's grammar"


def neutral_texts_of(ok: pd.DataFrame) -> pd.Series:
    """`neutral_text_of` for each row of `ok` that measured neutral text (`eval.neutral_size` 0 leaves
    `base_neutral_nll` empty, and no digest: such a row read no text at all)."""
    if "base_neutral_nll" in ok:
        ok = ok[ok["base_neutral_nll"].notna()]
    versions = ok["versions"] if "versions" in ok else pd.Series(None, index=ok.index, dtype=object)
    return pd.Series([neutral_text_of(_recorded(v)) for v in versions], index=ok.index, dtype=object)


def pins_per_group(frame: pd.DataFrame, column: str, pin: Callable[[dict, str], str | None]) -> dict[str, Counter[str]]:
    """For each value of `column` (a model, a task) whose ok rows record more than one `pin` (the
    weights, the data) in their `versions`: how many rows recorded each."""
    ok = frame[frame["status"] == "ok"]
    if "versions" not in ok or not len(ok):
        return {}
    pins = pd.Series([pin(_recorded(v), g) for v, g in zip(ok["versions"], ok[column])], index=ok.index)
    counts = {group: Counter(p for p in values if isinstance(p, str)) for group, values in pins.groupby(ok[column])}  # not None/NaN
    return {group: c for group, c in counts.items() if len(c) > 1}


def _listed(mixed: dict[str, Counter[str]]) -> str:
    return "; ".join(f"{group}: {', '.join(f'{p}… in {n} rows' for p, n in c.most_common())}" for group, c in mixed.items())


def mixed_pins_note(frame: pd.DataFrame) -> str | None:
    """A warning when one model's fits mix rows computed with different weights, one task's rows were
    scored on different hub data, or the rows measured neutral text on different texts; None when none does."""
    notes = []
    if weights := pins_per_group(frame, "model", _weights_of):
        notes.append(f"The rows of {len(weights)} model(s) were computed with different weights, and their fits mix them ({_listed(weights)}). "
                     "A hub id without a revision follows `main`, which moved between cells; a ladder rung is rebuilt from its recipe "
                     "on each node whose cache lacks it, and CPUs of different kinds round its pretraining differently; a local "
                     "directory's weights were saved over, or nodes read different copies. Pin the "
                     "revision, or build the ladder once where every node reads it ($STEERSCALE_CACHE on shared storage); "
                     "`steerscale run CONFIG --force` reruns the cells.")  # fmt: skip
    if data := pins_per_group(frame, "task", _task_rows_of):
        notes.append(f"The rows of {len(data)} task(s) were scored on different versions of their hub dataset, and their fits mix them "
                     f"({_listed(data)}): the dataset's `main` moved between cells, or nodes read different local copies; "
                     "`steerscale run CONFIG --force` reruns the cells on what the nodes read now.")  # fmt: skip
    ok = frame[frame["status"] == "ok"]
    if len(texts := neutral_texts_of(ok).value_counts()) > 1:
        notes.append(f"The rows measured neutral text (neutral KL, perplexity ratio, `neutral_loss`) on different texts "
                     f"({', '.join(f'{text} in {n} rows' for text, n in texts.items())}): `eval.neutral_source` differs "
                     "between cells, or its dataset's `main` moved; those figures compare only within one text.")  # fmt: skip
    return " ".join(notes) or None


PLAN_NAME = "plan.json"  # the planned cells (id, slug, model, method), written by `steerscale run`


def planned_cells(fs: pafs.FileSystem, root: str) -> set[str] | None:
    """The cell ids of the sweep's plan, or None when there is no plan (rows written some other way) or it
    is damaged: not JSON, or JSON other than a list of entries with a cell id (edited or written by
    something else), which raised a TypeError out of `steerscale fit`. Only the ids are read."""
    try:
        with fs.open_input_stream(f"{root}/{PLAN_NAME}") as stream:
            entries = json.loads(stream.read().decode())
    except (FileNotFoundError, ValueError):  # no plan, or one damaged (JSONDecodeError, UnicodeDecodeError)
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("cell_id"), str) for e in entries):
        return None
    return {entry["cell_id"] for entry in entries}


def write_bytes(results_dir: str, name: str, data: bytes) -> str:
    """Write `<results_dir>/<name>` on whatever filesystem holds the results; returns its path."""
    fs, root = resolve(results_dir)
    path = f"{root}/{name}"
    with fs.open_output_stream(path) as out:
        out.write(data)
    return path


def write_table(results_dir: str, name: str, frame: pd.DataFrame) -> str:
    fs, root = resolve(results_dir)
    path = f"{root}/{name}"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, filesystem=fs)
    return path


def saved_before(results_dir: str, name: str) -> bool:
    """Whether `name` is already there beside the cells (local or remote)."""
    fs, root = resolve(results_dir)
    return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


def write_json(results_dir: str, name: str, payload: object) -> str:
    """`payload` as strict JSON; an infinite value (an interval end past every budget) as the text "inf" or
    "-inf", which `float()` reads back, so that it stays apart from a missing one (NaN, null)."""
    return write_bytes(results_dir, name, json.dumps(jsonable(payload, infinity="inf"), indent=2, allow_nan=False).encode())


def jsonable(value: object, infinity: str | None = None) -> object:
    """Plain JSON values: NumPy scalars unwrapped, NaN as null (strict JSON has no NaN); ±inf as null too, or as
    `infinity` with its sign."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, infinity) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, infinity) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) or infinity is None else ("-" if value < 0 else "") + infinity
    return value
