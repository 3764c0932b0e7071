"""The sigmoid link from loss to a bounded score recovers a known link and survives too few points."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.link import fit_links, fit_sigmoid_link, sigmoid_score
from analysis.report import _links

TRUE = {"floor": 0.2, "ceiling": 0.9, "slope": 6.0, "midpoint": 1.2}


def test_recovers_a_known_link_from_noisy_points():
    rng = np.random.default_rng(0)
    loss = rng.uniform(0.4, 2.2, 300)
    score = sigmoid_score(loss, **TRUE) + rng.normal(0, 0.02, loss.size)
    link = fit_sigmoid_link(loss, score, "t")
    assert link.floor == pytest.approx(TRUE["floor"], abs=0.03)
    assert link.ceiling == pytest.approx(TRUE["ceiling"], abs=0.03)
    assert link.slope == pytest.approx(TRUE["slope"], rel=0.15)
    assert link.midpoint == pytest.approx(TRUE["midpoint"], abs=0.03)
    assert link.rmse == pytest.approx(0.02, abs=0.005)
    assert link.score(TRUE["midpoint"]) == pytest.approx((TRUE["floor"] + TRUE["ceiling"]) / 2, abs=0.03)


def test_tasks_with_too_few_points_are_left_out():
    rng = np.random.default_rng(1)
    loss = rng.uniform(0.4, 2.2, 40)
    frame = pd.DataFrame({
        "task": ["a"] * 40 + ["b"] * 3,
        "nll": np.concatenate([loss, [1.0, 1.1, 1.2]]),
        "score": np.concatenate([sigmoid_score(loss, **TRUE), [0.5, 0.5, 0.5]]),
    })  # fmt: skip
    links = fit_links(frame)
    assert [k.task for k in links] == ["a"]
    with pytest.raises(ValueError, match="at least 6 points"):
        fit_sigmoid_link(np.array([1.0, 2.0]), np.array([0.5, 0.4]))


def test_a_link_where_the_score_rises_with_the_loss_is_flagged_and_not_used():
    """Across models the score can rise with the NLL (a larger model scoring better with a higher NLL): the fit
    then puts its floor above its ceiling, and was printed as a link without comment."""
    rng = np.random.default_rng(2)
    loss = rng.uniform(1.6, 2.6, 200)
    score = sigmoid_score(loss, floor=0.9, ceiling=0.1, slope=8.0, midpoint=2.1) + rng.normal(0, 0.02, loss.size)
    (link,) = fit_links(pd.DataFrame({"task": "arith", "nll": loss, "score": score}))
    assert link.floor > link.ceiling
    with pytest.raises(ValueError, match="inverted"):
        link.score(2.0)
    (table,) = [b for b in _links(SimpleNamespace(links=[link])) if hasattr(b, "rows")]
    assert "do not use it to translate a loss into a score" in table.rows[0][-1]
    assert link.inverted and link.record()["note"] == link.note == table.rows[0][-1]
    spread = rng.uniform(0.4, 2.2, 60)
    assert fit_sigmoid_link(spread, sigmoid_score(spread, **TRUE), "t").note == ""


def test_a_rise_no_cell_lies_inside_is_named_as_unmeasured():
    """9 cells on two plateaus (a score jump between two neighbouring losses) fit any slope past the gap: a slope of
    3.98e+04 was printed as if measured (helper-169). Cells inside the rise resolve it."""
    loss = np.array([0.8, 0.85, 0.9, 0.95, 1.0, 1.6, 1.65, 1.7, 1.75])
    step = np.where(loss < 1.3, 0.8, 0.3)
    link = fit_sigmoid_link(loss, step, "t")
    assert link.in_rise < 2 and link.note.startswith(f"its rise is not measured: {link.in_rise} of 9 cells lie within its 10–90 % rise")
    assert link.score(0.5) == pytest.approx(0.8, abs=0.01)  # a step is still a link: not refused as an inverted one is
    tail = np.linspace(1.6, 2.6, 40)  # only the flat tail past the rise, which the fit puts below the cells' losses
    assert fit_sigmoid_link(tail, sigmoid_score(tail, **TRUE), "t").note.startswith("its rise is not measured: 0 of 40 cells")
    spread = np.random.default_rng(3).uniform(0.4, 2.2, 60)
    resolved = fit_sigmoid_link(spread, sigmoid_score(spread, **TRUE), "t")
    assert resolved.in_rise >= 10 and resolved.note == ""
