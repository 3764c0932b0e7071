"""Trade-offs: the share of the elicitation gap a method closes (only where the gap is more than noise), and the compute frontier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import FALLBACK_RESOLUTION, compute_frontier, frontier_by_compute, score_resolution, selectivity


def test_one_question_is_read_off_the_scores() -> None:
    assert score_resolution(np.array([37, 120, 181, 200, np.nan]) / 200) == pytest.approx(1 / 200)
    assert score_resolution(np.array([0.3, 0.5])) == pytest.approx(1 / 10)  # a coarser grid only raises the bar
    assert score_resolution(np.array([0.0, 0.5, 1.0])) == FALLBACK_RESOLUTION  # 0, ½, 1 do not mean two questions
    assert score_resolution(np.array([0.2, 0.7342917, 0.5])) == FALLBACK_RESOLUTION  # partial credit: not k/n


def test_gap_closed_needs_a_positive_gap_of_more_than_a_question() -> None:
    """On a 200-question test set: a gap of −1 question gave gap_closed −4 and a gap of one question 8×;
    neither is a share of anything."""
    base = 100 / 200
    rows = [{"task": "t", "model": model, "method": "lora", "budget": 64, "seed": s, "score": (100 + gained) / 200, "score_base": base,
             "score_elicited": base + gap / 200, "post_train_flops": 1.0, "neutral_kl": 0.0, "offtask_score_delta": 0.0, "neutral_ppl_ratio": 1.0}
            for model, gap, gained in (("below", -1, 4), ("one", 1, 8), ("wide", 20, 8)) for s in range(2)]  # fmt: skip
    closed = selectivity(pd.DataFrame(rows), "score").set_index("model")["gap_closed"]
    assert np.isnan(closed["below"]) and np.isnan(closed["one"])
    assert closed["wide"] == pytest.approx(8 / 20)


POINTS = [("base", "xl", 0, 0.0, 0.63), ("base", "xs", 0, 0.0, 0.40), ("prompt", "xs", 16, 3e7, 0.40),
          ("steer_mean", "s", 32, 4e8, 0.61), ("lora", "xl", 1024, 5e10, 0.80)]  # fmt: skip


def _operating_rows() -> pd.DataFrame:
    return pd.DataFrame([{"task": "t", "model": model, "method": method, "budget": budget, "seed": seed, "score": score, "score_base": 0.4,
                          "score_elicited": np.nan, "post_train_flops": flops, "neutral_kl": 0.01 * seed, "offtask_score_delta": 0.0,
                          "neutral_ppl_ratio": 1.0} for method, model, budget, flops, score in POINTS for seed in range(2)])  # fmt: skip


def test_the_compute_frontier_starts_from_the_free_base_model() -> None:
    """Base cells cost no post-training FLOPs and were left out, so a paid point below the best base model was
    "the best affordable" at the low levels (the quickstart's gridworld: prompt xs .40 where base xl scores .63)."""
    frontier = compute_frontier(_operating_rows(), "score")
    assert frontier[frontier["on_frontier"]][["method", "model"]].values.tolist() == [["base", "xl"], ["lora", "xl"]]
    levels = frontier_by_compute(frontier, "score")
    assert levels["flops_level"].tolist() == [1e8, 1e9, 1e10, 1e11]
    assert levels["method"].tolist() == ["base", "base", "base", "lora"] and levels["score"].tolist() == [0.63, 0.63, 0.63, 0.80]
    # each level's point with its cells and their range: a mean of two seeds at 0.83 and 0.56 read as a clear best (helper-165 #6)
    spread = _operating_rows().assign(score=lambda f: f["score"] + np.where(f["seed"] == 1, 0.1, -0.1))
    top = frontier_by_compute(compute_frontier(spread, "score"), "score").iloc[-1]
    assert (top["method"], top["n_cells"], top["lowest"], top["highest"]) == ("lora", 2, pytest.approx(0.70), pytest.approx(0.90))
    from types import SimpleNamespace

    from analysis.report import _frontier

    table = _frontier(SimpleNamespace(frontier_levels=frontier_by_compute(compute_frontier(spread, "score"), "score"), metric="score"))[-1]
    assert table.header[-2:] == ("cells", "cells' range") and table.rows[-1][-2:] == ("2", "0.7 – 0.9")


def test_a_method_has_one_colour_in_every_plot(tmp_path, monkeypatch) -> None:
    """Each plot took its own colour cycle: lora was one colour where base was plotted (selectivity) and another
    where it was not (the frontier, which draws base as a level)."""
    from types import SimpleNamespace

    from analysis import plots

    frame = _operating_rows()
    a = SimpleNamespace(loaded=SimpleNamespace(frame=frame), metric="score", x="params", frontier=compute_frontier(frame, "score"),
                        selectivity=selectivity(frame, "score"))  # fmt: skip
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.frontier_plot(a, "t", tmp_path / "f.png") and plots.selectivity_plot(a, "t", tmp_path / "s.png")
    colours = [{c.get_label(): tuple(c.get_facecolor()[0]) for ax in fig.axes for c in ax.collections} for fig in figures]
    assert "base" not in colours[0] and "base" in colours[1]
    assert all(colours[0][method] == colours[1][method] for method in ("prompt", "steer_mean", "lora")), colours


def test_a_costlier_point_level_with_a_cheaper_one_up_to_rounding_is_not_on_the_frontier() -> None:
    """B's scores (0, .01, .14) average 0.05000000000000001, a bit above A's single 0.05 at a thousandth of B's
    FLOPs: B was "the best operating point" from 1e12 FLOPs on."""
    rows = [{"task": "t", "model": "m", "method": "a", "budget": 8, "seed": 0, "score": 0.05, "post_train_flops": 1e9}]
    rows += [{"task": "t", "model": "m", "method": "b", "budget": 8, "seed": s, "score": v, "post_train_flops": 1e12} for s, v in enumerate((0, 0.01, 0.14))]
    frame = pd.DataFrame(rows).assign(score_base=0.0, score_elicited=np.nan, neutral_kl=0.0, offtask_score_delta=0.0, neutral_ppl_ratio=1.0)
    frontier = compute_frontier(frame, "score").set_index("method")
    assert frontier.loc["b", "score"] > frontier.loc["a", "score"]  # by float rounding alone
    assert frontier["on_frontier"].to_dict() == {"a": True, "b": False}
    assert set(frontier_by_compute(frontier.reset_index(), "score")["method"]) == {"a"}


def test_the_selectivity_table_compares_methods_at_a_budget_they_share() -> None:
    """lora measured up to 1024 and steer_mean up to 256 were each shown at its own largest budget, crediting lora
    with four times the data; and an off-task Δ of float residue (-1.39e-17) was printed as damage."""
    from types import SimpleNamespace

    from analysis.report import _selectivity

    rows = [{"task": "t", "model": "m", "method": method, "budget": budget, "seed": 0, "score": 0.5 + budget / 1e4, "score_base": 0.4,
             "score_elicited": np.nan, "post_train_flops": 1.0, "neutral_kl": 0.0, "offtask_score_delta": -1.39e-17, "neutral_ppl_ratio": 1.0,
             "params_nonembed": 1e6, "nll_base": 2.0, "nll": 2.0 if method == "lora" else 1.9}
            for method, budgets in (("lora", (64, 256, 1024)), ("steer_mean", (64, 256))) for budget in budgets]  # fmt: skip
    frame = pd.DataFrame(rows)
    a = SimpleNamespace(selectivity=selectivity(frame, "score"), loaded=SimpleNamespace(ok=frame))
    table = _selectivity(a)[-1]
    assert [(r[2], r[3], r[7]) for r in table.rows] == [("lora", "256", "0"), ("steer_mean", "256", "0")]
    # lora's cell there left the model as it was (its NLL the base model's): its 0 KL and off-task Δ are no selectivity
    assert table.header[-1] == "unchanged" and [r[-1] for r in table.rows] == ["1/1", "0/1"]


def test_a_frontier_the_free_base_model_holds_alone_is_still_drawn(tmp_path, monkeypatch) -> None:
    """Where no paid point beats the base model, the frontier was one point: its legend said "frontier", no line showed."""
    from types import SimpleNamespace

    from analysis import plots

    frame = _operating_rows()
    frame = frame[frame["method"] != "lora"]  # base xl's .63 beats every paid point left
    a = SimpleNamespace(loaded=SimpleNamespace(frame=frame), metric="score", x="params", frontier=compute_frontier(frame, "score"),
                        selectivity=selectivity(frame, "score"))  # fmt: skip
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.frontier_plot(a, "t", tmp_path / "f.png")
    (line,) = [line for line in figures[0].axes[0].lines if line.get_label() == "frontier"]
    assert (min(line.get_xdata()), max(line.get_xdata())) == (3e7, 4e8) and set(line.get_ydata()) == {0.63}
