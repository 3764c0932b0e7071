"""What stands for model size N in a joint law: parameters, or the base model's measured capability.

Families differ (a 1B model of one family can beat a 3B of another), so a law in parameters cannot
pool them; a law in what the base model can already do might. Each axis maps a row to a positive
number that grows with capability, so the laws' `A/N^alpha` terms keep their shape:

- `params`: non-embedding parameters (Kaplan et al. 2020; Chinchilla).
- `neutral_loss`: 1 / ℓ, ℓ the base model's NLL per UTF-8 byte on neutral, pretraining-like text.
  Per byte rather than per token so that families with different tokenizers share one scale (the
  bits-per-byte of the Pile; Huang et al. 2024, "Compression represents intelligence linearly",
  find downstream scores linear in it across families).
- `task_score`: 1 / (1 − s), s the base model's score on the task: the reciprocal of its own task
  loss, in the units the fits already use (loss = 1 − score).

Why the reciprocal of a loss: `A/x^alpha` becomes `A·ℓ^alpha`, post-training loss as a power of a
base-model loss — a loss-to-loss law (Brandfonbrener et al. 2024) with the base loss's irreducible
part taken as 0, because the neutral text's entropy is not known. The exponent is then an
elasticity (1 % less base loss, alpha % less reducible post-training loss), free of the loss's
units (nats or bits). Base losses span far less than parameter counts (the default ladder's 35×
in parameters moves neutral loss by a few per cent), so capability exponents may run to
CAPABILITY_EXPONENT_MAX rather than 3.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import pandas as pd

from analysis.laws import ADDITIVE, MULTIPLICATIVE, Law
from analysis.metrics import to_loss

X_COLUMN = "x"  # the chosen axis' value per row, added to a frame before fitting
CAPABILITY_EXPONENT_MAX = 20.0


@dataclass(frozen=True)
class Axis:
    """One choice of N: the results column it comes from and how it becomes a capability."""

    name: str
    label: str  # for plots and tables
    column: str
    transform: Callable[[np.ndarray], np.ndarray]
    exponent_max: float
    held_out: str  # what leave-one-out drops: the model at the top of this axis
    within_family: bool = False  # True where values do not compare across families (parameters): laws on it are fitted per family

    def values(self, rows: pd.DataFrame) -> np.ndarray:
        """Per row: the capability, NaN where the column is missing or not positive."""
        if self.column not in rows:
            return np.full(len(rows), np.nan)
        raw = rows[self.column].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = self.transform(raw)
        return np.where(np.isfinite(x) & (x > 0), x, np.nan)

    @property
    def joint_laws(self) -> tuple[Law, Law]:
        """The additive and multiplicative laws with this axis' bound on alpha (beta keeps its own)."""
        return tuple(replace(law, exponent_bounds=((0.0, self.exponent_max), law.exponent_bounds[1])) for law in (ADDITIVE, MULTIPLICATIVE))


AXES: dict[str, Axis] = {
    axis.name: axis
    for axis in (
        Axis("params", "non-embedding parameters N", "params_nonembed", lambda n: n, ADDITIVE.exponent_bounds[0][1], "largest model",
             within_family=True),
        Axis("neutral_loss", "1 / base NLL per byte on neutral text", "base_neutral_nll_per_byte", lambda nll: 1.0 / nll,
             CAPABILITY_EXPONENT_MAX, "most capable model"),
        Axis("task_score", "1 / (1 − base task score)", "score_base", lambda s: 1.0 / to_loss(s, "score"),
             CAPABILITY_EXPONENT_MAX, "most capable model"),
    )
}  # fmt: skip


def get_axis(name: str) -> Axis:
    if name not in AXES:
        near = difflib.get_close_matches(name, AXES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown x {name!r}{hint}; choose one of {', '.join(AXES)}")
    return AXES[name]


def family_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's model family, "?" where unknown; rows written before the column existed are one family.

    A model has one family: that of its latest row, so rows stored before a family's naming changed
    (`qwen2` then `qwen2.5` for Qwen2.5) do not split one model's cells between two families.
    """
    if "family" not in rows:
        return pd.Series("?", index=rows.index, dtype=object)
    family = rows["family"].fillna("?").astype(str)
    if "model" not in rows or not len(rows):
        return family
    order = rows.sort_values("finished_at", na_position="first", kind="stable").index if "finished_at" in rows else rows.index
    latest = family.loc[order].groupby(rows.loc[order, "model"], sort=False).last()
    return rows["model"].map(latest).fillna(family)


def split_by_family(axis: Axis, rows: pd.DataFrame) -> bool:
    """Whether laws on `axis` are fitted per family here: the axis cannot pool families and the rows hold several.

    One family keeps the pooled fit (and its "*" label), so a one-family sweep reads as it always did.
    Only ok rows count (where there is a status): the laws and the trends, which see different
    frames, then agree on a family whose every cell failed.
    """
    ok = rows[rows["status"] == "ok"] if "status" in rows else rows
    return axis.within_family and family_of(ok).nunique() > 1


def capability_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, model): its family, its value on every axis and its base score as measured (`score_base`,
    which `task_score` is floored from: 1.0 and 0.9995 both read 0.999 back), each the median over its ok rows.

    A model has one capability per task (the task axis differs by task), so every cell of a
    (task, model) shares it even where eval settings made a row's own number differ slightly.
    """
    columns = ["task", "model", "family", *AXES, "score_base"]
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    if ok.empty:
        return pd.DataFrame(columns=columns)
    values = ok.assign(**{name: axis.values(ok) for name, axis in AXES.items()})
    values = values.assign(family=family_of(values), score_base=pd.to_numeric(values.get("score_base", np.nan), errors="coerce"))
    table = values.groupby(["task", "model"], sort=True).agg(
        family=("family", "first"), **{name: (name, "median") for name in [*AXES, "score_base"]}
    )
    return table.reset_index()[columns]


def with_x(frame: pd.DataFrame, axis: Axis) -> pd.DataFrame:
    """`frame` plus X_COLUMN: each row's (task, model) value on `axis`, NaN where unknown."""
    table = capability_table(frame)
    lookup = table.set_index(["task", "model"])[axis.name]
    keys = pd.MultiIndex.from_arrays([frame["task"], frame["model"]]) if len(frame) else pd.MultiIndex.from_arrays([[], []])
    return frame.assign(**{X_COLUMN: lookup.reindex(keys).to_numpy(float)})
