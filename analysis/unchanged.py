"""Cells whose method left the model as it was: it chose, or was set, to do nothing.

Every method may choose to do nothing on the shared validation set (a steering scale of 0, no
training step kept, no demonstrations, λ = 0), and then its cell scores exactly the base model's
numbers: the test NLL equals `nll_base` to the bit, as the zero adapter adds exact zeros. A curve
of such cells is the base model's, so "steering stays ahead of LoRA" there means "doing nothing
beats this LoRA", which a reader of the crossover table alone would not guess.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from analysis.methods import components

MOSTLY = 0.5  # a method that did nothing in at least half of its cells on a model is named


@dataclass(frozen=True)
class Unchanged:
    task: str
    method: str
    by_model: tuple[tuple[str, int, int], ...]  # (model, cells that left it unchanged, ok cells), where that is MOSTLY or more

    def where(self) -> str:
        """'3 of 4 cells on s, 4 of 4 cells on m': the models it left as they were, and in how many of its cells."""
        return ", ".join(f"{n} of {total} cells on {model}" for model, n, total in self.by_model)


def idle_pairs(ok: pd.DataFrame) -> Callable[[str, str, str, str], bool]:
    """Whether two methods (task, model, a, b) both left the model as it was in at least MOSTLY of the (budget,
    seed) cells both measured: an outcome between them then mostly compares the base model with itself (a firm
    "tied" of two methods that both declined to act read as a finding about steering and fine-tuning). Counted
    on matched cells: two methods each idle in half their own cells, but at other budgets, are no such pair."""
    rows = _positive_budget_rows(ok)
    idle = {} if rows is None else {
        key: dict(zip(zip(cells["budget"].astype(float), cells["seed"]), cells["_same"]))
        for key, cells in rows.groupby(["task", "model", "method"], sort=False)
    }  # fmt: skip

    def both(task: str, model: str, a: str, b: str) -> bool:
        left, right = idle.get((task, model, a), {}), idle.get((task, model, b), {})
        shared = left.keys() & right.keys()
        return bool(shared) and sum(left[k] and right[k] for k in shared) >= MOSTLY * len(shared)

    return both


def unchanged_counts(ok: pd.DataFrame) -> dict[tuple[str, str, str, float], tuple[int, int]]:
    """(task, model, method, budget) → (cells that left the model as it was, ok cells), at positive budgets: a table of
    means (gain 0, KL 0, off-task 0) otherwise reads do-nothing cells as a perfectly selective method."""
    rows = _positive_budget_rows(ok)
    if rows is None:
        return {}
    counts = rows.groupby(["task", "model", "method", rows["budget"].astype(float)], sort=False)["_same"].agg(["sum", "size"])
    return {(str(t), str(m), str(meth), float(b)): (int(c["sum"]), int(c["size"])) for (t, m, meth, b), c in counts.iterrows()}


def _positive_budget_rows(ok: pd.DataFrame) -> pd.DataFrame | None:
    """The ok rows of methods that may change the model (budget > 0, not `base`), each with `_same`: its test NLL
    is the base model's to the bit; None without the columns to tell."""
    needed = {"task", "method", "model", "budget", "seed", "nll", "nll_base"}
    if ok.empty or not needed <= set(ok.columns):
        return None
    rows = ok[(ok["method"] != "base") & (ok["budget"].astype(float) > 0)]
    nll, base = rows["nll"].astype(float).to_numpy(), rows["nll_base"].astype(float).to_numpy()
    return rows.assign(_same=np.isfinite(nll) & (nll == base))[np.isfinite(nll) & np.isfinite(base)]


def unchanged_cells(ok: pd.DataFrame) -> list[Unchanged]:
    """Per (task, method), the models on which the method left the model unchanged in at least MOSTLY of its
    ok cells at a positive budget (the `base` method, which never changes it, aside)."""
    rows = _positive_budget_rows(ok)
    if rows is None:
        return []
    found = []
    for (task, method), cells in rows.groupby(["task", "method"], sort=True):
        counts = cells.groupby("model", sort=True)["_same"].agg(["sum", "size"])
        mostly = tuple((str(m), int(c["sum"]), int(c["size"])) for m, c in counts.iterrows() if c["sum"] >= MOSTLY * c["size"] and c["sum"] > 0)
        if mostly:
            found.append(Unchanged(str(task), str(method), mostly))
    return found


def unchanged_share(ok: pd.DataFrame) -> str:
    """One sentence: per method, how many of its ok cells at a positive budget left the model as it was, over every task
    and model ('' where none did). The per-(task, method) sentences name only models where it is half or more, and a
    reader of those alone missed that steer_mean, full_ft and task_vector did nothing in over half of all their cells."""
    rows = _positive_budget_rows(ok)
    if rows is None or not rows["_same"].any():
        return ""
    counts = rows.groupby("method", sort=True)["_same"].agg(["sum", "size"])
    counts = counts[counts["sum"] > 0].sort_values("sum", ascending=False, kind="stable")
    listed = ", ".join(f"{method} {int(c['sum'])} of {int(c['size'])}" for method, c in counts.iterrows())
    return (f"Cells that left the model as it was (test NLL the base model's to the bit: the method chose, or was set, to do "
            f"nothing), per method over every task, model and positive budget: {listed}.")


@dataclass(frozen=True)
class AlikePair:
    a: str
    b: str
    alike: int  # cells both measured in which they scored alike to the bit
    cells: int  # cells both measured
    idle: int  # of the alike cells, those where both left the model as it was


def alike_method_pairs(ok: pd.DataFrame) -> list[AlikePair]:
    """The pairs of methods that scored alike to the bit (test score and NLL, on the same task, model, positive budget
    and seed) in at least MOSTLY of the cells both measured, and changed the model alike in one of them at least (alike
    only where both left it as it was is what `idle_pairs` marks). Their rows against a third method repeat each other:
    task_vector's λ chosen at 0 or 1 made it full_ft's copy in most quickstart cells, and its crossovers with steering
    counted as findings of their own (helper-165). A composition and its parts are left to the composition gains, which
    count those copies."""
    rows = _positive_budget_rows(ok)
    if rows is None or "score" not in rows:
        return []
    keys = ["task", "model", "budget", "seed"]
    cells = {method: _one_row_per_cell(g[[*keys, "score", "nll", "_same"]], keys, ["score", "nll"]) for method, g in rows.groupby("method", sort=True)}
    found = []
    for a, b in itertools.combinations(cells, 2):
        if a in components(b) or b in components(a):  # a composition and its own part: the composition gains count those
            continue
        both = cells[a].merge(cells[b], on=keys, suffixes=("_a", "_b"))
        alike = (both["score_a"].to_numpy(float) == both["score_b"].to_numpy(float)) & (both["nll_a"].to_numpy(float) == both["nll_b"].to_numpy(float))
        idle = int((alike & both["_same_a"].to_numpy(bool) & both["_same_b"].to_numpy(bool)).sum())
        if alike.sum() > idle and alike.sum() >= MOSTLY * len(both):  # alike only where both did nothing: the ‡ pairs say so
            found.append(AlikePair(a, b, int(alike.sum()), len(both), idle))
    return found


def alike_pairs(pairs: list[AlikePair]) -> str:
    """One sentence naming `alike_method_pairs`, '' where there are none."""
    if not pairs:
        return ""
    listed = "; ".join(f"{p.a} and {p.b} in {p.alike} of the {p.cells} cells both measured ({p.idle} of them where both left the "
                       "model as it was)" for p in pairs)  # fmt: skip
    return (f"Methods that scored alike to the bit (test score and NLL, same task, model, budget and seed) in at least half the "
            f"cells both measured: {listed}. Their rows against a third method largely repeat each other: count such "
            "outcomes once.")


def one_of_alike(pairs: list[AlikePair]) -> Callable[[str], str]:
    """Each method's stand-in among the methods it scored alike with (`alike_method_pairs`, joined through shared
    members): the first by name, so that outcomes repeated through a copy are counted once."""
    stand_in: dict[str, str] = {}

    def find(method: str) -> str:
        while stand_in.get(method, method) != method:
            method = stand_in[method]
        return method

    for pair in pairs:
        first, second = sorted((find(pair.a), find(pair.b)))
        stand_in[second] = first
    return find


def _one_row_per_cell(rows: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """`rows` with one row per `keys`: repeats of one result kept once, and keys whose rows disagree (two configs of one
    method stored side by side, with no plan to tell the current one) left out, so that a pairing of two methods
    counts each cell once: merged as they were, two rows a side made one cell "4 of 4 alike"."""
    unique = rows.drop_duplicates([*keys, *values])
    return unique[~unique.duplicated(keys, keep=False)]
