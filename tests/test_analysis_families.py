"""Laws in parameters are fitted per family: two families whose post-training loss falls with size at different rates.

Family `p` gains slowly with size (alpha 0.4), family `q` fast (alpha 1.0). One law over both would give
one alpha that is neither; per family, each recovers its own. Capability axes keep pooling: that is
what they are for. A sweep of one family reads exactly as it did before the split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.capability import capability_table, get_axis
from analysis.crossover import crossover_scaling, find_crossovers
from analysis.curves import LawFit, fit_curves, joint_fits
from analysis.synthetic import BaseModel, CapabilityLaw, capability_rows
from test_analysis_results import write_cells

ALPHA = {"p": 0.4, "q": 1.0}
SMALLEST = {"p": 1_000_000, "q": 500_000}
BUDGETS = (8, 32, 128, 512, 2048)


def _models(family: str) -> list[BaseModel]:
    """Three sizes, 4x apart; base models that are better the larger they are."""
    sizes = [SMALLEST[family] * 4**i for i in range(3)]
    return [BaseModel(f"{family}-{i}", family, n, 1.2 - 0.15 * i, 0.2 + 0.1 * i) for i, n in enumerate(sizes)]


def _laws(family: str) -> dict[tuple[str, str], CapabilityLaw]:
    """Fine-tuning overtakes steering inside the budgets on every model; the size term is 0.25 (0.35) at the smallest."""
    alpha, scale = ALPHA[family], SMALLEST[family] ** ALPHA[family]
    return {("facts", "lora"): CapabilityLaw(e=0.02, a=0.25 * scale, alpha=alpha, b=3.0, beta=0.45),
            ("facts", "steer_mean"): CapabilityLaw(e=0.10, a=0.35 * scale, alpha=alpha, b=0.6, beta=0.4)}  # fmt: skip


def _rows(families: tuple[str, ...]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame([row for f in families for row in capability_rows(_laws(f), _models(f), "params", BUDGETS, seeds=2, noise=0.01, rng=rng)])


def _joint(fits: list[LawFit], method: str, law: str = "additive") -> dict[str, LawFit]:
    return {f.model: f for f in fits if f.joint and f.method == method and f.law.name == law}


def _misfit(fit: LawFit) -> float:
    """Mean absolute error of the law on the cells it was fitted to, in score units."""
    return float(np.mean(np.abs(fit.predict(fit.points.n, fit.points.d) - fit.points.value)))


@pytest.fixture(scope="module")
def two() -> pd.DataFrame:
    return _rows(("p", "q"))


@pytest.fixture(scope="module")
def by_params(two: pd.DataFrame) -> list[LawFit]:
    return fit_curves(two, metric="score", bootstrap=30, seed=0, x="params")


def test_each_family_recovers_its_own_alpha_where_pooling_would_not(two: pd.DataFrame, by_params: list[LawFit]) -> None:
    pooled = {f.method: f for f in joint_fits(two, metric="score", axis=get_axis("params"), bootstrap=0, seed=0, pooled=True)
              if f.law.name == "additive"}  # fmt: skip
    for method in ("lora", "steer_mean"):
        fits = _joint(by_params, method)
        assert set(fits) == {"* (p)", "* (q)"}
        for family, alpha in ALPHA.items():
            fit = fits[f"* ({family})"]
            assert fit.family == family and fit.fit.params["alpha"] == pytest.approx(alpha, abs=0.1)
            assert len(fit.points.value) == 3 * len(BUDGETS) * 2 and f"({family}-2)" in fit.holdout  # its own family's largest model
        assert max(abs(pooled[method].fit.params["alpha"] - alpha) for alpha in ALPHA.values()) > 0.3  # one alpha cannot be both
        assert _misfit(pooled[method]) > 5 * max(_misfit(fit) for fit in fits.values())  # and one law misses both families' cells
    assert {f.model for f in by_params if not f.joint} == {m.name for f in ALPHA for m in _models(f)}  # budget curves: one per model


def test_capability_axes_keep_one_pooled_law(two: pd.DataFrame) -> None:
    fits = fit_curves(two, metric="score", bootstrap=0, seed=0, x="neutral_loss")
    for method in ("lora", "steer_mean"):
        (fit,) = _joint(fits, method).values()
        assert (fit.model, fit.family, len(fit.points.value)) == ("*", "", 6 * len(BUDGETS) * 2)


def test_one_family_fits_as_before(tmp_path: Path) -> None:
    """A one-family sweep, with or without the family column (older rows): one "*" law, the same numbers either way."""
    one = _rows(("p",))
    fits = fit_curves(one, metric="score", bootstrap=20, seed=0, x="params")
    unnamed = fit_curves(one.drop(columns="family"), metric="score", bootstrap=20, seed=0, x="params")
    assert {f.model for f in fits if f.joint} == {"*"} and all(not f.family for f in fits)
    same = json.dumps([f.record() for f in fits], default=str) == json.dumps([f.record() for f in unnamed], default=str)  # NaN as NaN
    assert same
    trends = crossover_scaling(find_crossovers(fits), capability_table(one), get_axis("params"))
    assert [(t.family, t.n_models) for t in trends] == [("", 3)] and "family" not in trends[0].record()
    assert "of family" not in trends[0].describe()


def test_the_d_star_trend_is_per_family_in_params_only(two: pd.DataFrame, by_params: list[LawFit]) -> None:
    crossovers, capabilities = find_crossovers(by_params), capability_table(two)
    assert len(crossovers) == 6 and {c.outcome for c in crossovers} == {"crosses"}
    trends = {t.family: t for t in crossover_scaling(crossovers, capabilities, get_axis("params"))}
    assert set(trends) == {"p", "q"} and all(t.n_models == 3 for t in trends.values())
    assert trends["p"].record()["family"] == "p" and "across the 3 models of family p where it crosses" in trends["p"].describe()
    assert trends["q"].gamma > trends["p"].gamma + 0.1  # q's size term shrinks faster, so its D* moves further over the same 16x
    (pooled,) = crossover_scaling(crossovers, capabilities, get_axis("params"), pooled=True)
    (capability,) = crossover_scaling(crossovers, capabilities, get_axis("neutral_loss"))
    assert (pooled.family, pooled.n_models, capability.family, capability.n_models) == ("", 6, "", 6)


def test_fits_json_text_report_and_axis_comparison_name_the_families(two: pd.DataFrame, tmp_path: Path) -> None:
    write_cells(tmp_path, two.to_dict(orient="records"))
    summary = analysis.write_report(str(tmp_path), bootstrap=10, x="params")
    payload = json.loads(Path(summary.paths["fits.json"]).read_text())
    assert {r["model"] for r in payload["fits"] if r["x"] == "params"} == {"* (p)", "* (q)"}
    assert sorted(s["family"] for s in payload["crossover_scaling"]) == ["p", "q"]
    # the comparison scores params pooled (the baseline a capability axis must beat) and says so
    comparison = summary.analysis.axes
    assert payload["axis_comparison"]["pooled_across_families"] == ["params"] == comparison.pooled
    assert all("(p)" not in s.held_out and "(q)" not in s.held_out for s in comparison.scores if s.x == "params")
    assert sorted((t.x, t.family) for t in comparison.trends) == [("neutral_loss", ""), ("params", "p"), ("params", "q"), ("task_score", "")]
    text = summary.to_text()
    assert "* (p)" in text and "models of family q where it crosses" in text and "params: scored as one law and one trend over every family" in text
    markdown = summary.report_page.with_name("report.md").read_text()
    assert "`* (family)` rows are joint laws in (N, D) fitted within one family" in markdown
    assert "params: scored as one law and one trend over every family" in markdown.split("## Capability as the x-axis", 1)[1]
    assert (summary.report_page.parent / "crossover_facts.png").stat().st_size > 0


def test_a_model_keeps_one_family_when_its_rows_disagree() -> None:
    """Rows stored before the family naming changed say `qwen2`, newer ones `qwen2.5`: one model, one
    family (its latest row's), so its cells are not split between two families."""
    from analysis.capability import family_of

    rows = pd.DataFrame({"model": ["Qwen2.5-0.5B", "Qwen2.5-0.5B", "pythia-70m"], "family": ["qwen2.5", "qwen2", "pythia"],
                         "finished_at": pd.to_datetime(["2026-12-02", "2026-11-01", "2026-11-01"], utc=True)})  # fmt: skip
    assert family_of(rows).tolist() == ["qwen2.5", "qwen2.5", "pythia"]


def test_a_family_whose_cells_all_failed_does_not_split_the_laws() -> None:
    """The trends see ok rows only; the laws, all rows: both must agree that one family is left."""
    from analysis.capability import split_by_family

    rows = pd.DataFrame({"model": ["a", "b"], "family": ["p", "q"], "status": ["ok", "failed"]})
    assert not split_by_family(get_axis("params"), rows)
    assert split_by_family(get_axis("params"), rows.assign(status="ok"))
