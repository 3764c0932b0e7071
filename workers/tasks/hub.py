"""Shared plumbing of the real-dataset adapters: load rows, carve disjoint splits, draw examples.

A source is a Hugging Face hub id (loaded with `datasets.load_dataset`) or a local directory of
`<split>.jsonl` files shaped like the hub dataset, which is how tests run offline. Hub datasets
rarely ship the three splits a cell needs, so validation (and test, where the hub has none or its
labels are hidden) is carved from a hub split by a hash of each row's text: disjoint, and the same
whatever seed a cell draws with.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from workers.tasks.base import Split
from workers.tasks.splits import split_of, split_rng

if TYPE_CHECKING:
    import datasets


class MissingColumnsError(ValueError):
    """A dataset's rows lack a column its task reads (`SplitPlan.check_columns`); the message names the file and both."""


@dataclass(frozen=True)
class HubSource:
    path: str  # hub id, or a local directory of <split>.jsonl files shaped like it
    config: str | None = None


def dataset(source: HubSource, split: str) -> datasets.Dataset:
    """The split as a (memory-mapped) `datasets.Dataset`, downloaded or found in the cache; the driver calls it to
    check, before any cell, that a hub dataset can be had, without reading its rows into memory."""
    import datasets  # imported on use: the synthetic world never needs it

    local = Path(source.path)
    if local.is_dir():
        file = local / f"{split}.jsonl"
        if not file.is_file():  # datasets' own error is a traceback from deep inside its builder
            found = ", ".join(sorted(p.name for p in local.glob("*.jsonl"))) or "no .jsonl file"
            raise FileNotFoundError(f"{local} holds no {file.name} (found: {found}); a local copy of a hub dataset holds one "
                                    "<split>.jsonl per split the task reads, in the hub's columns (tests/fixtures/ shows them)")  # fmt: skip
        datasets.disable_progress_bars()  # "Generating train split" bars between the CLI's own lines, for a local file
        return datasets.load_dataset("json", data_files=str(file), split="train")
    return datasets.load_dataset(source.path, source.config, split=split)


@functools.lru_cache(maxsize=16)
def load_rows(source: HubSource, split: str) -> tuple[dict, ...]:
    return tuple(dataset(source, split))


KEPT_BEFORE: dict[Split, tuple[Split, ...]] = {"train": ("validation", "test"), "validation": ("test",), "test": ()}  # who keeps a text two share


@dataclass(frozen=True)
class SplitPlan:
    """Which hub split feeds each of ours; rows of a shared hub split are divided by hash.

    Rows are told apart by their `key` text stripped, as the prompts strip it: a split holds one row
    per text (a repeated row would count twice towards a budget), rows of a shared hub split are
    carved by it, and each of ours keeps none of the texts of the other hub splits that `KEPT_BEFORE` says win
    over it (train none of validation's nor test's, validation none of test's). So no prompt is in two
    of our splits.
    """

    train: str
    validation: str
    test: str
    columns: tuple[str, ...] = ()  # every column the task reads from a row: a file lacking one is refused in a line

    def check_columns(self, source: HubSource, split: str, present: Sequence[str]) -> None:
        """Refuse a hub split whose rows lack a column the task reads: a local copy with `sentiment` for `label`
        passed the driver's check (it loads the files, not their columns) and failed every cell with a bare
        `KeyError: 'label'` (helper-174)."""
        missing = [column for column in self.columns if column not in present]
        if missing:
            where = f"{Path(source.path) / f'{split}.jsonl'}" if Path(source.path).is_dir() else f"{source.path} (split {split})"
            raise MissingColumnsError(f"{where} has no column {', '.join(map(repr, missing))} (its columns: {', '.join(present) or 'none'}); "
                             f"the task reads {', '.join(self.columns)}")  # fmt: skip

    def pool_size(self, task: str, source: HubSource, split: Split, key: str) -> int | None:
        """Rows of our `split` when the source is local; None for a hub id (counting would download it)."""
        return len(self.rows(task, source, split, key)) if Path(source.path).is_dir() else None

    @functools.lru_cache(maxsize=32)  # per worker: a cell asks for its splits' sizes and rows more than once
    def rows(self, task: str, source: HubSource, split: Split, key: str) -> tuple[dict, ...]:
        hub = getattr(self, split)
        sharing = [s for s in ("train", "validation", "test") if getattr(self, s) == hub]
        first: dict[str, dict] = {}
        for row in self._checked_rows(source, hub):
            first.setdefault(_text(row, key), row)
        rows = list(first.values())
        if len(sharing) > 1:
            rows = [row for row in rows if _carve(task, _text(row, key), sharing) == split]
        # another of ours drawn from a hub split of its own keeps its texts: test all of them, validation all but
        # test's; train gives up both's (a hub's validation sharing texts with its train left them in both of ours)
        kept_by_others = {getattr(self, other) for other in KEPT_BEFORE[split]} - {hub}
        taken = {_text(row, key) for other_hub in kept_by_others for row in self._checked_rows(source, other_hub)}
        return tuple(row for row in rows if _text(row, key) not in taken)

    def _checked_rows(self, source: HubSource, split: str) -> tuple[dict, ...]:
        rows = load_rows(source, split)
        self.check_columns(source, split, list(rows[0]) if rows else list(self.columns))  # JSON lines: one row's keys are all
        return rows

    def hub_splits(self) -> tuple[str, ...]:
        """The hub splits our three are drawn from, each once, in a fixed order."""
        return tuple(dict.fromkeys((self.train, self.validation, self.test)))


@functools.lru_cache(maxsize=16)
def rows_digest(source: HubSource, splits: tuple[str, ...]) -> str:
    """SHA-256 over the rows of `splits`: what pins the data a hub task's cells read. A hub id loads its
    `main`, which can move between a sweep's cells (models have their commit recorded; datasets get this)."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(split.encode())
        for row in load_rows(source, split):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _text(row: dict, key: str) -> str:
    return str(row[key]).strip()


def _carve(task: str, text: str, sharing: list[str]) -> str:
    """The split a row of a shared hub split belongs to: validation and test take a fifth each and train the rest, or
    test the rest where train is a hub split of its own (sst2: validation and test carved from the hub's validation)."""
    ours = split_of(task, text)
    return ours if ours in sharing else ("train" if "train" in sharing else "test")


def sample(rows: Sequence[dict], task: str, split: Split, n: int, seed: int) -> list[dict]:
    """`n` rows (all of them when the split is smaller), drawn for this budget alone as the synthetic tasks draw
    (`splits.split_rng`): cells at two budgets are independent draws, as the bootstrap over cells takes them. One
    stream for every n nested the draws only while `random.sample` kept one algorithm (sst2's 4,096 in 8,192 not).
    The test draw ignores the seed."""
    return split_rng(task, split, n, seed).sample(rows, min(n, len(rows)))
