"""Disjoint, deterministic splits for generated tasks.

An instance's split is a hash of its key (never the seed), or whatever `split_by` a task gives when
instances that look different must still land together (arith's `3 + 4` and `4 + 3`; every
gridworld decision point towards one goal), so train, validation and test can never share a
question whatever seeds are drawn. The test draw ignores the seed so every cell of a task is scored
on the same questions.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Hashable, Iterable, Optional, TypeVar

from workers.tasks.base import Split

K = TypeVar("K", bound=Hashable)

# Cumulative upper bounds of each split on [0, 1): 60 % train, 20 % validation, 20 % test.
_BOUNDS: tuple[tuple[float, Split], ...] = ((0.6, "train"), (0.8, "validation"), (1.0, "test"))


def split_of(task: str, key: Hashable) -> Split:
    digest = hashlib.sha256(f"{task}/{key!r}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return next(split for bound, split in _BOUNDS if u < bound)


SplitBy = Callable[[K], Split]


def pool_size(task: str, split: Split, keys: Iterable[K], split_by: Optional[SplitBy] = None) -> int:
    """How many distinct instances of a task's whole key space fall in `split`."""
    split_by = split_by or (lambda key: split_of(task, key))
    return sum(1 for key in set(keys) if split_by(key) == split)


def split_rng(task: str, split: Split, n: int, seed: int) -> random.Random:
    """The generator a split's draw uses: the test split's stream does not depend on the seed."""
    return random.Random(f"{task}/{split}/{n}/{seed if split != 'test' else 0}")


def draw(
    task: str,
    split: Split,
    n: int,
    seed: int,
    sample: Callable[[random.Random], K],
    pool: int,
    split_by: Optional[SplitBy] = None,
) -> list[K]:
    """`n` instance keys of `split`, all distinct until the split's `pool` of keys is used up.

    Only then do keys repeat: planning refuses training budgets and evaluation draws larger than
    their split, so only a library caller gets repeats. `sample` must reach every key of the pool.
    """
    split_by = split_by or (lambda key: split_of(task, key))
    rng = split_rng(task, split, n, seed)
    keys: list[K] = []
    seen: set[K] = set()
    while len(keys) < n:
        key = sample(rng)
        if split_by(key) != split or (key in seen and len(seen) < pool):
            continue
        keys.append(key)
        seen.add(key)
    return keys
