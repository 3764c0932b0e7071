"""`steerscale fit` from the command line: what it fits is what the flags ask for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from analysis.synthetic import TrueCurve, synthetic_rows
from orchestrator.cli import main
from workers.schema import to_table


def test_fit_metric_nll_fits_the_nll_column(tmp_path: Path, capsys) -> None:
    """The NLL is twice the score's loss here, so its fitted floor E and coefficient B are twice the
    score's and its exponent the same; `--metric score` (the default) still fits the score."""
    rows = synthetic_rows({("facts", "lora", "m1"): TrueCurve(0.1, 1.5, 0.5)}, {"m1": 10**6}, (4, 8, 16, 32, 64, 128, 256),
                          seeds=2, noise=0.0, rng=np.random.default_rng(0))  # fmt: skip
    (tmp_path / "cells").mkdir()
    for row in rows:
        pq.write_table(to_table([{**row, "nll": 2.0 * (1.0 - row["score"])}]), tmp_path / "cells" / f"{row['cell_id']}.parquet")

    def fitted(metric: str) -> dict:
        assert main(["fit", str(tmp_path), "--metric", metric, "--bootstrap", "0", "--workers", "1"]) == 0
        saved = json.loads((tmp_path / "fits.json").read_text())
        assert saved["metric"] == metric
        (curve,) = [f for f in saved["fits"] if f["method"] == "lora" and f["law"] == "power_D"]
        return curve

    score, nll = fitted("score"), fitted("nll")
    assert np.isclose(score["E"], 0.1, rtol=1e-3) and np.isclose(nll["E"], 0.2, rtol=1e-3)
    assert np.isclose(nll["B"], 2 * score["B"], rtol=1e-3) and np.isclose(nll["beta"], score["beta"], rtol=1e-3)
    capsys.readouterr()
