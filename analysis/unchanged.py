"""Cells whose method left the model as it was: it chose, or was set, to do nothing.

Every method may choose to do nothing on the shared validation set (a steering scale of 0, no
training step kept, no demonstrations, λ = 0), and then its cell scores exactly the base model's
numbers: the test NLL equals `nll_base` to the bit, as the zero adapter adds exact zeros. A curve
of such cells is the base model's, so "steering stays ahead of LoRA" there means "doing nothing
beats this LoRA", which a reader of the crossover table alone would not guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MOSTLY = 0.5  # a method that did nothing in at least half of its cells on a model is named


@dataclass(frozen=True)
class Unchanged:
    task: str
    method: str
    by_model: tuple[tuple[str, int, int], ...]  # (model, cells that left it unchanged, ok cells), where that is MOSTLY or more

    def describe(self) -> str:
        where = ", ".join(f"{n} of {total} cells on {model}" for model, n, total in self.by_model)
        return (f"On {self.task}, {self.method} left the model as it was (its test NLL is the base model's to the bit: it chose, "
                f"or was set, to do nothing) in {where}: there its curve is the base model's, and a lead it holds is the other "
                "method's shortfall against doing nothing.")  # fmt: skip


def both_unchanged(unchanged: list[Unchanged], task: str, model: str, methods: tuple[str, ...]) -> bool:
    """Whether every one of `methods` left the model as it was in MOSTLY of its cells on `model`: an outcome
    between them then mostly compares the base model with itself (a firm "tied" of two methods that both
    declined to act read as a finding about steering and fine-tuning)."""
    mostly = {(u.task, u.method, model_name) for u in unchanged for model_name, _, _ in u.by_model}
    return all((task, method, model) in mostly for method in methods)


def unchanged_cells(ok: pd.DataFrame) -> list[Unchanged]:
    """Per (task, method), the models on which the method left the model unchanged in at least MOSTLY of its
    ok cells at a positive budget (the `base` method, which never changes it, aside)."""
    needed = {"task", "method", "model", "budget", "nll", "nll_base"}
    if ok.empty or not needed <= set(ok.columns):
        return []
    rows = ok[(ok["method"] != "base") & (ok["budget"].astype(float) > 0)]
    nll, base = rows["nll"].astype(float).to_numpy(), rows["nll_base"].astype(float).to_numpy()
    rows = rows.assign(_same=np.isfinite(nll) & (nll == base))[np.isfinite(nll) & np.isfinite(base)]
    found = []
    for (task, method), cells in rows.groupby(["task", "method"], sort=True):
        counts = cells.groupby("model", sort=True)["_same"].agg(["sum", "size"])
        mostly = tuple((str(m), int(c["sum"]), int(c["size"])) for m, c in counts.iterrows() if c["sum"] >= MOSTLY * c["size"] and c["sum"] > 0)
        if mostly:
            found.append(Unchanged(str(task), str(method), mostly))
    return found
