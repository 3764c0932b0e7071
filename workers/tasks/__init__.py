"""Task registry: name -> task instance, plus the neutral text the selectivity metrics read.

Synthetic tasks (facts, arith, gridworld) are generated offline and also write the ladder's
pretraining documents; real-dataset adapters (sst2, gsm8k, function_calling) read Hugging Face
datasets, or local files shaped like them.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING

from workers.registry import Registry
from workers.tasks.arith import Arith
from workers.tasks.base import Task
from workers.tasks.facts import Facts
from workers.tasks.function_calling import FunctionCalling
from workers.tasks.gridworld import Gridworld
from workers.tasks.gsm8k import GSM8K
from workers.tasks.hub import HubSource, dataset, load_rows, rows_digest
from workers.tasks.sst2 import SST2
from workers.world import text

if TYPE_CHECKING:  # the cell's config imports this registry
    from workers.cell import NeutralTextSource

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


def neutral_texts(n: int, min_words: int, source: NeutralTextSource | None = None) -> list[str]:
    """`n` neutral texts of `min_words` words: from `source`, the first `min_words` words of each of its
    first `n` rows that long (headings and blank rows are shorter); without one, general-text documents
    of the pretraining grammar, on a stream pretraining never draws, of at least `min_words` words."""
    if source is None:
        return text.documents(n, random.Random("steerscale-neutral-text"), min_words)
    texts: list[str] = []
    for row in load_rows(_hub_source(source), source.split):
        if len(texts) == n:
            break
        if source.field not in row:
            raise ValueError(f"neutral text source {source.dataset}: its rows have no field {source.field!r} "
                             f"(they have {sorted(row)}); set eval.neutral_source.field")  # fmt: skip
        words = [match.end() for match in re.finditer(r"\S+", str(row[source.field]))]
        if len(words) >= min_words:
            texts.append(str(row[source.field])[: words[min_words - 1]].strip())
    if len(texts) < n:
        raise ValueError(f"neutral text source {source.dataset} ({source.split}) has {len(texts)} rows of "
                         f"{min_words} words or more, not the {n} of eval.neutral_size")  # fmt: skip
    return texts


def neutral_text_digest(source: NeutralTextSource | None) -> str | None:
    """A digest of the rows neutral texts come from (`hub.rows_digest`), for a row's `versions`; None for the
    offline world's, which its code pins."""
    return None if source is None else rows_digest(_hub_source(source), (source.split,))


def fetch_neutral_text(source: NeutralTextSource) -> None:
    """Download (or find cached) the split neutral texts come from: the driver's check before any cell."""
    dataset(_hub_source(source), source.split)


def _hub_source(source: NeutralTextSource) -> HubSource:
    return HubSource(source.dataset, source.config)
