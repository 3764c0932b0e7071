"""Declared scaling-law forms.

Every law here is a sum of nonnegative coefficients times products of inputs raised to negative
exponents, `L = E + Σ_k c_k · Π_j x_j^-θ_j`. Declaring laws in that one shape is what lets the
fitter treat the coefficients as a linear sub-problem (variable projection) and search only the
exponents, and lets one Jacobian routine serve every law.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Term:
    """One additive term: coefficient `coef` times Π input^-exponent over `powers`."""

    coef: str
    powers: tuple[tuple[str, str], ...] = ()  # (input name, exponent name); () is the constant E


@dataclass(frozen=True)
class Law:
    """A law form with its parameter names, exponent bounds and approach-3 start grid.

    `start_grid` is in the fitting parameterisation of Chinchilla approach 3: natural logs of the
    coefficients (keyed by the lower-cased coefficient name, `e`, `a`, `b`) and the exponents.
    """

    name: str
    formula: str
    inputs: tuple[str, ...]
    terms: tuple[Term, ...]
    exponent_bounds: tuple[tuple[float, float], ...]
    start_grid: tuple[tuple[str, tuple[float, ...]], ...]

    @property
    def coefs(self) -> tuple[str, ...]:
        return tuple(t.coef for t in self.terms)

    @property
    def exponents(self) -> tuple[str, ...]:
        seen: list[str] = []
        for term in self.terms:
            for _, exponent in term.powers:
                if exponent not in seen:
                    seen.append(exponent)
        return tuple(seen)

    @property
    def params(self) -> tuple[str, ...]:
        return self.coefs + self.exponents

    def design(self, logx: Mapping[str, np.ndarray]) -> np.ndarray:
        """G with log φ_k(x) = G[i, k, :] @ exponents: shape (n, terms, exponents).

        The log-basis is linear in the exponents, so G is computed once per data set.
        """
        n = len(next(iter(logx.values())))
        g = np.zeros((n, len(self.terms), len(self.exponents)))
        for k, term in enumerate(self.terms):
            for name, exponent in term.powers:
                g[:, k, self.exponents.index(exponent)] -= logx[name]
        return g

    def predict(self, params: Mapping[str, float], x: Mapping[str, np.ndarray]) -> np.ndarray:
        """The law's value at inputs `x` (natural parameters: coefficients, not their logs)."""
        logx = {name: np.log(np.asarray(x[name], dtype=float)) for name in self.inputs}
        g = self.design(logx)
        exps = np.array([params[e] for e in self.exponents])
        coefs = np.array([params[c] for c in self.coefs])
        return np.exp(g @ exps) @ coefs


_EXP = (0.0, 0.5, 1.0, 1.5, 2.0)
_LOG_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
_LOG_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
_EXP_BOUNDS = (0.0, 3.0)

ADDITIVE = Law(
    name="additive",
    formula="L = E + A/N^alpha + B/D^beta",
    inputs=("N", "D"),
    terms=(Term("E"), Term("A", (("N", "alpha"),)), Term("B", (("D", "beta"),))),
    exponent_bounds=(_EXP_BOUNDS, _EXP_BOUNDS),
    start_grid=(("e", _LOG_E), ("a", _LOG_AB), ("b", _LOG_AB), ("alpha", _EXP), ("beta", _EXP)),
)

MULTIPLICATIVE = Law(
    name="multiplicative",
    formula="L = E + A * N^-alpha * D^-beta",
    inputs=("N", "D"),
    terms=(Term("E"), Term("A", (("N", "alpha"), ("D", "beta")))),
    exponent_bounds=(_EXP_BOUNDS, _EXP_BOUNDS),
    start_grid=(("e", _LOG_E), ("a", _LOG_AB), ("alpha", _EXP), ("beta", _EXP)),
)

POWER_D = Law(
    name="power_D",
    formula="L = E + B/D^beta",
    inputs=("D",),
    terms=(Term("E"), Term("B", (("D", "beta"),))),
    exponent_bounds=(_EXP_BOUNDS,),
    start_grid=(("e", _LOG_E), ("b", _LOG_AB), ("beta", _EXP)),
)

POWER_N = Law(
    name="power_N",
    formula="L = E + A/N^alpha",
    inputs=("N",),
    terms=(Term("E"), Term("A", (("N", "alpha"),))),
    exponent_bounds=(_EXP_BOUNDS,),
    start_grid=(("e", _LOG_E), ("a", _LOG_AB), ("alpha", _EXP)),
)

LAWS: dict[str, Law] = {law.name: law for law in (ADDITIVE, MULTIPLICATIVE, POWER_D, POWER_N)}
