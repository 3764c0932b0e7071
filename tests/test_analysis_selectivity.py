"""The share of the elicitation gap a method closes is reported only where the gap is more than noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import FALLBACK_RESOLUTION, score_resolution, selectivity


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
