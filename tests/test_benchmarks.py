"""`python -m benchmarks --quick` still runs, and every comparison's equality check still holds.

Speed is not asserted (the numbers depend on the machine and its load); correctness of what is
being compared is, so the benchmarks cannot rot into timing two different computations.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_benchmarks_run_and_their_equality_checks_hold(test_ladder: list[str], tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    report = out.read_text() if out.exists() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "❌" not in report
    sections = {part.split(".", 1)[0]: part for part in report.split("\n## ")[1:] if part[:1].isdigit()}
    for n in range(1, 7):
        assert str(n) in sections, f"comparison {n} missing from RESULTS.md"
        # a comparison whose checks went missing rendered "- (none)" and passed: each must check something, and pass it
        assert "- ✅ " in sections[str(n)] and "- (none)" not in sections[str(n)], f"comparison {n} checked nothing"
    assert "| measure | steerscale | peer | ratio | goal |" in report
