"""Task registry: name -> task instance, plus the neutral text the selectivity metrics read.

Synthetic tasks (facts, arith, gridworld) are generated offline and also write the ladder's
pretraining documents; real-dataset adapters (sst2, gsm8k, function_calling) read Hugging Face
datasets, or local files shaped like them.
"""

from __future__ import annotations

import random

from workers.registry import Registry
from workers.tasks.arith import Arith
from workers.tasks.base import Task
from workers.tasks.facts import Facts
from workers.tasks.function_calling import FunctionCalling
from workers.tasks.gridworld import Gridworld
from workers.tasks.gsm8k import GSM8K
from workers.tasks.hub import HubSource, dataset, rows_digest
from workers.tasks.sst2 import SST2
from workers.world import text

TASKS: Registry[Task] = Registry("task")
TASKS.register("facts", Facts())
TASKS.register("arith", Arith())
TASKS.register("gridworld", Gridworld())
TASKS.register("sst2", SST2())
TASKS.register("gsm8k", GSM8K())
TASKS.register("function_calling", FunctionCalling())


def get_task(name: str) -> Task:
    return TASKS.get(name)


def data_version(name: str) -> int:
    """The task's data version (see `Task.data_version`); 1 for a name not registered, whose cell
    still needs an id to be stored as failed under."""
    return TASKS.get(name).data_version if name in TASKS else 1


def reads_hub_data(task: Task) -> bool:
    """Whether the task's texts are real data (a hub dataset or files shaped like one), not the synthetic
    world's: the ladder's tokenizer knows the world's words only."""
    return isinstance(getattr(task, "source", None), HubSource)


def hub_data_digest(name: str) -> str | None:
    """A digest of the rows a hub task reads (`hub.rows_digest`), for a row's `versions`; None for the
    synthetic world's tasks, whose examples their code and `data_version` pin."""
    task = TASKS.get(name)
    if not reads_hub_data(task):
        return None
    return rows_digest(getattr(task, "source"), getattr(task, "plan").hub_splits())


def fetch_hub_data(name: str) -> None:
    """Download (or find cached) each hub split the task reads, without reading its rows into memory: the driver's
    check before any cell. Nothing for the synthetic world's tasks."""
    task = TASKS.get(name)
    if reads_hub_data(task):
        for split in getattr(task, "plan").hub_splits():
            dataset(getattr(task, "source"), split)


def neutral_texts(n: int, min_words: int) -> list[str]:
    """General-text documents from the pretraining grammar, on a stream pretraining never draws."""
    return text.documents(n, random.Random("steerscale-neutral-text"), min_words)
