"""Expanding a sweep spec into its cells: a pure, deterministic function of the spec."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

from pydantic import BaseModel

from workers.cell import LADDER_PREFIX, CellConfig, ModelSpec
from workers.config import ConfigError
from workers.methods import get_method, resolve_config, training_configs, validation_choice
from workers.run_cell import model_revision
from workers.tasks import NAMED_DATA_ERRORS, get_task, reads_hub_data

from orchestrator.errors import first_line
from orchestrator.spec import ModelEntry, SweepSpec


@dataclass(frozen=True)
class PlannedCell:
    """A cell and what scheduling needs to know about it (not part of its identity)."""

    config: CellConfig
    gpus: float

    @functools.cached_property  # once per planned cell: the driver reads it on every claim, store and lookup
    def cell_id(self) -> str:
        return self.config.cell_id


def resolved_model(entry: ModelEntry) -> ModelSpec:
    """The model as the cell sees it: scheduling fields dropped, ladder recipe hash pinned."""
    spec = ModelSpec.model_validate(entry.model_dump(exclude={"gpus_per_cell"}))
    if spec.id.startswith(LADDER_PREFIX) and spec.revision is None:
        spec = spec.model_copy(update={"revision": model_revision(spec)})
    return spec


def pool_size(task: str, split: str) -> int | None:
    """The task's pool of distinct `split` examples; a local copy of a hub dataset that cannot be read (a split's file
    missing, a line not JSON, a column it lacks) is the config's problem, said in a line, not a traceback out of `plan`
    (helper-174). Any other task's error is a bug, and raised as one."""
    found = get_task(task)
    try:
        return found.pool_size(split)  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - file, JSON and datasets' own errors alike, for a local copy: the data's problem
        source = getattr(found, "source", None)
        if not (reads_hub_data(found) and os.path.isdir(source.path)):  # type: ignore[union-attr]
            raise
        if isinstance(err, KeyError):
            raise ConfigError(f"task {task}: its data cannot be read: a row of {source.path} has no column {err}") from err  # type: ignore[union-attr]
        said = data_error_line(err)
        if err.__cause__ is not None:  # datasets' "An error occurred while generating the dataset" wraps what it met
            said += f" ({first_line(err.__cause__)})"
        raise ConfigError(f"task {task}: its data cannot be read: {said}") from err


def data_error_line(err: BaseException) -> str:
    """An error reading a task's data in a line, as `plan` and `run` say it: a missing file's or column's message names
    the file already (its type name left off), any other keeps its type."""
    return str(err).splitlines()[0] if isinstance(err, NAMED_DATA_ERRORS) else first_line(err)


def check_budgets(spec: SweepSpec) -> None:
    """Refuse budgets above a task's pool of distinct training examples.

    Such a cell would train on repeated examples while its row claims the larger budget, so the
    data axis of every fit would be wrong. Tasks whose pool is unknown until their data is
    downloaded (hub datasets) are not checked here.
    """
    keys = {method: f"method_budgets.{method}" if method in spec.method_budgets else "budgets" for method in spec.methods}
    problems = []
    for task in spec.tasks:
        pool = pool_size(task, "train")
        if pool is None:
            continue
        for key in dict.fromkeys(keys.values()):  # the key each too-large budget was written under
            over = sorted({b for method in spec.methods if keys[method] == key for b in spec.budgets_for(method) if b > pool})
            if over:
                asked = f"a budget of {over[0]}" if len(over) == 1 else f"budgets of {', '.join(map(str, over))}"
                problems.append(f"{key}: task '{task}' has only {pool} distinct training examples, but the sweep asks for {asked}; "
                                "a larger budget would repeat examples while its rows claim the full budget: lower it to at most the pool")  # fmt: skip
    if problems:
        raise ConfigError("\n".join(problems))


def check_eval_sizes(spec: SweepSpec) -> None:
    """Refuse a test, validation or off-task draw larger than its task's split.

    Past the pool the draw repeats questions, so a score would weigh some of them twice while the
    row claims `test_size` distinct ones (and no validation could choose better for it).
    """
    e = spec.eval
    draws = [("test_size", "test", e.test_size, spec.tasks), ("validation_size", "validation", e.validation_size, spec.tasks)]
    if e.offtask_size and len(spec.tasks) > 1:  # off-task scores read the other tasks' test splits
        draws.append(("offtask_size", "test", e.offtask_size, spec.tasks))
    problems = []
    for key, split, size, tasks in draws:
        for task in tasks:
            pool = pool_size(task, split)
            if pool is not None and size > pool:
                problems.append(
                    f"eval.{key}: {size} exceeds the {pool} distinct {split} examples of task '{task}'; "
                    f"a larger draw would repeat questions; set it to at most {pool}"
                )
    if problems:
        raise ConfigError("\n".join(problems))


def check_training_covers_budgets(spec: SweepSpec, methods: dict[str, BaseModel]) -> None:
    """Refuse a budget the training would not show in full: past `max_steps × batch_size` examples,
    the rest of the budget is never seen while the row claims all of it, and the data axis bends."""
    problems = []
    for name, config in methods.items():
        for path, train in training_configs(config, f"methods.{name}"):
            largest = max(spec.budgets_for(name))
            if largest > train.max_steps * train.batch_size:
                problems.append(
                    f"{path}: a budget of {largest} needs {math.ceil(largest / train.batch_size)} steps of {train.batch_size} "
                    f"to show every example once, but max_steps is {train.max_steps}; raise max_steps (or batch_size), "
                    "or lower the budget"
                )  # fmt: skip
    if problems:
        raise ConfigError("\n".join(problems))


def check_validation_choices(spec: SweepSpec, methods: dict[str, BaseModel]) -> None:
    """Refuse a method that must choose on the validation set when the sweep gives none: each of its
    cells would fail at its fit, and `--retry-failed` fail again."""
    if spec.eval.validation_size:
        return
    needs = [(name, choice) for name, config in methods.items() if (choice := validation_choice(get_method(name), config))]
    if needs:
        raise ConfigError("\n".join(
            f"methods.{name}: {choice} on the shared validation set, but eval.validation_size is 0; "
            "give a validation set (eval.validation_size > 0) or a single candidate" for name, choice in needs
        ))  # fmt: skip


def expand(spec: SweepSpec) -> list[PlannedCell]:
    """Every (model, task, method, budget, seed) cell, in a stable order, with resolved configs."""
    check_budgets(spec)
    check_eval_sizes(spec)
    resolved = {name: resolve_config(name, raw, f"methods.{name}") for name, raw in spec.methods.items()}
    check_training_covers_budgets(spec, resolved)
    check_validation_choices(spec, resolved)
    methods = {name: config.model_dump(mode="json") for name, config in resolved.items()}
    cells = []
    for entry in spec.models:
        model = resolved_model(entry)
        for task in spec.tasks:
            for method, method_config in methods.items():
                for budget in spec.budgets_for(method):
                    for seed in spec.seeds:
                        config = CellConfig(
                            sweep=spec.sweep,
                            model=model,
                            task=task,
                            method=method,
                            method_config=method_config,
                            budget=budget,
                            seed=seed,
                            eval=spec.eval,
                            offtask=tuple(sorted(t for t in spec.tasks if t != task)) if spec.eval.offtask_size else (),  # a set: order-free ids
                        )
                        cells.append(PlannedCell(config=config, gpus=entry.gpus_per_cell))
    check_unique(cells)
    return cells


def check_unique(cells: list[PlannedCell]) -> None:
    """Refuse a grid that holds one cell twice, e.g. two model entries differing only in where they run."""
    first: dict[str, PlannedCell] = {}
    twice = sorted({cell.config.model.id for cell in cells if first.setdefault(cell.cell_id, cell) is not cell})
    if twice:
        raise ConfigError(
            f"models: {', '.join(twice)} listed twice with settings that differ only in where the cells run "
            "(device, gpus_per_cell) or in values the cell would resolve to anyway (a ladder's revision): "
            "each of its cells would be planned twice; list each model once"
        )
