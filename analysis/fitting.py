"""Fitting a law to points: Chinchilla approach 3, made fast with variable projection.

The objective is approach 3's: Σ huber_δ(log L̂(x) − log y) with δ = 1e-3, where
log L̂ = LSE_k(log c_k + log φ_k(x; exponents)), minimised by L-BFGS-B. The plain way runs
L-BFGS-B from every point of a grid of starts (4,500 for the additive law). Because L̂ is linear in
the coefficients once the exponents are fixed, we instead scan a grid of exponents only, solve the
coefficients at each grid point (nonnegative, Huber-reweighted Gauss-Newton in log space), refine
the few best together with a batched Levenberg-Marquardt, and finish the best with the same
L-BFGS-B. Same optimum, a few hundredths of the work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy.optimize import minimize

from analysis.laws import Law

HUBER_DELTA = 1e-3
# A least-squares term this much weaker than the Huber one: outside δ the Huber loss is |r|·δ, under which two seeds'
# values at a budget cost the same for any prediction between them, so with an even number of seeds a whole family of
# curves was optimal and the fit stopped on whichever the optimiser met (E from 0.048 to 0.115, D* from 5.6 to 8.4 on
# one 2-seed curve). This picks the one of them nearest the points in least squares; elsewhere it adds ε·r/δ to a
# point's pull (0.5 % at a 5 % residual, 5 % at a 50 % outlier). Weaker (1e-6), the optimisers stopped short of it: the
# flat directions' curvature was below what their damping and tolerances see.
TIE_BREAK = 1e-4
LOG_COEF_BOUNDS = (-30.0, 30.0)
MIN_DISTINCT = 3  # distinct values each input needs for its exponent to be identified
NEGLIGIBLE_SHARE = 1e-3  # a term under this share of the fitted loss at every point is ~0 on the data's scale
INPUT_NAMES = {"D": "budgets", "N": "model sizes"}


class FitError(ValueError):
    """The points cannot support this law (too few, too few distinct inputs)."""


# What a fit (and its bootstrap) of points that cannot support a law raises: a caller fitting many curves leaves that
# one unfitted and goes on
FIT_FAILURES = (FitError, np.linalg.LinAlgError, FloatingPointError, ValueError)


def huber(r: np.ndarray) -> np.ndarray:
    """Each residual's loss: Huber's (δ = `HUBER_DELTA`), with the `TIE_BREAK` least-squares term."""
    a = np.abs(r)
    m = np.minimum(a, HUBER_DELTA)
    return m * (a - 0.5 * m) + 0.5 * TIE_BREAK * r * r


def huber_psi(r: np.ndarray) -> np.ndarray:
    """ψ(r) = d huber / dr."""
    return np.clip(r, -HUBER_DELTA, HUBER_DELTA) + TIE_BREAK * r


def huber_curvature(r: np.ndarray) -> np.ndarray:
    """d² huber / dr²: 1 inside δ, the tie-break's ε outside."""
    return (np.abs(r) < HUBER_DELTA) + TIE_BREAK


def huber_weight(r: np.ndarray) -> np.ndarray:
    """ψ(r)/r: the IRLS weight whose weighted least squares majorises the Huber loss."""
    return np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(r), 1e-300)) + TIE_BREAK


@dataclass(frozen=True)
class LawData:
    """Points prepared for one law: inputs, target and the law's log-design tensor."""

    law: Law
    x: dict[str, np.ndarray]
    y: np.ndarray
    g: np.ndarray
    dropped_highest: int

    @property
    def logy(self) -> np.ndarray:
        return np.log(self.y)

    @property
    def n(self) -> int:
        return len(self.y)

    @classmethod
    def build(
        cls, law: Law, x: Mapping[str, np.ndarray], y: np.ndarray, *, drop_highest_loss: int = 0
    ) -> LawData:
        """Validate points; `drop_highest_loss` removes the k largest-y points first.

        Epoch's Chinchilla replication drops the 5 highest-loss points (tiny models trained on
        little data that the law does not describe); here that exclusion is explicit, never silent.
        """
        y = np.asarray(y, dtype=float)
        xs = {name: np.asarray(x[name], dtype=float) for name in law.inputs}
        if not (np.all(np.isfinite(y)) and np.all(y > 0)):
            raise ValueError("targets must be finite and positive (the fit is in log space)")
        for name, values in xs.items():
            if not (np.all(np.isfinite(values)) and np.all(values > 0)):
                raise ValueError(f"input {name} must be finite and positive")
        if drop_highest_loss:
            keep = np.sort(np.argsort(y)[: len(y) - drop_highest_loss])
            y = y[keep]
            xs = {name: values[keep] for name, values in xs.items()}
        short = [(need, what, got) for need, what, got in _requirements(law, xs) if got < need]
        if short:  # every shortfall at once: one more budget must not just reveal the next requirement
            needs = "; at least ".join(f"{need} distinct {what}, got {got}" for need, what, got in short)
            raise FitError(f"{law.name} has {len(law.params)} parameters; needs at least {needs}")
        g = law.design({name: np.log(values) for name, values in xs.items()})
        return cls(law=law, x=xs, y=y, g=g, dropped_highest=drop_highest_loss)


def min_inputs(law: Law) -> int:
    """Distinct input points a fit of `law` needs: k parameters through k distinct inputs fit them exactly
    whatever the seeds say (a curve through 3 budgets has an asymptote that is pure extrapolation)."""
    return len(law.params) + 1


def input_index(xs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each point's distinct input (0, 1, …): the seeds of one budget, or of one (N, D), share it."""
    return np.unique(np.stack(list(xs.values()), axis=1), axis=0, return_inverse=True)[1].ravel()


def _requirements(law: Law, xs: Mapping[str, np.ndarray]) -> list[tuple[int, str, int]]:
    """(needed, what, present) for each count a fit of `law` needs: `MIN_DISTINCT` values of each input for
    its exponent, and `min_inputs` distinct input points for its parameters; for a one-input law these
    are one count (its points are its values), stated once at the larger need."""
    points = len(np.unique(input_index(xs)))
    if len(law.inputs) == 1:
        return [(max(MIN_DISTINCT, min_inputs(law)), INPUT_NAMES[law.inputs[0]], points)]
    each = [(MIN_DISTINCT, f"values of {name}", len(np.unique(values))) for name, values in xs.items()]
    return each + [(min_inputs(law), f"({', '.join(law.inputs)}) points", points)]


@dataclass(frozen=True)
class Fit:
    """A fitted law. `theta` is the approach-3 vector: log coefficients, then exponents."""

    law: Law
    theta: np.ndarray
    objective: float
    n_points: int

    @property
    def params(self) -> dict[str, float]:
        return params_from_theta(self.law, self.theta)

    def predict(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.law.predict(self.params, x)


def params_from_theta(law: Law, theta: np.ndarray) -> dict[str, float]:
    k = len(law.coefs)
    values = np.concatenate([np.exp(theta[:k]), theta[k:]])
    return dict(zip(law.params, values.tolist()))


def negligible_terms(law: Law, params: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B, terms): True where a term stays under NEGLIGIBLE_SHARE of the law's value at every point of `x`,
    for B parameter sets (scalars are one set).

    Such a term's coefficient is ~0 where there are data (on flat data the fit drives it to its
    bound, e^-30), so the data say nothing about the term's exponents: any value fits as well.
    """
    g = law.design({name: np.log(np.asarray(x[name], dtype=float)) for name in law.inputs})
    g = np.unique(g.reshape(len(g), -1), axis=0).reshape(-1, *g.shape[1:])  # seeds share inputs
    exps = np.stack([np.atleast_1d(np.asarray(params[e], dtype=float)) for e in law.exponents], axis=-1)
    coefs = np.stack([np.atleast_1d(np.asarray(params[c], dtype=float)) for c in law.coefs], axis=-1)
    terms = coefs[:, None, :] * np.exp(np.einsum("nkm,bm->bnk", g, exps))
    return np.all(terms < NEGLIGIBLE_SHARE * terms.sum(axis=-1, keepdims=True), axis=1)


def unidentified(law: Law, negligible: np.ndarray) -> dict[str, np.ndarray]:
    """Per exponent, (B,): True where every term that carries it is negligible (`negligible_terms`)."""
    carriers = {e: [k for k, term in enumerate(law.terms) if e in (name for _, name in term.powers)] for e in law.exponents}
    return {e: negligible[:, ks].all(axis=1) for e, ks in carriers.items()}


def theta_bounds(law: Law) -> list[tuple[float, float]]:
    return [LOG_COEF_BOUNDS] * len(law.coefs) + list(law.exponent_bounds)


def log_predict(theta: np.ndarray, g: np.ndarray, n_coefs: int) -> tuple[np.ndarray, np.ndarray]:
    """log L̂ and the softmax weight of each term, for one theta (p,) or a batch (B, p).

    The softmax weights are ∂ log L̂ / ∂ log c_k; the exponents' derivatives follow from them and G.
    """
    z = theta[..., None, :n_coefs] + np.einsum("nkm,...m->...nk", g, theta[..., n_coefs:])
    zmax = z.max(axis=-1, keepdims=True)
    ez = np.exp(z - zmax)
    total = ez.sum(axis=-1, keepdims=True)
    return (zmax + np.log(total))[..., 0], ez / total


def jacobian(softmax: np.ndarray, g: np.ndarray) -> np.ndarray:
    """∂ log L̂ / ∂ theta: shape (..., n, p)."""
    return np.concatenate([softmax, np.einsum("...nk,nkm->...nm", softmax, g)], axis=-1)


def objective(theta: np.ndarray, data: LawData, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Approach-3 loss and its gradient (weights: bootstrap counts per point, default 1)."""
    w = np.ones(data.n) if weights is None else weights
    logp, soft = log_predict(theta, data.g, len(data.law.coefs))
    r = logp - data.logy
    return float(np.sum(w * huber(r))), (w * huber_psi(r)) @ jacobian(soft, data.g)


def _lbfgs(theta0: np.ndarray, data: LawData, weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    # The loss is ~1e-5 per point, so scipy's default tolerances would stop at the start.
    res = minimize(
        objective, theta0, args=(data, weights), jac=True, method="L-BFGS-B", bounds=theta_bounds(data.law),
        options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20},
    )
    return res.x, float(res.fun)


def start_grid(law: Law) -> np.ndarray:
    """Approach 3's grid of starts, in theta order (log coefficients, then exponents)."""
    grid = dict(law.start_grid)
    axes = [grid[c.lower()] for c in law.coefs] + [grid[e] for e in law.exponents]
    return np.array(list(itertools.product(*axes)), dtype=float)


def fit_plain(data: LawData, starts: np.ndarray | None = None) -> Fit:
    """Approach 3 as published: L-BFGS-B from every start, keep the best. The reference fit."""
    starts = start_grid(data.law) if starts is None else starts
    lo, hi = np.array(theta_bounds(data.law)).T
    best_theta, best_f = starts[0], np.inf
    for start in starts:
        theta, f = _lbfgs(np.clip(start, lo, hi), data)
        if f < best_f:
            best_theta, best_f = theta, f
    return Fit(data.law, best_theta, best_f, data.n)


def _nnls_batch(a: np.ndarray, t: np.ndarray, w: np.ndarray) -> np.ndarray:
    """min_{c ≥ 0} Σ_i w_i (a_i·c − t_i)² for a batch of tiny problems (a: (G, n, k)).

    With k ≤ 3 columns the exact answer is the best feasible unconstrained solution over the 2^k − 1
    supports, which vectorises where scipy's nnls would need a Python loop.
    """
    aw = a * w[..., None]
    ata = np.swapaxes(aw, 1, 2) @ a
    atb = np.einsum("gnk,gn->gk", aw, t)
    scale = np.sqrt(np.maximum(np.einsum("gkk->gk", ata), 1e-300))
    ata = ata / (scale[:, :, None] * scale[:, None, :])
    atb = atb / scale
    k = a.shape[-1]
    best_c = np.zeros(atb.shape)
    best_gain = np.zeros(len(a))  # objective = Σwt² − gain; the empty support gains 0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            sub = ata[:, idx][:, :, idx] + 1e-10 * np.eye(size)
            c = np.linalg.solve(sub, atb[:, idx][..., None])[..., 0]
            gain = np.einsum("gk,gk->g", c, atb[:, idx])
            better = np.all(c >= 0, axis=-1) & (gain > best_gain)
            best_gain = np.where(better, gain, best_gain)
            on_support = np.zeros_like(best_c)
            on_support[:, idx] = c
            best_c = np.where(better[:, None], on_support, best_c)  # whole rows: an earlier support's entries go
    return best_c / scale


def project_coefs(data: LawData, exps: np.ndarray, iterations: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Best nonnegative coefficients for each exponent vector in `exps` (G, m), and the loss there.

    Start from relative least squares (log L̂ − log y ≈ (L̂ − y)/y), then Gauss-Newton steps in log
    space with Huber IRLS weights; each step is again a small nonnegative least-squares problem.
    """
    phi = np.exp(np.einsum("nkm,gm->gnk", data.g, exps))
    logy = data.logy
    pred = np.broadcast_to(data.y, phi.shape[:2])
    r = np.zeros(phi.shape[:2])
    best_c = np.zeros((len(exps), phi.shape[-1]))
    best_f = np.full(len(exps), np.inf)
    for _ in range(iterations):
        c = _nnls_batch(phi / pred[..., None], 1.0 - r, huber_weight(r))
        pred = np.maximum(np.einsum("gnk,gk->gn", phi, c), 1e-12 * data.y)  # all-zero c: huge residual, no overflow
        r = np.log(pred) - logy
        f = huber(r).sum(axis=-1)
        better = f < best_f
        best_f = np.where(better, f, best_f)
        best_c[better] = c[better]
    return best_c, best_f


def exponent_grid(law: Law, cells: int = 30) -> np.ndarray:
    """Cell centres of a regular grid over the exponents' bounds (G, m), `cells` per exponent.

    A fixed count rather than a fixed step keeps the scan's cost the same for wider bounds (the
    capability axes'); it only supplies starts, which the refinement then polishes.
    """
    axes = [lo + (hi - lo) * (np.arange(cells) + 0.5) / cells for lo, hi in law.exponent_bounds]
    return np.array(list(itertools.product(*axes)), dtype=float)


@dataclass(frozen=True)
class _Inputs:
    """Cells grouped by distinct input: predictions and Jacobians are computed once per input.

    Cells share inputs (the seeds of one (N, D)), so `order` sorts the cells by input and
    `np.add.reduceat` at `starts` sums a per-cell quantity per input in one pass.
    """

    g: np.ndarray  # (U, k, m) the law's log-design at each distinct input
    index: np.ndarray  # (n,) the input of each cell, in sorted cell order
    order: np.ndarray  # (n,) cell permutation that groups equal inputs
    starts: np.ndarray  # (U,) first sorted cell of each input

    @classmethod
    def of(cls, data: LawData) -> _Inputs:
        unique, inverse = np.unique(data.g.reshape(data.n, -1), axis=0, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")
        index = inverse[order]
        starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
        return cls(unique.reshape(len(unique), *data.g.shape[1:]), index, order, starts)

    def per_input(self, x: np.ndarray) -> np.ndarray:
        """(b, n) per sorted cell -> (b, U) summed per input."""
        return np.add.reduceat(x, self.starts, axis=-1)


# Along a direction only `TIE_BREAK` curves (a fit with an even number of seeds a budget), the loss
# falls almost linearly until one more residual enters δ, where the optimum then sits; both
# Gauss-Newton models see the tie-break's curvature there and step a small fraction of the way, so
# such a resample needed 400-1,000 steps (it stopped short at the cap). Where a step gained at least half
# as much as the one before (linear progress; Newton's gains shrink much faster), the step is also
# tried 2, 4, ... times longer while longer is better: tens of steps get there. Only those resamples
# pay the extra loss evaluations (every step of every resample at every stretch: the bootstrap of
# comparison 5 took 1.6x as long).
STEP_STRETCHES = (2.0, 4.0, 8.0, 16.0, 32.0)
# ...and only near an optimum, where a step gains under this share of the loss: stretched, the long steps of a descent
# from afar ran terms down to their bounds (E·e⁻³⁰ in two steps, where the term's gradient vanishes) and stopped in
# those degenerate basins (helper-115: 157 of 1,280 far starts ended worse than without stretching; at this share 16,
# and 51 ended worse without it).
STRETCH_BELOW = 1e-6


def refine(
    data: LawData, thetas: np.ndarray, weights: np.ndarray | None = None, iterations: int = 400, logy: np.ndarray | None = None
) -> np.ndarray:
    """Minimise the (weighted) approach-3 loss from each row of `thetas` (B, p), all at once; against
    `logy` (B, n), each resample's own log targets, where given, else the data's.

    Levenberg-Marquardt with a per-resample damping that only accepts steps that lower that
    resample's Huber loss, so every resample ends no worse than its start. Each step solves two
    Gauss-Newton models and keeps the better candidate: the exact Huber one (curvature only from
    the points inside δ), which lands on the optimum in a few steps once the points inside δ pin
    down every parameter, and the IRLS majoriser (ψ(r)/r weights), which always has full rank and
    carries the resamples with too few points inside δ for that (it alone converges linearly:
    tens to hundreds of steps at δ = 1e-3, where the loss is nearly L1). Parameters on a bound
    that the gradient pushes outward are held there for the step. Iteration stops per resample
    once a step gains less than 1e-10 of its loss, or at the cap. Near an optimum, a step that gained at
    least half as much as the one before is also tried longer (`STEP_STRETCHES`).
    """
    lo, hi = np.array(theta_bounds(data.law)).T
    k = len(data.law.coefs)
    inputs = _Inputs.of(data)
    targets = (data.logy[None, :] if logy is None else np.asarray(logy, dtype=float))[:, inputs.order]
    weights = np.ones((len(thetas), data.n)) if weights is None else np.asarray(weights, dtype=float)[:, inputs.order]

    def of(rows: np.ndarray) -> np.ndarray:  # the targets of these resamples: one shared row, or each its own
        return targets if len(targets) == 1 else targets[rows]

    def residuals(theta: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logp, soft = log_predict(theta, inputs.g, k)
        return logp[:, inputs.index] - ly, soft

    def losses_at(theta: np.ndarray, w: np.ndarray, ly: np.ndarray) -> np.ndarray:
        return np.einsum("bn,bn->b", w, huber(residuals(theta, ly)[0]))

    thetas = np.array(thetas, dtype=float)
    losses = losses_at(thetas, weights, targets)
    damping = np.full(len(weights), 1e-3)
    last_gain = np.full(len(weights), np.inf)  # each resample's previous step's gain
    active = np.arange(len(weights))  # resamples still improving
    eye = np.eye(thetas.shape[1])
    for _ in range(iterations):
        if len(active) == 0:
            break
        theta, w, ly = thetas[active], weights[active], of(active)
        r, soft = residuals(theta, ly)
        jac = jacobian(soft, inputs.g)  # (b, U, p)
        grad = np.einsum("bup,bu->bp", jac, inputs.per_input(w * huber_psi(r)))
        lam = damping[active][:, None, None]
        # A parameter on a bound that descent would push out of the box stays put (projected
        # Newton): solving for it and clipping afterwards spoils the other parameters' step, and
        # a resample whose optimum sits on a bound then crawls until the iteration cap.
        free = ~(((theta <= lo) & (grad > 0)) | ((theta >= hi) & (grad < 0)))
        pinned = eye * ~free[:, :, None]
        grad = grad * free
        best_theta, best_loss = theta.copy(), np.full(len(active), np.inf)

        def keep_lower(rows: np.ndarray, candidate: np.ndarray) -> np.ndarray:
            """Take `candidate` (for `rows` of the active resamples) where its loss is below the best so far; which did."""
            candidate = np.clip(candidate, lo, hi)
            candidate_loss = losses_at(candidate, w[rows], of(active[rows]))
            take = candidate_loss < best_loss[rows]
            best_theta[rows[take]] = candidate[take]
            best_loss[rows[take]] = candidate_loss[take]
            return take

        every = np.arange(len(active))
        for h in (w * huber_curvature(r), w * huber_weight(r)):  # exact Huber curvature, then the IRLS majoriser
            jtj = np.swapaxes(jac * inputs.per_input(h)[..., None], 1, 2) @ jac
            jtj = jtj * (free[:, :, None] & free[:, None, :]) + pinned
            diag = np.einsum("bpp->bp", jtj)[:, :, None] * eye
            keep_lower(every, theta + _solve(jtj + lam * (diag + 1e-12 * eye), -grad[..., None])[..., 0])
        step_gain = losses[active] - best_loss
        crawling = np.flatnonzero((step_gain > 0) & (step_gain >= 0.5 * last_gain[active]) & (step_gain <= STRETCH_BELOW * losses[active]))
        last_gain[active] = np.where(step_gain > 0, step_gain, last_gain[active])  # a rejected step is not a "step before"
        base, step = theta[crawling], best_theta[crawling] - theta[crawling]
        for stretch in STEP_STRETCHES:
            if not len(crawling):  # an empty keep_lower still costs a loss evaluation's numpy calls: a third of refine's time
                break
            take = keep_lower(crawling, base + stretch * step)
            crawling, base, step = crawling[take], base[take], step[take]  # longer only while longer is better
        better = best_loss < losses[active]
        gain = np.where(better, losses[active] - best_loss, 0.0)
        thetas[active[better]] = best_theta[better]
        losses[active[better]] = best_loss[better]
        damping[active] = np.where(better, damping[active] * 0.3, damping[active] * 10)
        stalled = damping[active] >= 1e6
        converged = better & (gain <= 1e-10 * losses[active])
        active = active[~(stalled | converged)]
    return thetas


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched solve that survives singular systems (flat curves make whole Jacobian columns zero)."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(a) @ b


def scan(data: LawData, *, cells: int = 30, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Approach 3's search for starts by variable projection: for each cell of the exponent grid, the
    best nonnegative coefficients there. Returns the starts (G, p) in theta order and their losses (G,)."""
    exps = exponent_grid(data.law, cells)
    coefs, losses = [], []
    for lo in range(0, len(exps), chunk):
        c, f = project_coefs(data, exps[lo : lo + chunk])
        coefs.append(c)
        losses.append(f)
    log_lo, log_hi = LOG_COEF_BOUNDS
    log_coefs = np.clip(np.log(np.maximum(np.concatenate(coefs), 1e-300)), log_lo, log_hi)
    return np.concatenate([log_coefs, exps], axis=1), np.concatenate(losses)


def point_losses(data: LawData, thetas: np.ndarray, logy: np.ndarray | None = None) -> np.ndarray:
    """Each point's Huber loss under each of `thetas` (B, p): (B, n), against `logy` (B, n) where given.
    A weight vector's loss is then one product."""
    return huber(log_predict(thetas, data.g, len(data.law.coefs))[0] - (data.logy if logy is None else logy))


def polish_starts(loss: np.ndarray, exponents: int, cells: int, lowest: int) -> np.ndarray:
    """Indices of the scan cells to polish: the `lowest` cells, and the lowest cell on each face of
    the exponent box (one exponent at its least or greatest cell).

    The lowest cells alone are mostly neighbours in one basin. An optimum with an exponent at its
    bound (a term that keeps falling faster than the grid reaches) can sit in another basin whose
    scan cells look worse before polishing: one additive law's fit stopped at an 8 % higher loss.
    """
    grid = np.arange(loss.size).reshape((cells,) * exponents)
    faces = [np.take(grid, end, axis=axis).ravel() for axis in range(exponents) for end in (0, cells - 1)]
    edge_best = [face[np.argmin(loss[face])] for face in faces]
    return np.array(list(dict.fromkeys([*np.argsort(loss, kind="stable")[:lowest].tolist(), *map(int, edge_best)])))


def fit_law(data: LawData, *, cells: int = 30, polish: int = 4) -> Fit:
    """Variable-projection fit: scan exponents, project coefficients, polish the best (and the best at
    each exponent bound) by L-BFGS-B."""
    starts, loss = scan(data, cells=cells)
    refined = refine(data, starts[polish_starts(loss, len(data.law.exponents), cells, polish)])
    losses = [objective(theta, data)[0] for theta in refined]
    # Finish with approach 3's own optimiser; from here it needs only a few iterations.
    theta, f = _lbfgs(refined[int(np.argmin(losses))], data)
    return Fit(data.law, theta, f, data.n)
