"""Disjoint, deterministic splits for generated tasks.

An instance's split is a hash of its key (never the seed), or whatever `split_by` a task gives when
instances that look different must still land together (arith's `3 + 4` and `4 + 3`; every
gridworld decision point towards one goal), so train, validation and test can never share a
question whatever seeds are drawn. The test draw ignores the seed so every cell of a task is scored
on the same questions.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterable, Optional, Sequence, TypeVar

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
    if n and not pool:
        raise ValueError(f"{task}: no {split} instance to draw {n} from")
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


@dataclass(frozen=True)
class Stratum(Generic[K]):
    """One kind of instance a task mixes in a fixed share (arith's chains of one length)."""

    label: str
    share: float
    sample: Callable[[random.Random], K]
    pools: dict[Split, int]  # distinct keys of this kind in each split


def allocate(n: int, shares: Sequence[float]) -> list[int]:
    """`n` split among strata in proportion to `shares`, by largest remainder (ties to the first)."""
    exact = [n * share / sum(shares) for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stratified_pool_size(strata: Sequence[Stratum], split: Split) -> int:
    """The largest `n` at which a stratified draw of `n`, or of any fewer, repeats no key in any stratum."""
    shares = [s.share for s in strata]
    n = 0
    while all(count <= s.pools[split] for count, s in zip(allocate(n + 1, shares), strata)):
        n += 1
    return n


def draw_stratified(task: str, split: Split, n: int, seed: int, strata: Sequence[Stratum], split_by: SplitBy) -> list[K]:
    """`n` keys of `split` in the strata's fixed shares, each stratum's distinct, shuffled together.

    Drawing distinct keys from one mixed stream (`draw`) shifts the mix as `n` grows: the smallest
    stratum's keys run out first and the rest fill in, so a budget axis would also be a difficulty
    axis, and a test draw's difficulty would depend on its size. Fixed shares keep both the same.
    """
    counts = allocate(n, [s.share for s in strata])
    keys = [
        key
        for stratum, count in zip(strata, counts)
        for key in draw(f"{task}/{stratum.label}", split, count, seed, stratum.sample, stratum.pools[split], split_by)
    ]
    split_rng(task, split, n, seed).shuffle(keys)
    return keys
