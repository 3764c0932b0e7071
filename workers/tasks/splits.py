"""Disjoint, deterministic splits for generated tasks.

An instance's split is a hash of its key (the question, not the seed), so train, validation and
test can never share a prompt whatever seeds are drawn. The test draw ignores the seed so every
cell of a task is scored on the same questions.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable, TypeVar

from workers.tasks.base import Split

K = TypeVar("K", bound=Hashable)

# Cumulative upper bounds of each split on [0, 1): 60 % train, 20 % validation, 20 % test.
_BOUNDS: tuple[tuple[float, Split], ...] = ((0.6, "train"), (0.8, "validation"), (1.0, "test"))


def split_of(task: str, key: Hashable) -> Split:
    digest = hashlib.sha256(f"{task}/{key!r}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return next(split for bound, split in _BOUNDS if u < bound)


def split_rng(task: str, split: Split, n: int, seed: int) -> random.Random:
    """The generator a split's draw uses: the test split's stream does not depend on the seed."""
    return random.Random(f"{task}/{split}/{n}/{seed if split != 'test' else 0}")


def draw(task: str, split: Split, n: int, seed: int, sample: Callable[[random.Random], K]) -> list[K]:
    """`n` instance keys of `split`, distinct while the split has unseen keys left, then repeating."""
    rng = split_rng(task, split, n, seed)
    keys: list[K] = []
    seen: set[K] = set()
    misses, exhausted = 0, False
    while len(keys) < n:
        key = sample(rng)
        if split_of(task, key) != split:
            continue
        if key in seen and not exhausted:
            misses += 1
            exhausted = misses > 1000  # a run this long: the split has no unseen keys left
            continue
        keys.append(key)
        seen.add(key)
        misses = 0
    return keys
