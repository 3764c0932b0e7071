"""Adaptive sweeps: run the cells that narrow the answer most per FLOP, stop when it is narrow enough.

A dense grid spends most of its compute on cells that barely move the crossover D*(N). The loop
here runs a sweep's grid as a pool of candidates instead:

    read the stored rows -> fit every budget curve (with bootstrap) -> stop, or choose a batch
    (`orchestrator.acquisition`) -> log every choice and its reason -> run the batch -> repeat

It stops when every target interval is narrower than its goal — on the stored cells' resamples and on
fresh noise around the same design (`acquisition.fresh_noise_twins`), checked again on more resamples
before it believes so — at the compute budget (post-
training FLOPs, `orchestrator.cellcost`), at the cell budget, or when the grid is used up.

Running a batch is the caller's `execute(cells)`: production passes one that calls
`orchestrator.driver.run_cells` on Ray, tests one that answers cells from a known law. The loop
keeps no state of its own beyond the store: every round starts from the rows found there, and
`adaptive.jsonl` beside them (written through the store's `pyarrow` filesystem, so local paths
and URIs alike) records each choice with its reason, each round's target intervals and why the
loop stopped. Rerunning the same command resumes from what is stored — a cell with a row is never
a candidate again, so no cell runs twice.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.bootstrap import CI_LEVEL
from analysis.decisions import LOG_NAME, parse_events
from analysis.io import ReadCache, jsonable, load_results

from orchestrator.acquisition import (
    Choice, CurveFit, CurveKey, Target, acquisition_choices, check_grid, curve_key, curve_pairs, curves_of, design_choices, fit_curve,
    PooledNoise, fresh_noise_twins, given_up, label, on_fresh_noise, pooled_noise, targets_from, unidentified_exponents,
)  # fmt: skip
from orchestrator.cellcost import CostModel, Planned
from orchestrator.claims import Claims
from orchestrator.errors import StoreUnreadableError
from orchestrator.store import ResultsStore

Executor = Callable[[list[Planned], float], None]  # runs cells chosen from the store as read at the time given; stores their rows
CLAIM_POLL_SECONDS = 10.0  # how often a run whose chosen cells another driver holds looks again (`_waited_for_claims`)


@dataclass(frozen=True)
class Settings:
    budget_flops: float | None = None  # post-training FLOPs of all stored cells of the sweep
    max_cells: int | None = None  # stored cells (ok or failed) of the sweep
    target_width: float | None = 0.3  # 95% CI width of log10 D* (0.3: known within a factor of 2)
    target_exponent_width: float | None = None  # 95% CI width of every curve's beta; None: not a target
    batch_size: int = 8
    bootstrap: int = 1000  # resamples per curve and round: the stop rule compares 2.5/97.5 percentiles
    confirm_bootstrap: int = 4000  # resamples that must agree before the loop stops (see run_adaptive)
    seed: int = 0


@dataclass
class Outcome:
    stop_reason: str
    rounds: int
    cells_stored: int
    flops_spent: float
    targets: list[Target] = field(default_factory=list)


class DecisionLog:
    """`<results>/adaptive.jsonl`: one JSON object per event, rewritten whole through a temp file and a move.

    Object stores cannot append, so each write rewrites the (small) log; the move publishes it whole.
    The read and the rewrite happen under a lock file beside it: two drivers on one results directory
    (claims split the cells between them) would otherwise each rewrite the log without the other's events.
    """

    LOCK_TTL_SECONDS = 60.0  # a rewrite takes well under a second: a lock this old was left by a driver that died

    def __init__(self, store: ResultsStore) -> None:
        self.filesystem, self.path = store.filesystem, f"{store.root}/{LOG_NAME}"
        self.directory = store.root
        self.claims = Claims(store, ttl_seconds=self.LOCK_TTL_SECONDS)

    def read(self) -> list[dict]:
        try:
            with self.filesystem.open_input_stream(self.path) as stream:
                text = stream.read().decode()
        except FileNotFoundError:
            return []
        return parse_events(text)

    def append(self, records: Sequence[dict]) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        lines = [json.dumps(jsonable({"time": now, **r}), allow_nan=False) for r in records]
        self.filesystem.create_dir(self.directory, recursive=True)
        with self.claims.exclusive(f"{self.path}.lock"):
            existing = self.read()
            text = "".join(json.dumps(r) + "\n" for r in existing) + "".join(line + "\n" for line in lines)
            temp = f"{self.directory}/.tmp-{uuid.uuid4().hex}-{LOG_NAME}"
            with self.filesystem.open_output_stream(temp) as stream:
                stream.write(text.encode())
            self.filesystem.move(temp, self.path)


def stored_rows(store: ResultsStore, cells: Sequence[Planned], reread: ReadCache | None = None) -> pd.DataFrame:
    """The rows of this grid's cells (a results directory may hold others).

    The run set unreadable files aside before its first round and writes atomically, so a grid cell's
    file that cannot be read now is a read that failed (a remote store's hiccup): the run stops rather
    than choose that cell again and run it over its row.
    """
    ids = {c.cell_id for c in cells}
    loaded = load_results(store.uri, reread)  # the files read in earlier rounds, unchanged since, are not read again
    unread = [s for s in loaded.skipped if s.path.rsplit("/", 1)[-1].removesuffix(".parquet") in ids]
    if unread:
        others = f" and {len(unread) - 1} other rows" if len(unread) > 1 else ""
        raise StoreUnreadableError(f"could not read the stored row {unread[0].path} ({unread[0].reason}){others}; every row is "
                                   "kept — rerun the same command to resume")  # fmt: skip
    frame = loaded.frame
    return frame[frame["cell_id"].isin(ids)].reset_index(drop=True)


def fit_budget_curves(
    cells: Sequence[Planned], rows: pd.DataFrame, bootstrap: int, seed: int, cache: dict | None = None, *, confirming: bool = False
) -> dict[CurveKey, CurveFit]:
    """Every budget curve of the grid that its stored rows can support.

    Each curve's resamples are seeded by `seed` and the ids of its ok cells, so a fit is a function
    of its data alone: a rerun reproduces it, and `cache` can keep it until a new cell of the curve lands.
    `confirming` draws from a stream of its own: the stop's check on more resamples, whose first ones would
    otherwise be the very resamples it checks.
    """
    cache = {} if cache is None else cache
    fits = {}
    ok = rows[rows["status"] == "ok"]
    for key in curves_of(cells):
        task, method, model = key
        ids = tuple(sorted(ok["cell_id"][(ok["task"] == task) & (ok["method"] == method) & (ok["model"] == model)]))
        entry = (key, ids, bootstrap, seed, confirming)
        if entry not in cache:
            stream = [seed, int(hashlib.sha256("".join(ids).encode()).hexdigest()[:15], 16)]
            cache[entry] = fit_curve(key, rows, bootstrap, np.random.default_rng([*stream, 1] if confirming else stream))
        if cache[entry] is not None:
            fits[key] = cache[entry]
    return fits


def _judged(fits: Mapping[CurveKey, CurveFit], noise: PooledNoise, resamples: int, settings: Settings, *,
            confirming: bool = False) -> tuple[list[Target], dict[CurveKey, CurveFit], str]:  # fmt: skip
    """The round's targets, each on its curves' stored resamples and on fresh noise around their fits, the fresh-noise
    twins of the curves they read (what acquisition reads), and a note naming the exponents that are no target.

    An exponent that more than 1 − level of either set of resamples leaves unidentified (its B·D^-β term vanishes) is
    none: named in the note rather than kept open, where no cell is known to make it identified and it would take the
    whole budget, or dropped without a word."""
    stored = targets_from(fits, settings.target_width, settings.target_exponent_width)
    twins = fresh_noise_twins({key: fits[key] for target in stored for key in target.curves}, noise, resamples, settings.seed,
                              confirming=confirming)  # fmt: skip
    judged = on_fresh_noise(stored, twins)
    lost = {target.name for target in judged if target.fresh_width == float("inf")}
    note = "".join(f"; the exponent of {label(key)} is no target: {share:.0%} of its resamples leave it unidentified"
                   for key, share in unidentified_exponents(fits).items()) if settings.target_exponent_width is not None else ""  # fmt: skip
    note += "".join(f"; the exponent of {name} is no target: fresh noise around its fit leaves it unidentified in over "
                    f"{1 - CI_LEVEL:.0%} of resamples" for name in sorted(lost))  # fmt: skip
    return [target for target in judged if target.name not in lost], twins, note


def _choice_record(round_: int, choice: Choice) -> dict:
    c = choice.cell.config
    return {
        "event": "choice", "round": round_, "phase": choice.phase, "cell_id": choice.cell.cell_id, "slug": c.slug,
        "task": c.task, "model": c.model.id, "method": c.method, "budget": c.budget, "seed": c.seed,
        "expected_flops": choice.flops, "value_per_flop": choice.value, "reason": choice.reason,
    }  # fmt: skip


def _within(choices: list[Choice], flops_left: float, cells_left: float) -> list[Choice]:
    """The design's cells, in order, that the remaining budgets allow: a cell the FLOPs left cannot pay for is passed
    over, not an end (one curve's costliest cell, near the front of the design's turns, held back every cell after it,
    the other curves' cheap ones too, and the run stopped with curves it could have fitted unfitted)."""
    kept, flops = [], 0.0
    for choice in choices:
        if len(kept) >= cells_left:
            break
        if flops + choice.flops <= flops_left:
            kept.append(choice)
            flops += choice.flops
    return kept


def run_adaptive(
    cells: Sequence[Planned], store: ResultsStore, execute: Executor, settings: Settings,
    params_prior: Mapping[str, float], *, echo: Callable[[str], None] = print,
) -> Outcome:  # fmt: skip
    """The loop of the module docstring; `params_prior` maps model id -> parameter count for unrun models."""
    check_grid(cells, settings.target_exponent_width)
    log = DecisionLog(store)
    history = log.read()
    round_ = 1 + max((r.get("round", -1) for r in history), default=-1)
    if history:
        echo(f"adaptive: resuming at round {round_} from {store.uri}/{LOG_NAME} and the stored rows")
        log.append([{"event": "resume", "round": round_}])
    flops_budget = settings.budget_flops if settings.budget_flops is not None else float("inf")
    cells_budget = settings.max_cells if settings.max_cells is not None else float("inf")
    fit_cache: dict = {}
    read_cache: ReadCache = {}
    submitted: list[Choice] = []
    cell_claims = Claims(store)  # the drivers' claims on cells (`run_cells`), read here, never taken
    while True:
        read_at = time.time()  # a cell another driver stores after this is not run again (run_cells' planned_at)
        rows = stored_rows(store, cells, read_cache)
        status = dict(zip(rows["cell_id"], rows["status"]))
        abandoned = given_up(cells, status)
        failing = ", ".join(f"{label(key)} ({n} cells failed)" for key, n in abandoned.items())
        unfitted = f"; given up, left unfitted: {failing}" if abandoned else ""  # the design walks these no further
        cost = CostModel.calibrate(cells, rows, params_prior)
        spent = cost.spent(cells, rows)
        if submitted and not any(choice.cell.cell_id in status for choice in submitted):
            if _waited_for_claims(cell_claims, {choice.cell.cell_id for choice in submitted}, echo):
                submitted = []  # stored meanwhile, or free to take over: chosen again from what is stored now
                continue
            return _stop(log, echo, round_, "no progress: none of the chosen cells was stored" + unfitted, status, spent, [])
        flops_left, cells_left = flops_budget - spent, cells_budget - len(status)
        candidates = [c for c in cells if c.cell_id not in status]
        targets: list[Target] = []
        design = design_choices(cells, status, cost)
        affordable = design_choices(cells, status, cost, flops_left)
        if cost.unsized and settings.budget_flops is not None:  # before the budget is shared out: what it drops spends none
            affordable = _one_per_unsized_model(affordable, cost.unsized, echo)
        # Before any row is measured the prices are the prior's guess (32 tokens an example; a world's may be 40): a design
        # batch then spends at most half the FLOPs left, at least one cell, so a guess 20 % low does not overspend them.
        choices = _within(affordable, flops_left if cost.rates else flops_left / 2, cells_left) or (affordable[:1] if cells_left >= 1 else [])
        # No design cell left can be run (each costs more than the FLOPs left, or no cells are left): the curves whose
        # designs are finished are fitted (and narrowed while the budgets allow), the others named. A run that stopped
        # here said "nothing could be fitted" though curves that had finished their designs could be.
        unaffordable = {curve_key(choice.cell) for choice in design} if design and not choices else set()
        if unaffordable:
            spent_budget = "cell" if cells_left <= 0 else "compute"
            unfitted += f"; the {spent_budget} budget cannot finish the design of {', '.join(label(key) for key in sorted(unaffordable))}"
            design = []
        if design:
            echo(f"round {round_}: design, {len(design)} cells needed before every curve can be fitted")
            if 0 < cells_left < len(design):  # said now, not after the run has spent what it may (at 0 the stop says it)
                echo(f"  note: --max-cells {settings.max_cells:g} leaves room for {max(0, int(cells_left))} of them: the curves whose "
                     f"designs it cannot finish will not be fitted (all of them need {len(status) + len(design)} cells)")  # fmt: skip
        else:
            resamples = settings.bootstrap
            # a given-up curve is left unfitted, as the stop says: fitted from the 4–5 ok cells it had, it became a target,
            # acquisition chose more of its cells, and a run could stop on its width (helper-134)
            untrusted = unaffordable | set(abandoned)
            fits = _without(fit_budget_curves(cells, rows, resamples, settings.seed, fit_cache), untrusted)
            noise = pooled_noise(fits)  # of the full-data fits: the same whatever the resamples
            targets, twins, unidentified = _judged(fits, noise, resamples, settings)
            if targets and all(t.resolved for t in targets) and settings.confirm_bootstrap > resamples:
                # A width from few resamples is noisy, and stopping on the first round whose estimate dips
                # under the goal favours the low draws: the stop is confirmed on more resamples, drawn apart, first.
                resamples = settings.confirm_bootstrap
                fits = _without(fit_budget_curves(cells, rows, resamples, settings.seed, fit_cache, confirming=True), untrusted)
                targets, twins, unidentified = _judged(fits, noise, resamples, settings, confirming=True)
            unfitted += unidentified
            # a target whose curve cannot be fitted (and is not given up, or its design unaffordable) is said, not dropped
            said = set(abandoned) | unaffordable
            if settings.target_width is not None:
                blind = [pair for pair in curve_pairs(curves_of(cells)) if any(k not in fits and k not in said for k in pair)]
                unfitted += "".join(f"; no D* for {label(steer)} × {tune[1]}: {', '.join(label(k) for k in (steer, tune) if k not in fits)} "
                                    "not fitted (its ok cells do not support the law)" for steer, tune in blind)  # fmt: skip
            if settings.target_exponent_width is not None:
                unfitted += "".join(f"; no exponent for {label(key)}: not fitted (its ok cells do not support the law)"
                                    for key in curves_of(cells) if key not in fits and key not in said)  # fmt: skip
            log.append([{"event": "round", "round": round_, "cells_stored": len(status), "flops_spent": spent,
                         "noise_sd": float(np.sqrt(noise.variance)), "resamples": resamples,
                         "targets": [t.record() for t in targets]}])  # fmt: skip
            echo(f"round {round_}: {len(status)} cells stored, {spent:.3g} post-training FLOPs, noise sd {np.sqrt(noise.variance):.3g} "
                 f"(log loss, {noise.dof} degrees of freedom), {resamples} resamples")  # fmt: skip
            for target in targets:
                echo(f"  {target.describe()}")
            if not targets:
                reason = ("no target: no curve could be fitted with an identified exponent" if settings.target_exponent_width is not None
                          else "no target: no steering × fine-tuning pair of curves over shared budgets could be fitted")  # fmt: skip
                if unaffordable:
                    reason = f"{_cells_reached(status, settings) if cells_left <= 0 else _budget_reached(spent, flops_budget)}; {reason}"
                return _stop(log, echo, round_, reason + unfitted, status, spent, targets)
            if all(t.resolved for t in targets):
                return _stop(log, echo, round_, "every target interval is narrower than its goal" + unfitted, status, spent, targets)
            size = int(min(settings.batch_size, cells_left))
            choices = acquisition_choices(targets, fits, twins, candidates, cost, noise.variance, size=size, flops_left=flops_left)
        if not choices:
            if not candidates:
                reason = "every cell of the grid is stored"
            elif cells_left <= 0:
                reason = _cells_reached(status, settings)
            elif _out_of_flops(targets, candidates, cost, flops_left):
                reason = _budget_reached(spent, flops_budget)
            else:
                reason = "no remaining cell is expected to narrow an open target"
            return _stop(log, echo, round_, reason + unfitted, status, spent, targets)
        log.append([_choice_record(round_, choice) for choice in choices])
        for choice in choices:
            echo(f"  + {choice.cell.config.slug} (≈{choice.flops:.3g} FLOPs): {choice.reason}")
        execute([choice.cell for choice in choices], read_at)
        submitted = choices
        round_ += 1


def _waited_for_claims(claims: Claims, cell_ids: set[str], echo: Callable[[str], None]) -> bool:
    """Wait while another driver holds claims on any of `cell_ids`; False if none does. Choices are deterministic, so
    a run resumed on another host soon after its driver died chose the dead driver's claimed cells again, ran none and
    stopped ("no progress"): it now waits for them to be stored, released, or stale (`Claims.ttl_seconds`)."""
    held = claims.held_by_live_drivers() & cell_ids
    if not held:
        return False
    echo(f"adaptive: waiting for {len(held)} chosen cells another driver has claimed: until it stores them, or its claims "
         f"lapse {claims.ttl_seconds / 60:g} minutes after its last heartbeat if it died on another host")  # fmt: skip
    while claims.held_by_live_drivers() & held:
        time.sleep(CLAIM_POLL_SECONDS)
    return True


def _budget_reached(spent: float, flops_budget: float) -> str:
    return f"compute budget reached ({spent:.3g} of --budget-flops {flops_budget:.3g}; the next cell would exceed it)"


def _cells_reached(status: Mapping[str, str], settings: Settings) -> str:
    return f"cell budget reached ({len(status)} of --max-cells {settings.max_cells:g})"


def _one_per_unsized_model(choices: list[Choice], unsized: frozenset[str], echo: Callable[[str], None]) -> list[Choice]:
    """The choices of models with a size, and one cell of each model without (no size prior, no row with its size): its price
    is a guess at N, and a first batch priced at N = 1 spent 13× --budget-flops (helper-134). Its row's size prices the
    rest of that model's cells from the next round on."""
    kept, probed = [], set()
    for choice in choices:
        model = choice.cell.config.model.id
        if model not in unsized or model not in probed:
            kept.append(choice)
            probed.add(model)
    if held := sorted({c.cell.config.model.id for c in choices} & unsized):
        echo(f"  no size known for {', '.join(held)}: one cell of each runs first, and its row prices the rest")
    return kept


def _without(fits: dict[CurveKey, CurveFit], curves: set[CurveKey]) -> dict[CurveKey, CurveFit]:
    """The fits of every curve but `curves` (given up, or their design unfinished: their bootstrap is not trusted)."""
    return {key: fit for key, fit in fits.items() if key not in curves}


def _out_of_flops(targets: Sequence[Target], candidates: Sequence[Planned], cost: CostModel, flops_left: float) -> bool:
    """Whether every candidate on an open target's curves costs more than the FLOPs left (False without one). Asked of
    every candidate, a `base` seed (free) or a curve no target reads made a run that had spent its budget stop with
    "no remaining cell is expected to narrow an open target"."""
    open_curves = {key for target in targets if not target.resolved for key in target.curves}
    narrowing = [cost.post_train(c.config) for c in candidates if curve_key(c) in open_curves]
    return bool(narrowing) and min(narrowing) > flops_left


def _stop(log: DecisionLog, echo: Callable[[str], None], round_: int, reason: str, status: Mapping[str, str],
          spent: float, targets: list[Target]) -> Outcome:  # fmt: skip
    log.append([{"event": "stop", "round": round_, "reason": reason, "cells_stored": len(status), "flops_spent": spent,
                 "targets": [t.record() for t in targets]}])  # fmt: skip
    echo(f"adaptive: stopped after round {round_}: {reason}")
    return Outcome(reason, round_, len(status), spent, targets)
