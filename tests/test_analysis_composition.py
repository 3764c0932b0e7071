"""Composition gains: intervals with their stated coverage at a handful of seeds, and findings corrected for how many were compared."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.composition import CompositionGain, composition_gains, holm
from analysis.metrics import improvement
from analysis.report import _findings


def _simulated_gain(rng: np.random.Generator, seeds: int, true_gain: float) -> CompositionGain:
    """lora+steer_mean `true_gain` above lora (0.8), steer_mean far below, seed noise 0.02."""
    means = {"lora": 0.8, "steer_mean": 0.5, "lora+steer_mean": 0.8 + true_gain}
    rows = [{"task": "t", "model": "m", "budget": 64, "method": m, "seed": s, "score": mu + rng.normal(0, 0.02)}
            for m, mu in means.items() for s in range(seeds)]  # fmt: skip
    (gain,) = composition_gains(pd.DataFrame(rows), metric="score")
    return gain


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_with_no_true_gain_the_interval_excludes_zero_in_at_most_five_percent_of_runs(seeds: int) -> None:
    """The cell bootstrap's 95 % interval excluded 0 in 22 % of runs at three seeds (a percentile interval of
    three values resampled); the interval must keep its 95 % coverage, and its p-value agree with it."""
    rng = np.random.default_rng(seeds)
    gains = [_simulated_gain(rng, seeds, 0.0) for _ in range(300)]
    excluded = np.mean([g.gain_lo > 0 or g.gain_hi < 0 for g in gains])
    assert excluded <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 300), excluded
    assert all((g.p_value < 0.05) == (g.gain_lo > 0 or g.gain_hi < 0) for g in gains)


def test_a_real_gain_is_covered_and_found_with_enough_seeds() -> None:
    rng = np.random.default_rng(0)
    gains = [_simulated_gain(rng, 5, 0.05) for _ in range(200)]
    assert np.mean([g.gain_lo <= 0.05 <= g.gain_hi for g in gains]) >= 0.93
    assert np.mean([g.gain_lo > 0 for g in gains]) > 0.8


def test_a_lower_nll_is_an_improvement() -> None:
    """Composition gains and the frontier rank methods by `improvement`: were a lower NLL counted as worse,
    the worst part would be taken for the best one under --metric nll."""
    assert improvement(np.array([1.0]), np.array([2.0]), "nll").tolist() == [1.0]
    assert improvement(np.array([0.5]), np.array([0.25]), "score").tolist() == [0.25]


def test_holm_rejects_step_down() -> None:
    assert holm(np.array([0.01, 0.04, 0.03, 0.2])).tolist() == [True, False, False, False]  # 0.01 ≤ .05/4; then 0.03 > .05/3
    assert holm(np.array([0.001, 0.02, 0.012])).tolist() == [True, True, True]  # .001 ≤ .05/3, .012 ≤ .05/2, .02 ≤ .05


def test_gains_clear_of_zero_only_by_chance_among_many_are_not_findings() -> None:
    """Ten gains each with p = 0.02 (their 95 % intervals exclude 0): among ten comparisons that is what chance
    gives, so none is stated, and one with p = 1e-5 still is."""
    gains = [CompositionGain("t", f"m{i}", 64.0, "lora+steer_mean", "lora", 0.01, 0.002, 0.02, 6, 3, 0.02) for i in range(10)]
    clear = CompositionGain("t", "big", 64.0, "lora+steer_mean", "lora", 0.05, 0.04, 0.06, 6, 3, 1e-5)
    a = SimpleNamespace(fits=[], scaling=[], crossovers=[], compositions=[*gains, clear], unchanged=[], metric="score", x="params", loaded=SimpleNamespace(ok=pd.DataFrame()), bootstrap=200, axes=SimpleNamespace(best=None))
    text = " ".join(b.text for b in _findings(a) if hasattr(b, "text"))
    assert text.count("is better than lora alone") == 1 and "t, big, D=64: lora+steer_mean is better" in text, text
    assert "Holm's correction over the 11 composition comparison(s)" in text
    assert "10 more composition gain(s) have a 95 % interval that excludes 0 but do not survive Holm's correction" in text


def test_a_composition_without_all_of_its_parts_beside_it_is_named_not_dropped() -> None:
    """At D=32 steer_mean's cells failed: the composition there had no gain to show and vanished without a word
    while another budget's was in the table."""
    from analysis.composition import unmatched_compositions

    rows = [{"task": "arith", "model": "s", "budget": budget, "method": method, "seed": seed, "score": 0.3 + 0.01 * seed}
            for budget in (8, 32) for method in ("lora", "steer_mean", "steer_mean+lora") for seed in (0, 1)
            if (budget, method) != (32, "steer_mean")]  # fmt: skip
    frame = pd.DataFrame(rows)
    assert [g.budget for g in composition_gains(frame, metric="score")] == [8.0]
    assert unmatched_compositions(frame, metric="score") == ["steer_mean+lora on arith/s at D=32 (no ok steer_mean cell there)"]


def test_composition_cells_that_are_one_part_alone_are_counted_and_said() -> None:
    """In 68 of the demo's 120 steer_mean+lora cells steering chose a scale of 0, and the cell was LoRA's to the bit: the
    table's gains of 0 read as "combining adds nothing" where the composition was one part alone (helper-143)."""
    from analysis.report import _copies_of_a_part

    rows = [{"task": "t", "model": "m", "budget": 64, "method": m, "seed": s, "score": score, "nll": nll}
            for m, s, score, nll in [("lora", 0, 0.7, 1.1), ("lora", 1, 0.8, 1.0), ("lora", 2, 0.75, 1.05),
                                     ("steer_mean", 0, 0.5, 1.5), ("steer_mean", 1, 0.52, 1.4), ("steer_mean", 2, 0.51, 1.45),
                                     ("steer_mean+lora", 0, 0.7, 1.1), ("steer_mean+lora", 1, 0.8, 1.0),
                                     ("steer_mean+lora", 2, 0.75, 1.04)]]  # seed 2: the same score, another NLL  # fmt: skip
    (gain,) = composition_gains(pd.DataFrame(rows), metric="score")
    assert (gain.as_a_part, gain.composition_cells) == (2, 3)
    rows[-1]["nll"] = 1.05
    (copy,) = composition_gains(pd.DataFrame(rows), metric="score")
    assert (copy.as_a_part, copy.composition_cells) == (3, 3)
    (unsure,) = composition_gains(pd.DataFrame(rows).drop(columns="nll"), metric="score")
    assert unsure.as_a_part == 0, "a score alone, a count of questions, matches by chance: no copy is claimed without the NLL"
    (said,) = _copies_of_a_part([gain, copy])
    assert said.text.startswith("In 5 of the 6 composition cells the composition scored, to the bit, as one of its parts alone")
    assert "In 1 of the 2 comparisons every cell is such a copy" in said.text
