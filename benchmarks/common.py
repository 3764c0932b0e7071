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
    """Wall and process-CPU seconds of the timed repeats (warm-up runs excluded).

    Wall time is what a user waits for and the headline. CPU time is recorded next to it because
    this machine is shared: at a load of 5-10 on 2 cores, a single-threaded run's wall time is
    mostly how long it waited for a core, while its CPU time is close to its wall time on an
    idle machine.
    """

    seconds: tuple[float, ...]
    cpu_seconds: tuple[float, ...] = ()

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    @property
    def spread(self) -> str:
        """min–max over the repeats, the honest spread on a machine shared with other jobs."""
        return f"{min(self.seconds):.3g}–{max(self.seconds):.3g} s (n={len(self.seconds)})"


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_call(fn: Callable[[], object], *, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    runs = [_timed(fn) for _ in range(repeats)]
    return Timing(tuple(w for w, _ in runs), tuple(c for _, c in runs))


def time_alternating(
    fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int
) -> dict[str, Timing]:
    """Time several callables interleaved, so load from other jobs hits them alike.

    The order flips every repeat (A B, B A, A B, ...): whichever runs second in a pair inherits
    the first's allocator and cache state, a bias of a few percent at these sizes that a fixed
    order would book against one side.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    names = list(fns)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            runs[name].append(_timed(fns[name]))
    return {name: Timing(tuple(w for w, _ in r), tuple(c for _, c in r)) for name, r in runs.items()}


def paired_ratios(slow: Timing, fast: Timing, *, cpu: bool = False) -> list[float]:
    """slow/fast repeat by repeat: adjacent runs share the machine's load."""
    a, b = (slow.cpu_seconds, fast.cpu_seconds) if cpu else (slow.seconds, fast.seconds)
    return [x / y for x, y in zip(a, b)]


def paired_ratio(slow: Timing, fast: Timing, *, cpu: bool = False) -> float:
    """Median over repeats of `paired_ratios`."""
    return statistics.median(paired_ratios(slow, fast, cpu=cpu))


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
    cpu = f"; CPU {t.cpu_median:.3g} s" if t.cpu_seconds else ""
    return f"{t.median:.3g} s [{t.spread}{cpu}]"


def fmt_paired(slow: Timing, fast: Timing) -> str:
    """`paired_ratio` of wall (with the pairs' range: a median near a goal says little without it) and of CPU time."""
    ratios = paired_ratios(slow, fast)
    return (f"{statistics.median(ratios):.2f}× (median paired, pairs {min(ratios):.2f}–{max(ratios):.2f}×, n={len(ratios)}; "
            f"CPU time {paired_ratio(slow, fast, cpu=True):.2f}×)")


def fmt_speedup(slow: Timing, fast: Timing) -> str:
    """How many times faster `fast` is: wall medians, and CPU medians where both sides have them."""
    text = f"{slow.median / fast.median:.2f}×"
    if slow.cpu_seconds and fast.cpu_seconds:
        text += f" (CPU time {slow.cpu_median / fast.cpu_median:.2f}×)"
    return text
