"""Trade-offs across methods: score per unit of post-training compute, and gain against damage.

Both work on cell means per (task, model, method, budget) — an operating point someone could pick —
rather than on fitted laws, so they need no minimum number of budgets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.metrics import ROUNDING, improvement, questions_counted

KEYS = ["task", "model", "method", "budget"]


def operating_points(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Cell means per (task, model, method, budget) of the metric and the cost/selectivity columns; the metric's
    lowest and highest cell and the cells' number beside them."""
    columns = [metric, "post_train_flops", "score", "score_base", "score_elicited", "neutral_kl", "offtask_score_delta", "neutral_ppl_ratio"]
    columns = list(dict.fromkeys(columns))
    usable = ok[np.isfinite(ok[metric].astype(float))]
    points = usable.groupby(KEYS, sort=True)[columns].mean().reset_index()
    spread = usable.groupby(KEYS, sort=True)[metric].agg(["min", "max", "size"])  # a best point's mean of 2 seeds may be 0.83 and 0.56
    return points.assign(n_cells=spread["size"].to_numpy(), lowest=spread["min"].to_numpy(), highest=spread["max"].to_numpy())


def compute_frontier(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Operating points, flagged `on_frontier` if nothing cheaper is as good.

    Pareto per task: walking up in compute, a point is on the frontier when it beats every point
    that costs no more than it by more than float rounding (`ROUNDING`: a mean of k/n scores one bit
    above a cheaper equal one does not buy its cost). Points of no post-training compute (the base model, prompting with a
    fixed number of demonstrations; pretraining is not counted) are where the walk starts: the best of
    them is on the frontier at 0 FLOPs, and a paid point is only on it if it beats that.
    """
    points = operating_points(ok, metric)
    points = points[np.isfinite(points["post_train_flops"]) & (points["post_train_flops"] >= 0)]
    frames = []
    for _, task_points in points.groupby("task", sort=True):
        better = improvement(task_points[metric].to_numpy(), 0.0, metric)
        order = np.lexsort((-better, task_points["post_train_flops"].to_numpy()))
        ordered = task_points.iloc[order].assign(_better=better[order])
        previous_best = ordered["_better"].cummax().shift(fill_value=-np.inf)
        frames.append(ordered.assign(on_frontier=ordered["_better"] > previous_best + ROUNDING).drop(columns="_better"))
    return pd.concat(frames, ignore_index=True) if frames else points.assign(on_frontier=pd.Series(dtype=bool))


def frontier_by_compute(frontier: pd.DataFrame, metric: str) -> pd.DataFrame:
    """For each power-of-ten level of post-training compute, the best operating point affordable at that
    level (a free one, such as the base model, where no paid point yet beats it)."""
    rows = []
    for task, all_points in frontier.groupby("task", sort=True):
        paid = all_points["post_train_flops"].to_numpy()
        paid = paid[paid > 0]
        if not len(paid):
            continue
        points = all_points[all_points["on_frontier"]]
        flops = points["post_train_flops"].to_numpy()
        for level in 10.0 ** np.arange(np.ceil(np.log10(paid.min())), np.ceil(np.log10(paid.max())) + 1):
            affordable = points[flops <= level]
            best = affordable.iloc[-1]  # frontier points are in increasing compute and quality
            rows.append({"task": task, "flops_level": level, "method": best["method"], "model": best["model"], "budget": best["budget"], metric: best[metric],
                         "n_cells": best["n_cells"], "lowest": best["lowest"], "highest": best["highest"]})  # fmt: skip
    return pd.DataFrame(rows)


MIN_GAP_QUESTIONS = 2  # an elicitation gap of one question or less is noise: a share of it reads −4 or ±10×
FALLBACK_RESOLUTION = 0.01  # one "question" for scores that are not fractions of a test set (partial credit, say)
MIN_INFERRED_TEST_SIZE = 10


def score_resolution(values: np.ndarray) -> float:
    """One question of the test set: 1/n for the smallest n of which every score is a multiple
    (`metrics.questions_counted`), as accuracies over n questions are k/n (where the test set is larger than that n, the
    question read is coarser than the real one, which only raises the gap's bar);
    FALLBACK_RESOLUTION where the scores are not such fractions, or where the divisor is below
    MIN_INFERRED_TEST_SIZE: scores that all sit on 0, ½ and 1 say more about the task than about
    the test set's size, and would make any gap "one question"."""
    n = questions_counted(values)
    return 1.0 / n if n is not None and n >= MIN_INFERRED_TEST_SIZE else FALLBACK_RESOLUTION


def selectivity(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Gain over the base model against damage elsewhere, and the share of the elicitation gap closed.

    `gap_closed` = (score − score_base)/(score_elicited − score_base): how much of what the base
    model can already do when asked explicitly a method recovers. NaN unless the gap is at least
    MIN_GAP_QUESTIONS questions of the task's test set (score_resolution): a negative gap or one of a
    question makes the share meaningless.
    """
    points = operating_points(ok, metric)
    gain = points["score"] - points["score_base"]
    gap = points["score_elicited"] - points["score_base"]
    columns = ["score", "score_base", "score_elicited"]
    resolution = {task: score_resolution(rows[columns].to_numpy(float).ravel()) for task, rows in ok.groupby("task")}
    enough = gap >= MIN_GAP_QUESTIONS * points["task"].map(resolution).astype(float) - ROUNDING  # float: an empty map keeps the task's string type
    return points.assign(gain=gain, gap_closed=(gain / gap).where(enough))
