"""The crossover budget D*: its interval, its plot, its trend and the outcomes two curves can have."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import analysis.plots as plots
from analysis.crossover import Crossover, find_crossovers, lead_from
from analysis.curves import fit_curves
from analysis.synthetic import TrueCurve, synthetic_rows


def _crossover(model: str, d_star: float, lo: float, hi: float, n_params: float = 1e6) -> Crossover:
    return Crossover("t", model, n_params, "steer_mean", "lora", 4.0, 1024.0, d_star, lo, hi, 0.8, "crosses", "lora overtakes")


def test_lead_from_censors_the_resamples_that_do_not_cross_inside_the_range() -> None:
    d = np.geomspace(4, 1024, 256)
    advantage = np.stack([np.log(d / 50.0), np.full_like(d, 0.1), np.full_like(d, -0.1), np.log(50.0 / d), np.zeros_like(d)])
    lead = lead_from(advantage, d)
    assert lead[0] == pytest.approx(50.0, rel=1e-3)
    assert lead[1:4].tolist() == [-np.inf, np.inf, np.inf]  # ahead throughout; behind throughout; ahead only below 50
    assert np.isnan(lead[4])  # tied: no D* at all


def test_the_d_star_interval_counts_resamples_where_the_curves_do_not_cross() -> None:
    """lora crosses steer_mean near the smallest budget, and in about a fifth of the resamples it is ahead
    already there: those resamples put D* below the range. Taken over the crossing resamples only, the
    interval read [4.4, 14], inside the range and narrower than the resamples say."""
    curves = {("t", "lora", "m1"): TrueCurve(0.1, 0.7, 0.5), ("t", "steer_mean", "m1"): TrueCurve(0.25, 0.23, 0.3)}
    rows = synthetic_rows(curves, {"m1": 10**6}, (4, 32, 256, 1024), seeds=2, noise=0.08, rng=np.random.default_rng(2))
    (c,) = find_crossovers(fit_curves(pd.DataFrame(rows), metric="score", bootstrap=200, seed=0))
    assert c.outcome == "crosses" and c.share < 0.95
    assert c.d_star_lo == -np.inf and c.d_star < c.d_star_hi < c.d_max
    assert c.interval().startswith("[< 4, ") and "inf" not in c.interval()


def test_an_interval_wholly_outside_the_range_is_said_once() -> None:
    assert _crossover("m", 900.0, np.inf, np.inf).interval() == "[> 1.02e+03]"
    assert _crossover("m", 900.0, 300.0, np.inf).interval() == "[300, > 1.02e+03]"


def test_the_plot_draws_each_interval_from_its_own_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A D* of 100 with an interval [120, 300] (the point outside it) was drawn from 80 to 300 (|lo − D*| below
    the point); an interval open below the range is drawn down to the range's smallest budget."""
    found = [_crossover("a", 100.0, 120.0, 300.0, 1e6), _crossover("b", 50.0, -np.inf, 70.0, 4e6)]
    capabilities = pd.DataFrame({"task": "t", "model": ["a", "b"], "family": "f", "params": [1e6, 4e6], "neutral_loss": np.nan,
                                 "task_score": np.nan})  # fmt: skip
    a = SimpleNamespace(crossovers=found, capabilities=capabilities, axes=SimpleNamespace(trends=[]))
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.crossover_plot(a, "t", tmp_path / "x.png") is not None
    spans = sorted((float(min(s[:, 1])), float(max(s[:, 1]))) for col in figures[0].axes[0].collections for s in col.get_segments())
    assert spans == [(4.0, 70.0), (120.0, 300.0)]
