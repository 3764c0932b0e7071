"""What every comparison shares: timing with warm-up and repeats, and the shape of a result.

A comparison is only worth a ratio if both sides computed the same thing, so each result carries
its equality checks next to its timings; `python -m benchmarks` refuses to hide a failed check.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed repeats (warm-up runs excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> str:
        """min–max over the repeats, the honest spread on a machine shared with other jobs."""
        return f"{min(self.seconds):.3g}–{max(self.seconds):.3g} s (n={len(self.seconds)})"


def time_call(fn: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return Timing(tuple(seconds))


def time_alternating(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, Timing]:
    """Time several callables interleaved (A B A B ...), so load from other jobs hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - started)
    return {name: Timing(tuple(s)) for name, s in seconds.items()}


@dataclass(frozen=True)
class Check:
    """One equality check: what was compared, the measured value, and whether it is within tolerance."""

    what: str
    value: str
    ok: bool


@dataclass(frozen=True)
class Row:
    """One line of a comparison's table."""

    measure: str
    steerscale: str
    peer: str
    ratio: str  # "how many times better steerscale is" unless the measure says otherwise
    goal: str = ""


@dataclass
class Result:
    """One comparison: its settings, table, equality checks and notes (e.g. the profile of a miss)."""

    title: str
    settings: dict[str, object]
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def checks_ok(self) -> bool:
        return all(c.ok for c in self.checks)


def fmt_time(t: Timing) -> str:
    return f"{t.median:.3g} s [{t.spread}]"


def ratio(slow: float, fast: float) -> str:
    return f"{slow / fast:.2f}×" if fast > 0 else "n/a"
