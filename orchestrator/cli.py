"""`steerscale`: plan, run, watch and fit sweeps. Every subcommand has --help."""

from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path
import shlex
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Callable, Sequence

from tqdm import tqdm

from workers.config import ConfigError
from workers.registry import UnknownNameError

from orchestrator.address import check_listening
from orchestrator.claims import Claims
from orchestrator.errors import ROWS_LOST_NOTE, SweepStoppedError, counted, first_line
from orchestrator.store import ResultsStore, StoredCell, StoreScan, read_manifest, write_manifest

if TYPE_CHECKING:
    from analysis.io import LoadedResults, Plan
    from orchestrator.grid import PlannedCell
    from orchestrator.spec import SweepSpec
    from workers.cell import ModelSpec

# Commands import what they need when they run: planning pulls in torch and the method modules,
# `run` Ray, `fit` and `report` scipy and matplotlib; `status` and `--help` need none of them.


def _table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _load_grid(args: argparse.Namespace, *, fetch_configs: bool) -> tuple[SweepSpec, list[PlannedCell]]:
    """The sweep and its cells; a grid the config cannot run (a budget past a task's pool, too few
    steps for a budget, a LoRA target a model lacks) is named with the file and the override that set
    it, as a bad key is. `fetch_configs`: as `_refuse_what_models_lack` (off for `plan`: no downloads)."""
    from orchestrator.spec import in_config, load_spec

    spec = load_spec(args.config, args.overrides)
    cells = _expanded(spec, args.config, args.overrides)
    try:
        _refuse_what_models_lack(cells, fetch_configs=fetch_configs)
    except ConfigError as err:
        raise in_config(err, args.config, args.overrides) from None
    return spec, cells


def _expanded(spec: SweepSpec, path: str, overrides: Sequence[str]) -> list[PlannedCell]:
    from orchestrator.grid import expand
    from orchestrator.spec import in_config

    try:
        return expand(spec)
    except ConfigError as err:
        raise in_config(err, path, overrides) from None


def _is_sweep_yaml(given: str) -> bool:
    return given.endswith((".yaml", ".yml")) and os.path.isfile(given)


def _results_dir(given: str, overrides: list[str]) -> str:
    """A results directory or URI as given, or a sweep YAML's `results_dir` (`status configs/x.yaml` works too),
    with the `key=value` overrides it was run with."""
    if given.endswith((".yaml", ".yml")) and "://" not in given and not os.path.exists(given):
        from orchestrator.spec import no_such_config

        raise no_such_config(given)
    if overrides and not _is_sweep_yaml(given):
        raise ConfigError(f"key=value overrides ({' '.join(overrides)}) apply to a sweep YAML; {given} is a results directory")
    if _is_sweep_yaml(given):
        from orchestrator.spec import load_spec

        found = load_spec(given, overrides, check_models=False).results_dir  # its results may be read away from its models
        # named in full: a relative results_dir is read from the current directory, which messages should show
        return found if "://" in found else os.path.abspath(found)
    if "://" not in given and os.path.isfile(given):
        raise ConfigError(f"{given} is a file: give a sweep's results_dir, or its YAML")
    return given


def _relative_results_dir(given: str, overrides: list[str]) -> bool:
    """Whether `given` is a sweep YAML whose results_dir is a relative path (read from the current directory)."""
    if not _is_sweep_yaml(given):
        return False
    from orchestrator.spec import load_spec

    found = load_spec(given, overrides, check_models=False).results_dir
    return "://" not in found and not os.path.isabs(found)


def _relative_hint(given: str, overrides: list[str]) -> str:
    """Where a relative results directory, given or a YAML's, was read from ('' for an absolute one or a URI)."""
    relative = _relative_results_dir(given, overrides) if _is_sweep_yaml(given) else "://" not in given and not os.path.isabs(given)
    return f" (a relative results_dir is read from the current directory, {os.getcwd()})" if relative else ""


def _yaml_grid(path: str, overrides: list[str]) -> list[dict]:
    """A sweep YAML's own planned cells (with the overrides it was run with), as plan.json lists them."""
    from orchestrator.spec import load_spec

    return _manifest_entries(_expanded(load_spec(path, overrides, check_models=False), path, overrides))


def _grid_name(given: str, overrides: list[str]) -> str:
    return f"{given}'s grid" + (f" (with {' '.join(overrides)})" if overrides else "")


def _planned_entries(given: str, overrides: list[str], store: ResultsStore) -> list[dict]:
    """The cells a command given `given` asks about: a sweep YAML's own grid (not the plan of whichever
    run last wrote to its results directory, which may be another config's), else the store's plan.json."""
    return _yaml_grid(given, overrides) if _is_sweep_yaml(given) else read_manifest(store)


def _plan_to_fit(given: str, overrides: list[str]) -> Plan | None:
    """For `fit`/`report` given a sweep YAML: its grid is the plan (default: the results' plan.json)."""
    if not _is_sweep_yaml(given):
        return None
    from analysis.io import Plan

    return Plan(_grid_name(given, overrides), frozenset(e["cell_id"] for e in _yaml_grid(given, overrides)))


def _stored(spec: SweepSpec, *, set_aside: bool) -> tuple[ResultsStore, StoreScan]:
    store = ResultsStore(spec.results_dir)
    return store, store.scan(set_aside=set_aside)


def _report_quarantine(scan: StoreScan, *, set_aside: bool) -> None:
    where = "moved to quarantine/" if set_aside else "`steerscale run` moves such files to quarantine/"
    for name, reason in scan.quarantined:
        print(f"unreadable results file {name} ({where}): {reason}", file=sys.stderr)


def _status_table(entries: list[dict], status: dict[str, str]) -> str:
    """Done / failed / remaining per (model, method), models in the order the entries name them (the
    config's, smallest first in a ladder sweep), methods likewise within a model."""
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for entry in entries:
        counts[(entry["model"], entry["method"])][status.get(entry["cell_id"], "remaining")] += 1
    model_order = {model: i for i, model in enumerate(dict.fromkeys(model for model, _ in counts))}
    method_order = {method: i for i, method in enumerate(dict.fromkeys(method for _, method in counts))}
    rows = [
        (model, method, c["ok"], c["failed"], c["remaining"], sum(c.values()))
        for (model, method), c in sorted(counts.items(), key=lambda kv: (model_order[kv[0][0]], method_order[kv[0][1]]))
    ]
    return _table(("model", "method", "done", "failed", "remaining", "total"), rows)


def _manifest_entries(cells: list[PlannedCell]) -> list[dict]:
    return [
        {"cell_id": c.cell_id, "slug": c.config.slug, "model": c.config.model.id, "method": c.config.method}
        for c in cells
    ]


def cmd_plan(args: argparse.Namespace) -> int:
    spec, cells = _load_grid(args, fetch_configs=False)  # what `run` would refuse, without fetching a hub model's config
    if args.cell:
        return _print_cell(spec, cells, args.cell)
    store, scan = _stored(spec, set_aside=False)
    _report_quarantine(scan, set_aside=False)
    status = scan.statuses()
    statuses = [status.get(c.cell_id) for c in cells]
    dims = (
        f"{counted(len(spec.models), 'model')} × {counted(len(spec.tasks), 'task')} × {counted(len(spec.methods), 'method')} × "
        f"budgets {spec.budgets} × {counted(len(spec.seeds), 'seed')}"
    )
    print(f"sweep {spec.sweep} -> {spec.results_dir}")
    own = "; ".join(f"{method}: {', '.join(map(str, spec.budgets_for(method)))}" for method in spec.methods
                    if spec.budgets_for(method) != spec.budgets)  # fmt: skip
    print(f"grid: {len(cells)} cells ({dims}; per-method budgets: {own or 'none'})")
    print(f"done {statuses.count('ok')} · failed {statuses.count('failed')} · to run {statuses.count(None)}")
    print(_status_table(_manifest_entries(cells), status))
    print(_compute_to_go(cells, scan))
    _note_unfittable(cells)
    _note_spec(spec)
    _note_rows_outside(spec.sweep, [args.config, *args.overrides], cells, scan)
    return 0


def _note_unfittable(cells: list[PlannedCell]) -> None:
    """Say, before anything runs, which methods' loss(D) curves the fitter will refuse for too few budgets."""
    from analysis.methods import method_kind
    from orchestrator.acquisition import MIN_BUDGETS, curves_of

    budgets: dict[str, set[int]] = {c.config.method: set() for c in cells if method_kind(c.config.method) != "reference"}
    for (_task, method, _model), group in curves_of(cells).items():
        budgets.setdefault(method, set()).update(c.config.budget for c in group)
    short = {method: len(b) for method, b in budgets.items() if len(b) < MIN_BUDGETS}
    if short:
        listed = ", ".join(f"{method} ({n})" for method, n in sorted(short.items()))
        print(f"note: a loss(D) curve needs at least {MIN_BUDGETS} distinct budgets > 0; these methods have fewer: {listed}. "
              "Their cells run and are stored, but `fit` will fit no curve (and no crossover) for them; add budgets")  # fmt: skip


def _note_spec(spec: SweepSpec) -> None:
    """What the config asks for that the analysis will not read as its writer likely meant."""
    from orchestrator.spec import lone_families, own_code_unrun, unlike_parts

    for line in lone_families(spec) + own_code_unrun(spec) + unlike_parts(spec):
        print(f"note: {line}")


def _compute_to_go(cells: list[PlannedCell], scan: StoreScan) -> str:
    """Cell compute the cells still to run will take, from the stored cells of the same model and method: their
    seconds fitted against each cell's prior work (`cellcost.work_units` + `eval_units`) as a fixed part and a part
    that grows with it (`cellcost.Rate`), a model and method stored at one budget borrowing its method's shape. (The
    mean of the stored cells priced a budget-4096 cell as the mean of what ran: run `budgets=[4096]` first, as the hub
    configs suggest, and every cell left was priced at a top-budget cell's time.)"""
    from orchestrator.cellcost import Rate, eval_units, work_units

    def work(cell: PlannedCell) -> float:
        return work_units(cell.config) + eval_units(cell.config)

    measured: dict[tuple[str, str], tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for cell in cells:
        stored = scan.cells.get(cell.cell_id)
        if stored is not None and stored.status == "ok" and stored.seconds is not None:
            for key in ((cell.config.method, ""), (cell.config.method, cell.config.model.id)):  # the method's first: the shape
                measured[key][0].append(work(cell))
                measured[key][1].append(stored.seconds)
    to_run = [c for c in cells if c.cell_id not in scan.cells]
    if not to_run:
        return "nothing to run"
    shapes = {method: Rate.fitted(*measured[(method, model)]) for method, model in measured if not model}
    rates = {key: Rate.fitted(*measured[key], shape=shapes[key[0]]) for key in measured if key[1]}
    known = [rates[key](work(c)) for c in to_run if (key := (c.config.method, c.config.model.id)) in rates]
    # A model and method with no cell of this grid stored, but cells of another config (eval.test_size changed, say):
    # their mean, which the scan can give without their configs, unscaled to each cell's budget (helper-169: "unknown")
    planned = {c.cell_id for c in cells}
    earlier: dict[tuple[str, str], list[float]] = defaultdict(list)
    for stored in scan.cells.values():
        if stored.cell_id not in planned and stored.status == "ok" and stored.seconds is not None:
            earlier[(stored.method, stored.model)].append(stored.seconds)
    guessed = [sum(earlier[key]) / len(earlier[key]) for c in to_run if (key := (c.config.method, c.config.model.id)) not in rates and key in earlier]
    if not known and not guessed:
        return "cell compute to go: unknown until a cell of each model and method is stored"
    unknown = len(to_run) - len(known) - len(guessed)
    parts = [f"{_minutes(sum(known))} over {len(known)} cells from the stored cells of each one's model and method, scaled to its budget"] if known else []
    parts += [f"{_minutes(sum(guessed))} over {len(guessed)} cells from the mean of their model and method's stored cells of another "
              "config, not scaled to their budgets (a rough guide)"] if guessed else []  # fmt: skip
    rest = f"; {unknown} cells have no stored cell of their model and method to go by" if unknown else ""
    total = f"≈ {_minutes(sum(known) + sum(guessed))}: " if known and guessed else "≈ "
    return f"cell compute to go: {total}{'; '.join(parts)} (divide by the workers for wall time){rest}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _print_cell(spec: SweepSpec, planned: list[PlannedCell], wanted: str) -> int:
    """One planned cell's CellConfig JSON: what a worker runs, to run it alone (`python -m workers.run_cell`)."""
    from workers.registry import did_you_mean

    found = [c for c in planned if wanted in (c.config.slug, c.cell_id)]
    if not found:
        slugs = [c.config.slug for c in planned]
        raise ConfigError(f"--cell {wanted}: no such cell in {spec.sweep}{did_you_mean(wanted, slugs)}; slugs look like "
                          f"'{slugs[0]}' (model__task__method__budget__seed; a run's plan.json lists every one)")  # fmt: skip
    if len(found) > 1:
        which = ", ".join(f"{c.cell_id} ({c.config.model.id})" for c in found)
        raise ConfigError(f"--cell {wanted}: {len(found)} cells share that slug; give one of their ids: {which}")
    print(found[0].config.model_dump_json(indent=2))
    return 0


ADAPTIVE_FLAGS = ("budget_flops", "max_cells", "target_width", "target_exponent_width", "batch_size")


def _adaptive_flag_error(args: argparse.Namespace) -> str | None:
    """Why the adaptive flags do not go together (None when they do)."""
    given = [f"--{name.replace('_', '-')}" for name in ADAPTIVE_FLAGS if getattr(args, name) is not None]
    if not args.adaptive:
        return f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --adaptive" if given else None
    if args.budget_flops is None and args.max_cells is None:
        return "--adaptive needs a budget to stop at: --budget-flops X and/or --max-cells K"
    if args.force:
        return "--adaptive chooses among cells without a stored row; it does not combine with --force"
    return None


def cells_to_run(cells: list[PlannedCell], scan: StoreScan, *, force: bool, retry_failed: bool) -> list[PlannedCell]:
    """Those without a stored row; with `retry_failed` also the failed ones; with `force` all of them."""
    if force:
        return list(cells)
    return [c for c in cells if c.cell_id not in scan.cells or (retry_failed and scan.cells[c.cell_id].status == "failed")]


def count_line(sweep: str, cells: list[PlannedCell], scan: StoreScan, todo: list[PlannedCell]) -> str:
    """What a run is about to do: with --force or --retry-failed some cells to run are stored already (it said
    "0 already stored, 8 to run" for 8 stored cells that --force replaced)."""
    stored = sum(c.cell_id in scan.cells for c in cells)
    again = sum(c.cell_id in scan.cells for c in todo)
    return f"sweep {sweep}: {len(cells)} cells, {stored} already stored, {len(todo)} to run" + (f" ({again} of them stored ones, run again)" if again else "")


def _note_rows_outside(sweep: str, config: list[str], cells: list[PlannedCell], scan: StoreScan) -> None:
    """Say when the results directory holds rows this grid does not plan (another sweep's, or this sweep's under an
    earlier config): `fit DIR` fits every row there together. `plan` says it too, before the run it previews. `config`
    is the sweep's YAML and its overrides, repeated in the `fit` it suggests (without them it fitted another grid)."""
    others = Counter(cell.sweep for cell in scan.cells.values() if cell.sweep != sweep)
    planned = {c.cell_id for c in cells}
    earlier = sum(cell.sweep == sweep and cell_id not in planned for cell_id, cell in scan.cells.items())
    if not others and not earlier:
        return
    names = ", ".join(f"'{name}' ({count})" for name, count in others.most_common())
    held = "; ".join(part for part in (f"rows of other sweeps: {names}. A cell both grids share is stored once and not rerun" if others else "",
                                       f"{counted(earlier, 'row')} of '{sweep}' from cells this grid does not plan (an earlier "
                                       "config, or grid values since removed)" if earlier else "") if part)  # fmt: skip
    print(f"note: this results_dir also holds {held}; `fit`/`report` of the directory fit every row together, "
          f"`{shlex.join(['steerscale', 'fit', *config, '--planned-only'])}` this grid alone")


def _prepare_locally(model: ModelSpec, *, progress: bool) -> None:
    """A local run builds each ladder rung and downloads each hub model here, once, instead of in
    every worker at once; one that cannot be had stops the run before any cell, naming it. (On a
    cluster, `--address`, the driver's machine may not be where the models are read.)"""
    from orchestrator.spec import sibling_hint
    from workers.run_cell import prepare_model

    try:
        prepare_model(model, progress=progress)
    except Exception as err:  # noqa: BLE001 - hub, network and build errors alike: re-raised as the config's problem
        # `models/tiny-mm` beside `models/tiny-m`: read as a hub id (as it must be: `EleutherAI/pythia-410m` beside a local
        # `EleutherAI/pythia-160m` is one), so the hint comes only once the hub had no such model
        local = f" (no local directory {model.id} either{hint})" if (hint := sibling_hint(Path(model.id))) else ""
        raise ConfigError(f"model {model.id} cannot be loaded here: {first_line(err)}{local}") from err


def _prepare_data(cells: list[PlannedCell]) -> None:
    """A local run downloads (or finds cached) each hub task's dataset, and cuts each natural neutral text, here, once,
    before any cell: one that cannot be had (offline with no cache, a gated dataset without a login, a field or rows
    it lacks) stops the run naming it, where every cell of it would have failed with the same error."""
    from orchestrator.grid import data_error_line
    from workers.tasks import fetch_hub_data, get_task, neutral_texts

    for name in sorted({task for c in cells for task in c.config.tasks_read}):
        try:
            fetch_hub_data(name)
        except Exception as err:  # noqa: BLE001 - hub, network and file errors alike: re-raised as the config's problem
            path = get_task(name).source.path  # type: ignore[attr-defined]  (a task that reads hub data has a source)
            local = "" if os.path.isabs(path) or os.path.isdir(path) else (f" (offline, a copy of its files at ./{path}/<split>.jsonl, relative to where the "
                                                    "run starts, is read instead: tests/fixtures/ shows them)")  # fmt: skip
            raise ConfigError(f"task {name}: its dataset cannot be read here: {data_error_line(err)}{local}") from err
    for size, words, source in {(c.config.eval.neutral_size, c.config.eval.neutral_min_words, c.config.eval.neutral_source) for c in cells}:
        try:
            neutral_texts(size, words, source)
        except ValueError as err:  # its message names the setting
            raise ConfigError(str(err)) from err


def _refuse_what_models_lack(cells: list[PlannedCell], *, fetch_configs: bool = True) -> None:
    """Refuse, before the store is touched or any model fetched, a method config naming parts a model lacks
    (a mistyped LoRA target): each of its cells would fail, or with PEFT quietly adapt fewer modules than
    the config says. Only a model's config is read (a ladder's recipe, a hub model's config.json). A model
    this driver cannot build (a config it cannot fetch, an architecture its transformers does not know,
    remote code) is left to its workers, which refuse the same target at injection.

    Without `fetch_configs` (`plan`, which downloads and runs nothing) only the models whose config is here
    are checked: ladder rungs and local directories, not those whose code ships with them. Either way a
    model is built (and transformers' modeling code imported) only for a method that names parts of it."""
    from workers.cell import LADDER_PREFIX
    from workers.run_cell import method_problems

    by_model: dict[str, tuple[ModelSpec, dict[str, dict]]] = {}
    for cell in cells:
        model = cell.config.model
        here = model.id.startswith(LADDER_PREFIX) or os.path.isdir(model.id)  # not a hub id: nothing to download
        if not fetch_configs and (not here or model.trust_remote_code):
            continue
        by_model.setdefault(model.model_dump_json(), (model, {}))[1][cell.config.method] = cell.config.method_config
    problems = []
    for model, methods in by_model.values():
        try:
            problems += method_problems(model, methods)
        except Exception:  # noqa: BLE001 - see the docstring: the workers check it where the model loads
            continue
    if problems:
        raise ConfigError("\n".join(problems))


def _record_plan(store: ResultsStore, cells: list[PlannedCell]) -> None:
    """The run's plan, for `status` and `fit --planned-only`: written once its models and data are ready, so that a run
    refused while preparing them (a misspelled hub id) leaves the plan of the run before it, and its rows planned."""
    try:
        write_manifest(store, _manifest_entries(cells))
    except OSError as err:
        raise store.unwritable(err) from err


def _run_adaptive(
    args: argparse.Namespace, spec: SweepSpec, cells: list[PlannedCell], store: ResultsStore, scan: StoreScan, planned_at: float
) -> int:
    """Run the grid as an adaptive sweep (orchestrator/adaptive.py), one `run_cells` call per batch. With --retry-failed
    the grid's failed cells (chosen by earlier rounds; a lost node, a timeout) run again first, as one batch, planned
    when `scan` was read (`planned_at`: a row another driver stores after it is not run again): the loop itself never
    reruns a stored cell, and counts failed ones against --max-cells and towards giving a curve up."""
    from orchestrator.adaptive import Settings, run_adaptive
    from orchestrator.driver import run_cells
    from workers.run_cell import estimated_params

    if not args.address:
        _prepare_data(cells)
    params = {}  # model sizes: the cost model's prior, from configs alone (ladder rungs: their recipes)
    for model in {c.config.model.id: c.config.model for c in cells}.values():
        if not args.address:
            _prepare_locally(model, progress=not args.no_progress)
        try:
            params[model.id] = float(estimated_params(model))
        except OSError as err:  # a hub config this driver cannot fetch: the cost model learns that model's cost from its cells
            print(f"note: no size prior for {model.id} ({err})", file=sys.stderr)
    _record_plan(store, cells)

    def execute(batch: list[PlannedCell], planned_at: float) -> None:
        outcome = run_cells(batch, store, spec.resources, address=args.address, progress=not args.no_progress,
                            dashboard=not args.no_dashboard, planned_at=planned_at)  # fmt: skip
        print(f"  ran {counted(outcome.ok + outcome.failed, 'cell')} in {outcome.wall_seconds:.0f}s: {outcome.ok} ok, {outcome.failed} failed")

    if args.retry_failed:
        stored = scan.statuses()
        failed = [c for c in cells if stored.get(c.cell_id) == "failed"]
        print(f"--retry-failed: {counted(len(failed), 'failed cell')} of the grid run again before the adaptive rounds")
        if failed:
            execute(failed, planned_at)
    settings = Settings(**{name: getattr(args, name) for name in ADAPTIVE_FLAGS if getattr(args, name) is not None})
    outcome = run_adaptive(cells, store, execute, settings, params)
    print(f"adaptive: {outcome.cells_stored} of {len(cells)} cells stored, {outcome.flops_spent:.3g} post-training FLOPs")
    print(f"choices and their reasons: {store.where('adaptive.jsonl')}; results: {store.where('cells/')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    problem = _adaptive_flag_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from orchestrator.driver import run_cells  # imported here: `plan` and `status` need no Ray

    spec, cells = _load_grid(args, fetch_configs=True)
    if args.address:  # before the store is read: an address where nothing listens leaves results_dir as it was
        check_listening(args.address)
    planned_at = time.time()  # before the store is read: a row another driver stores after it is not run again
    if args.adaptive:
        from orchestrator.acquisition import check_grid
        from orchestrator.spec import in_config

        try:  # a grid the adaptive design cannot fit: ConfigError (exit 2) before the store is touched
            check_grid(cells, args.target_exponent_width)
        except ConfigError as err:
            raise in_config(err, args.config, args.overrides) from None
    store = ResultsStore(spec.results_dir)
    # a directory it cannot write stops the run here, before models are fetched; and before the scan, which moves bad
    # files to quarantine/ (read-only bucket credentials refuse that with a plain OSError, no PermissionError)
    store.check_writable()
    scan = store.scan(set_aside=True)
    _report_quarantine(scan, set_aside=True)
    if args.adaptive:
        _note_spec(spec)
        _note_rows_outside(spec.sweep, [args.config, *args.overrides], cells, scan)
        return _run_adaptive(args, spec, cells, store, scan, planned_at)
    todo = cells_to_run(cells, scan, force=args.force, retry_failed=args.retry_failed)
    print(count_line(spec.sweep, cells, scan, todo))
    _note_unfittable(cells)
    _note_spec(spec)
    _note_rows_outside(spec.sweep, [args.config, *args.overrides], cells, scan)
    running, stored = {c.cell_id for c in todo}, scan.statuses()
    waiting = sum(1 for c in cells if c.cell_id not in running and stored.get(c.cell_id) == "failed")
    if waiting:
        print(f"{waiting} stored cells failed and are not rerun; rerun them with --retry-failed (`steerscale status` shows their errors)")
    if not args.address:  # the datasets first: a gated one stops the run before gigabytes of weights are fetched
        _prepare_data(todo)
        for model in {c.config.model.id: c.config.model for c in todo}.values():
            _prepare_locally(model, progress=not args.no_progress)
    _record_plan(store, cells)
    outcome = run_cells(todo, store, spec.resources, address=args.address, progress=not args.no_progress,
                        dashboard=not args.no_dashboard, planned_at=planned_at)  # fmt: skip
    print(
        f"ran {counted(outcome.ok + outcome.failed, 'cell')} in {outcome.wall_seconds:.0f}s: {outcome.ok} ok, {outcome.failed} failed; "
        f"{counted(outcome.total_model_loads, 'model load')} by {counted(len(outcome.model_loads), 'worker')}"
        + (f" (and {counted(outcome.workers_lost, 'worker')} lost mid-cell, whose loads are not counted)" if outcome.workers_lost else "")
    )
    if outcome.skipped_claimed:
        print(f"{outcome.skipped_claimed} cells were left alone: another live driver has claimed them, or stored their rows "
              "since this run read the store (within seconds of it, as a store's clock may read: rerun to run them)")  # fmt: skip
    print(f"results: {store.where('cells/')}  (one Parquet file per cell)")
    if outcome.kept_ok:
        print(f"{outcome.kept_ok} of the failed cells had an ok row, which was kept (their errors are above)")
    if outcome.failed > outcome.kept_ok:
        print("failed cells are stored with their error; rerun them with --retry-failed")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = ResultsStore(_results_dir(args.results_dir, args.overrides))
    scan = store.scan(set_aside=False)
    _report_quarantine(scan, set_aside=False)
    entries = _planned_entries(args.results_dir, args.overrides, store)
    if not entries and not scan.cells and scan.quarantined:  # a sweep whose every row file is unreadable is still one
        print(f"error: no readable row at {store.uri}: its {counted(len(scan.quarantined), 'cell file')} (above) cannot be read, "
              "and there is no plan (plan.json)", file=sys.stderr)  # fmt: skip
        return 2
    if not entries and not scan.cells:
        from analysis.io import cells_folder_hint

        print(f"error: no sweep at {store.uri}: neither a plan (plan.json) nor stored rows; `steerscale run CONFIG` makes both "
              "(once its models and data are ready: a run may still be preparing them)"
              f"{cells_folder_hint(store.uri)}", file=sys.stderr)  # fmt: skip
        return 2
    known = {e["cell_id"] for e in entries}
    remaining = sum(e["cell_id"] not in scan.cells for e in entries)
    unplanned = set(scan.cells) - known
    # The headline is the plan's (all rows where there is no plan); rows outside it get their own table
    # rows, so a (model, method) of the plan never counts more cells than the plan has.
    counts = Counter(scan.cells[c].status for c in (known & set(scan.cells) if known else unplanned))
    running = len(Claims(store).held_by_live_drivers() & known - set(scan.cells)) if known else 0
    print(f"{store.uri}: {counts['ok']} ok, {counts['failed']} failed, {remaining} remaining"
          + (f" ({running} of them claimed by a running driver: running or next)" if running else ""))
    if not scan.cells and not store.exists():
        print(f"nothing is stored at {store.uri} yet{_relative_hint(args.results_dir, args.overrides)}")
    if unplanned and known:
        outside = Counter(scan.cells[c].status for c in unplanned)
        plan = _grid_name(args.results_dir, args.overrides) if _is_sweep_yaml(args.results_dir) else "the latest run's plan"
        print(f"{counted(len(unplanned), 'more stored row')} ({outside['ok']} ok, {outside['failed']} failed) "
              f"{'are from cells' if len(unplanned) != 1 else 'is from a cell'} not in {plan}: "
              "an earlier run with other seeds, budgets or models (fitted with the rest unless --planned-only), an earlier "
              "config of a method, or another sweep; the table lists them as (unplanned)")  # fmt: skip
    for cell_id in sorted(unplanned):  # rows from cells no longer in the plan (an earlier config): show them too
        stored = scan.cells[cell_id]
        entries.append({"cell_id": cell_id, "model": stored.model, "method": f"{stored.method} (unplanned)" if known else stored.method})
    print(_status_table(entries, scan.statuses()))
    _print_failures(scan, unplanned if known else set())
    return 0


def _print_failures(scan: StoreScan, unplanned: set[str], shown: int = 5) -> None:
    """Failed cells grouped by their error's first line, most common first: why they failed, without pandas. Those of
    cells `unplanned` (not in the plan) are marked: `run CONFIG --retry-failed` reruns the plan's cells only."""
    by_error: dict[str, list[StoredCell]] = defaultdict(list)
    for cell in scan.cells.values():
        if cell.status == "failed":
            by_error[cell.error or "(no error recorded)"].append(cell)
    if not by_error:
        return
    failed = [cell for cells in by_error.values() for cell in cells]
    outside = sum(cell.cell_id in unplanned for cell in failed)
    if not outside:
        rerun = "them with `steerscale run CONFIG --retry-failed`"
    elif outside == len(failed):
        rerun = "them with the config that planned them, `--retry-failed`: none is in the plan"
    else:
        rerun = "the plan's with `steerscale run CONFIG --retry-failed`; those marked (unplanned) only with the config that planned them"
    print(f"failed cells, by error (rerun {rerun}):")
    for error, cells in sorted(by_error.items(), key=lambda item: -len(item[1]))[:shown]:
        methods = ", ".join(sorted({f"{c.method} on {c.model}{' (unplanned)' if c.cell_id in unplanned else ''}" for c in cells}))
        print(f"  {len(cells)} × {methods}: {error}")
    if len(by_error) > shown:
        print(f"  … and {counted(len(by_error) - shown, 'other error')} (each row's `error` column has the whole message)")


# Fewest resamples a 95 % percentile interval is read from: below 40 its 2.5 % end is the smallest resample
# itself, or nothing (1 resample put D* outside its own "interval").
MIN_RESAMPLES = 40


def _resamples(text: str) -> int:
    value = _int_at_least(0)(text)
    if 0 < value < MIN_RESAMPLES:
        raise argparse.ArgumentTypeError(f"{value} resamples cannot give a 95 % interval; give 0 (no intervals) or at least {MIN_RESAMPLES}")
    return value


_resamples.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def _directory_name(text: str) -> str:
    """An argparse type: a non-empty local path (`--out "$OUT"` with OUT unset would write into the current
    directory; `--out s3://bucket/x`, read as a path, made a folder named `s3:` there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty directory name; give the folder to write to")
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text} is a URI; the report is written to a local folder (copy it up afterwards)")
    return text


_directory_name.__name__ = "directory"  # argparse names the type in "invalid directory value: ''"


def _x_axis(name: str) -> str:
    """`--x` checked when parsed (analysis imported only then, so `run` does not pay for it)."""
    from analysis.capability import get_axis

    try:
        return get_axis(name).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


RESULTS_DIR_HELP = "a sweep's results directory or URI (its results_dir), or the sweep YAML itself"


def _with_results(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", help=RESULTS_DIR_HELP)
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",
                   help="given a sweep YAML: the overrides it was run with, so that its grid is the one run")  # fmt: skip


def _with_fit_options(p: argparse.ArgumentParser) -> None:
    _with_results(p)
    p.add_argument("--bootstrap", type=_resamples, default=200, help=f"bootstrap resamples for confidence intervals (default 200; 0: none; else at least {MIN_RESAMPLES})")
    p.add_argument("--workers", type=_int_at_least(1), default=None, help="groups fitted at once, in worker processes (default: every core, up to 8)")
    p.add_argument(
        "--x", type=_x_axis, default="params", metavar="{params,neutral_loss,task_score}",
        help="what stands for model scale N: params (non-embedding parameters), neutral_loss (1 / the base model's "
        "NLL per byte on neutral text: higher is more capable) or task_score (1 / (1 - the base model's score on the task)); "
        "every axis is compared either way "
        "(another than params writes fits-<x>.* and report-<x>/, beside the default's)",
    )  # fmt: skip
    p.add_argument("--metric", choices=("score", "nll"), default="score",
                   help="what the laws describe: the task score (fitted as 1 - score) or the answers' NLL on the test set "
                   "(its fits and report are fits-nll.* and report-nll/, beside the score's; with --x, fits-nll-<x>.*)")  # fmt: skip
    p.add_argument("--planned-only", action="store_true",
                   help="fit only the rows of the plan's cells (given a sweep YAML, its grid; else the latest run's "
                   "plan.json), leaving out an earlier config's or another sweep's")  # fmt: skip


def cmd_fit(args: argparse.Namespace) -> int:
    return _fit_and_print(args, report=False)


def cmd_report(args: argparse.Namespace) -> int:
    return _fit_and_print(args, report=True)


def _fit_and_print(args: argparse.Namespace, *, report: bool) -> int:
    """Fit the stored rows (and for `report` write the report from that same analysis); print the table."""
    from analysis import NoResultsError, ReportLocationError, fit_results, write_report
    from analysis.parallel import default_workers

    analyse = functools.partial(write_report, out_dir=args.out) if report else fit_results
    results_dir = _results_dir(args.results_dir, args.overrides)
    if _is_sweep_yaml(args.results_dir) and "://" not in results_dir and not os.path.exists(results_dir):
        run = shlex.join(["steerscale", "run", args.results_dir, *args.overrides])
        print(f"error: nothing is stored at {results_dir} yet: `{run}` stores its sweep's rows there"
              f"{_relative_hint(args.results_dir, args.overrides)}", file=sys.stderr)  # fmt: skip
        return 2
    store = ResultsStore(results_dir)
    local = "://" not in results_dir
    if local:  # a folder this user may not read: said here, not as a traceback from inside the fit
        store.check_readable()
    # where to write, checked before the fit, not after minutes of it; only where there is a sweep (else the fit says so,
    # and an --out made first was left behind empty). Local stores only: a probe of a bucket would need more rights
    # (delete, create) than the fit's own writes do
    if store.holds_sweep():
        if local:
            store.check_writable()  # the fits are written beside the rows
        if report and args.out:
            try:
                os.makedirs(args.out, exist_ok=True)
            except OSError as err:
                print(f"error: --out {args.out}: cannot write there ({err})", file=sys.stderr)
                return 2
    try:
        summary = analyse(results_dir, metric=args.metric, bootstrap=args.bootstrap, x=args.x,
                          workers=args.workers or default_workers(), planned_only=args.planned_only,
                          plan=_plan_to_fit(args.results_dir, args.overrides))  # fmt: skip
    except (NoResultsError, ReportLocationError) as err:
        print(f"error: {err}{_relative_hint(args.results_dir, args.overrides) if isinstance(err, NoResultsError) else ''}", file=sys.stderr)
        return 2
    print(summary.to_text())
    frame = summary.analysis.loaded.frame
    if not len(frame) or not (frame["status"] == "ok").any():  # a script (CI) must not read "nothing to fit" as success
        old = [what for what, file in (("fit", "fits.json"), ("report", "report.html")) if file not in summary.paths and (report or what == "fit")]
        kept = f"; the earlier {' and '.join(old)} {'is' if len(old) == 1 else 'are'} kept as {'it was' if len(old) == 1 else 'they were'}" if old else ""
        print(f"error: {args.results_dir} holds no ok rows to fit ({_why_none_to_fit(summary.analysis.loaded)}){kept}", file=sys.stderr)
        return 1
    if report:
        print(f"report: {summary.report_page}")
    return 0


def _why_none_to_fit(loaded: LoadedResults) -> str:
    """What became of the rows found, where none was fit: failed, unreadable, left out (and by what)."""
    failed = int((loaded.frame["status"] != "ok").sum()) if len(loaded.frame) else 0
    unlisted = loaded.unplanned if loaded.planned_only else 0
    reasons = [counted(failed, "failed row") if failed else "",
               counted(len(loaded.skipped), "unreadable file") if loaded.skipped else "",
               f"{counted(unlisted, 'row')} of cells {loaded.plan_name} does not list, left out by --planned-only" if unlisted else "",
               f"{counted(loaded.superseded, 'row')} of an earlier config of a planned cell, left out" if loaded.superseded else "",
               f"{counted(loaded.stale_data, 'row')} scored on an older version of their task's data, left out" if loaded.stale_data else ""]  # fmt: skip
    return "; ".join(r for r in reasons if r) or "no rows stored"


def _build_rung(size: str, recipe: str) -> str:
    """One ladder rung, in a pool worker or, built alone, in the CLI (pretraining runs on one thread: rungs build side by side)."""
    import workers.models.ladder as ladder

    return str(ladder.ensure_built(size, recipe, progress=False))


def cmd_ladder_build(args: argparse.Namespace) -> int:
    import workers.models.ladder as ladder

    sizes = args.sizes or ladder.sizes(args.recipe)
    for size in sizes:  # every name checked before any build starts
        ladder.check_size(size, args.recipe)
    missing = [s for s in sizes if not (ladder.model_dir(s, args.recipe) / ladder.BUILD_INFO).exists()]
    for size in sorted(set(sizes) - set(missing), key=sizes.index):
        print(f"{size}: {ladder.model_dir(size, args.recipe)} (cached)")
    if not missing:
        return 0
    from concurrent.futures import as_completed

    from analysis.parallel import worker_pool  # its workers leave Ctrl-C to this process, which stops them

    workers = max(1, min(len(missing), args.jobs or os.cpu_count() or 1))
    # Largest rungs first, so the longest build starts at once and the small ones fill the other cores.
    order = sorted(missing, key=sizes.index, reverse=True)
    bar = tqdm(total=len(order), desc=f"ladder {args.recipe} ({workers} parallel builds)", unit="model")
    with worker_pool(workers) as pool, bar:
        if pool is None:  # one build at a time: here (pretraining runs on one thread either way)
            built = ((size, _build_rung(size, args.recipe)) for size in order)
        else:
            futures = {pool.submit(_build_rung, size, args.recipe): size for size in order}
            built = ((futures[future], future.result()) for future in as_completed(futures))
        for size, path in built:
            bar.write(f"{size}: {path}")
            bar.update()
    return 0


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (argparse reports anything else and exits 2; `--budget-flops inf` was
    a budget that never stops a run, which `--adaptive` requires one to)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not 0 < value < math.inf:  # NaN fails this too
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    # no abbreviated flags: `--max-cell 3` silently meaning --max-cells hides typos in scripts
    parser_class = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    parser = parser_class(prog="steerscale", description="Scaling-law sweeps: steering vs fine-tuning, on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="sweep YAML, e.g. configs/quickstart.yaml")
        # default=[]: without it argparse lists this optional positional as required when `config` is missing
        p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help="override a config value (YAML-parsed)")

    p = sub.add_parser("plan", help="show the grid and what is done, run nothing")
    with_config(p)
    p.add_argument("--cell", metavar="SLUG_OR_ID",
                   help="print that cell's resolved config as JSON instead (input of `python -m workers.run_cell`)")  # fmt: skip
    p.set_defaults(func=cmd_plan, subparser=p)

    p = sub.add_parser("run", help="run every cell that has no stored row yet")
    with_config(p)
    p.add_argument("--retry-failed", action="store_true", help="also rerun cells stored as failed (with --adaptive: first, then the rounds go on)")
    p.add_argument("--force", action="store_true", help="rerun every cell, replacing stored rows (a failed rerun keeps an ok row)")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' inside `ray job submit`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-dashboard", action="store_true", help="start the local Ray without its dashboard")
    a = p.add_argument_group("adaptive sweeps", "choose cells that narrow the crossover D*(N) most per FLOP (orchestrator/adaptive.py)")
    a.add_argument("--adaptive", action="store_true", help="run the grid adaptively; needs --budget-flops and/or --max-cells")
    a.add_argument("--budget-flops", type=_positive(float), metavar="X", help="stop at X post-training FLOPs over the sweep's stored cells")
    a.add_argument("--max-cells", type=_positive(int), metavar="K", help="stop at K stored cells (ok or failed)")
    a.add_argument("--target-width", type=_positive(float), metavar="W",
                   help="stop when every D* 95%% CI is narrower than W in log10 (default 0.3: a factor of 2), on the stored "
                        "cells and on fresh noise around their design")
    a.add_argument("--target-exponent-width", type=_positive(float), metavar="W", help="also require every curve's beta CI narrower than W")
    a.add_argument("--batch-size", type=_positive(int), metavar="B", help="cells chosen per acquisition round (default 8; the design rounds before it take what every curve needs)")
    p.set_defaults(func=cmd_run, subparser=p)

    p = sub.add_parser("status", help="done / failed / remaining per model and method, from the store alone")
    _with_results(p)
    p.set_defaults(func=cmd_status, subparser=p)

    p = sub.add_parser("fit", help="fit scaling laws to the stored rows; writes fits.parquet, crossovers.parquet and fits.json (fits-nll.*, crossovers-nll.parquet for --metric nll; -<x> for --x; "
                       "an earlier fit is kept when no row is ok)")
    _with_fit_options(p)
    p.set_defaults(func=cmd_fit, subparser=p)

    p = sub.add_parser("report", help="fit (writing what `fit` writes), then plots, report.md and a self-contained report.html")
    _with_fit_options(p)
    p.add_argument("--out", metavar="DIR", type=_directory_name,
                   help="local directory for the report (default: <results_dir>/report, or report-nll for --metric nll, report-<x> for --x; "
                   "needed for remote results)")  # fmt: skip
    p.set_defaults(func=cmd_report, subparser=p)

    p = sub.add_parser("ladder", help="the offline model ladder")
    ladder_sub = p.add_subparsers(dest="ladder_command", metavar="build", required=True, parser_class=parser_class)
    b = ladder_sub.add_parser("build", help="pretrain (or find cached) ladder models")
    b.add_argument("--recipe", default="default", help="the ladder to build (default: default; the tests' is test)")
    b.add_argument("--sizes", nargs="+", help="sizes to build (default: all of the recipe)")
    b.add_argument("--jobs", type=_int_at_least(1), help="parallel builds (default: one per CPU core)")
    b.set_defaults(func=cmd_ladder_build, subparser=b)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with `key=value` overrides also after flags (`run X.yaml --retry-failed seeds=[3]`):
    argparse ends a `nargs="*"` positional at the first flag, and its intermixed parsing refuses subcommands."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    wrong = [e for e in extra if not (takes_overrides and "=" in e and not e.startswith("-"))]
    if wrong:  # only those: `seeds=[3] --bogus` names --bogus alone; with the usage of the subcommand they were given to
        args.subparser.error(f"unrecognized arguments: {' '.join(wrong)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _version() -> str:
    """The installed package's version; a checkout run without installing (`PYTHONPATH=. python -m orchestrator.cli`) has none."""
    try:
        return version("steerscale")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ray = sys.modules.get("ray")
    ray_was_up = ray is not None and ray.is_initialized()  # a caller's Ray (a notebook's) is the caller's to stop
    ctrl_c = _CtrlC()
    # only in place of Python's own handlers: an ignored SIGINT (nohup) or a host's handler is left as it is
    main_thread = threading.current_thread() is threading.main_thread()
    ours = main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, ctrl_c) if ours else None
    previous_term = signal.signal(signal.SIGTERM, ctrl_c) if main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else None
    try:
        return args.func(args)
    except BrokenPipeError:  # `steerscale status DIR | head`: the reader has gone, so stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would complain flushing at exit
        return 0
    except (ConfigError, UnknownNameError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepStoppedError as err:  # an expected outcome on a real cluster, not a bug: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as stop:
        ctrl_c.held = True  # a second Ctrl-C or SIGTERM must not break off the message either
        stored = "some " + ROWS_LOST_NOTE if ROWS_LOST_NOTE in getattr(stop, "__notes__", ()) else "every finished row is stored"
        done = f"; {stored}: " + _how_to_resume(args) if args.command == "run" else ""
        terminated = ctrl_c.received == signal.SIGTERM
        print(f"\n{'terminated' if terminated else 'interrupted'}{done}", file=sys.stderr)
        return 143 if terminated else 130  # 128 + the signal, as a shell reports it
    finally:
        ctrl_c.held = True  # first, and not a call: see _CtrlC
        if not ray_was_up:
            _disconnect_ray()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _how_to_resume(args: argparse.Namespace) -> str:
    """What a rerun after Ctrl-C does: a forced run cannot resume (nothing marks which rows it replaced)."""
    if not args.force:
        return "rerun the same command to resume"
    return ("rerun without --force to keep what this run replaced and leave the cells it did not reach with their earlier "
            "rows, or with --force to rerun every cell again")  # fmt: skip


class _CtrlC:
    """The SIGINT and SIGTERM handler while a command runs: either raises KeyboardInterrupt, as Python's own
    handler does for Ctrl-C (SIGTERM's default ends the process on the spot), until `held` is set as the
    command ends; then it is dropped, so that it cannot break off the Ray shutdown that follows (a traceback,
    and Ray's agents left running, orphaned). `received` says which signal it was (SIGTERM: `timeout`, Slurm,
    Kubernetes stopping a run, exit status 143): not a subclass of KeyboardInterrupt, which Ray's `ray.wait`
    turns into a plain one when the handler runs inside it (a run stopped before its first row said
    "interrupted", 130).

    A flag, not a swap to SIG_IGN: Python runs a handler at its next check for signals (a call, a function's
    entry, a loop's jump back), so a Ctrl-C landing just before the swap was raised inside `signal.signal`
    or at the entry of the function making it (both seen in CI runs); an attribute store makes no check, and
    every check after it finds the flag set."""

    def __init__(self) -> None:
        self.held = False
        self.received: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if not self.held:
            self.received = signum
            raise KeyboardInterrupt


def _disconnect_ray() -> None:
    """Stop the private Ray a run started (or leave a joined cluster) here rather than in Ray's exit hook,
    where Ctrl-C is no longer held off (`_CtrlC`)."""
    ray = sys.modules.get("ray")  # imported only by commands that run cells
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
