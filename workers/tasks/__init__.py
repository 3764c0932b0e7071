"""Task registry: name -> task instance, plus the neutral text the selectivity metrics read.

Synthetic tasks (facts, arith, gridworld) are generated offline and also write the ladder's
pretraining documents; real-dataset adapters (sst2, gsm8k, function_calling) read Hugging Face
datasets, or local files shaped like them.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import TYPE_CHECKING

from workers.registry import Registry
from workers.tasks.arith import Arith
from workers.tasks.base import Task, registration_problems
from workers.tasks.facts import Facts
from workers.tasks.function_calling import FunctionCalling
from workers.tasks.gridworld import Gridworld
from workers.tasks.gsm8k import GSM8K
from workers.tasks.hub import HubSource, MissingColumnsError, dataset, load_rows, rows_digest
from workers.tasks.sst2 import SST2
from workers.world import text

if TYPE_CHECKING:  # the cell's config imports this registry
    from workers.cell import NeutralTextSource

TASKS: Registry[Task] = Registry("task", registration_problems)
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


# errors reading a hub task's data whose messages name the file (and what is wrong with it) in full
NAMED_DATA_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, MissingColumnsError)


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
    check before any cell, with the columns the task reads. Nothing for the synthetic world's tasks."""
    task = TASKS.get(name)
    if reads_hub_data(task):
        plan, source = getattr(task, "plan"), getattr(task, "source")
        for split in plan.hub_splits():
            plan.check_columns(source, split, dataset(source, split).column_names)


def neutral_texts(n: int, min_words: int, source: NeutralTextSource | None = None) -> list[str]:
    """`n` neutral texts of `min_words` words: from `source`, the first `min_words` words of `n` of its rows that
    long (headings and blank rows are shorter), evenly spaced over the split so that they span its documents
    (its first rows would be one article's); without one, general-text documents of the pretraining grammar,
    on a stream pretraining never draws, of at least `min_words` words."""
    if source is None:
        return text.documents(n, random.Random("steerscale-neutral-text"), min_words)
    if n == 0:
        return []
    named = f"eval.neutral_source {source.dataset} ({source.split})"
    try:
        rows = load_rows(_hub_source(source), source.split)
    except Exception as err:  # noqa: BLE001 - hub, network and file errors alike: re-raised naming the setting
        raise ValueError(f"{named} cannot be read here: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    lacking = next((row for row in rows if source.field not in row), None)
    if lacking is not None:
        raise ValueError(f"{named}: its rows have no field {source.field!r} (one has {sorted(lacking)}); set eval.neutral_source.field")
    clean = WIKITEXT_DETOKENIZER if source.detokenizer == "wikitext" else ()
    long_enough = [cut for row in rows if (cut := _first_words(_undone(str(row[source.field]), clean), min_words))]
    if len(long_enough) < n:
        raise ValueError(f"{named} has {len(long_enough)} rows of {min_words} words or more, not the {n} of eval.neutral_size")
    return [long_enough[i * len(long_enough) // n] for i in range(n)]


def _first_words(text: str, words: int) -> str | None:
    """`text` up to the end of its `words`-th word; None where it has fewer."""
    ends = [match.end() for match in re.finditer(r"\S+", text)]
    return text[: ends[words - 1]].strip() if len(ends) >= words else None


# wikitext's tokenisation undone, in order: the rules of lm-evaluation-harness's `wikitext_detokenizer`
# (its perplexity task reads the raw files so), as (pattern, replacement) regular expressions
WIKITEXT_DETOKENIZER: tuple[tuple[str, str], ...] = (
    (r"s '", "s'"), (r" @([-,.])@ ", r"\1"), (r" ([:;.!?,]) ", r"\1 "),
    (r"\(\s*([^)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"), (r"{\s*([^}]*?)\s*}", r"{\1}"),
    (r'"\s*([^"]*?)\s*"', r'"\1"'), (r"'\s*([^']*?)\s*'", r"'\1'"),
    (r"= = = =", "===="), (r"= = =", "==="), (r"= =", "=="), (" \u00b0 ", "\u00b0"), (r" \n", "\n"), (r"\n ", "\n"),
    (r" N ", " 1 "), (r" 's", "'s"),
)  # fmt: skip


def _undone(text: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


def neutral_text_digest(texts: list[str]) -> str:
    """A digest of the neutral texts a cell measured on, for its row's `versions` where they are natural text:
    what they were cut from can move (a hub dataset's `main`), and rows measured on other texts do not compare."""
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def _hub_source(source: NeutralTextSource) -> HubSource:
    return HubSource(source.dataset, source.config)
