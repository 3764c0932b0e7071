"""RESULTS.md: the machine, the library versions, the exact settings, then one table per comparison."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from benchmarks.common import Result

CHANGES = Path(__file__).with_name("CHANGES.md")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "ray", "numpy", "scipy", "pyarrow")


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem_kib = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return {
        "cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{mem_kib / 2**20:.1f} GiB", "os": platform.platform(),
        "python": platform.python_version(), "load average (1/5/15 min)": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }  # fmt: skip


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_sha() -> str:
    # "-dirty": a run on an edited tree is not credited to the clean commit
    done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, cwd=Path(__file__).parent, check=False)
    return done.stdout.strip() or "unknown"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(results: list[tuple[Result, float]], *, quick: bool, sha: str) -> str:
    lines = [
        "# steerscale benchmarks",
        "",
        f"Written by `python -m benchmarks{' --quick' if quick else ''}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} "
        f"at git {sha} (the commit checked out when it began). Every number in the sections up to \"What changed\" was measured by that run; "
        "nothing there is copied in by hand.",
        "",
        "Timings are medians over repeats with the min–max spread and the median process CPU time; runs of the two "
        "sides alternate (in flipping order) so that load from other processes on this shared machine hits both alike. "
        "Ratios > 1× mean steerscale is faster.",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        "",
        "## Libraries (main venv)",
        "",
        *(f"- {k} {v}" for k, v in versions().items()),
        "",
    ]
    for result, seconds in results:
        lines += [f"## {result.title}", "", f"Settings: `{json.dumps(result.settings, default=str)}`  (ran {seconds:.0f} s)", ""]
        lines += ["Equality checks:", ""]
        lines += [f"- {'✅' if c.ok else '❌'} {_cell(c.what)}: {_cell(c.value)}" for c in result.checks] or ["- (none)"]
        if result.rows:
            lines += ["", "| measure | steerscale | peer | ratio | goal |", "|---|---|---|---|---|"]
            lines += [f"| {_cell(r.measure)} | {_cell(r.steerscale)} | {_cell(r.peer)} | {_cell(r.ratio)} | {_cell(r.goal)} |" for r in result.rows]
        if result.notes:
            lines += ["", *(f"- {_cell(n)}" for n in result.notes)]
        lines.append("")
    if CHANGES.exists():  # the hand-written log of fixes, with their before/after runs
        lines += ["## What changed (benchmarks/CHANGES.md, written by hand; not measured by this run)", "", CHANGES.read_text()]
    return "\n".join(lines)


def write_results(path: Path, results: list[tuple[Result, float]], *, quick: bool, sha: str) -> None:
    """`sha`: read when the run began, so a commit made while it runs is not credited with its numbers. The folder is
    made if missing: a run of many minutes must not end on a typo'd --out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results, quick=quick, sha=sha))
