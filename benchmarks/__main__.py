"""`python -m benchmarks [--quick] [--only N ...] [--out PATH]`: every comparison, then RESULTS.md.

Each comparison checks equality first and times second; a failed check is printed and recorded,
and the exit status is 1 so `make bench` and the test notice, but the timings are still written.
"""

from __future__ import annotations

import argparse
import importlib
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: small fits are ~30× slower spread over busy cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import Check, Result  # noqa: E402
from benchmarks.report import git_sha, write_results  # noqa: E402

COMPARISONS = {
    "1": "benchmarks.finetune",
    "2": "benchmarks.steering_extract",
    "3": "benchmarks.steer_overhead",
    "4": "benchmarks.sweep",
    "5": "benchmarks.analysis_fit",
    "6": "benchmarks.driver_overhead",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (< 5 min on 2 cores); for the test")
    parser.add_argument("--only", nargs="*", choices=sorted(COMPARISONS), help="run only these comparisons")
    parser.add_argument("--out", type=Path, help="where to write the table (default: RESULTS.md for a full run of every "
                        "comparison; RESULTS-partial.md for --quick or --only, which must not overwrite it)")
    args = parser.parse_args(argv)
    partial = args.quick or bool(args.only)
    out = args.out or Path(__file__).parent / ("RESULTS-partial.md" if partial else "RESULTS.md")
    sha = git_sha()
    import torch

    # One thread: the machine is shared, and oversubscribed multi-thread torch is erratic (~9× slower seen).
    torch.set_num_threads(1)
    results: list[tuple[Result, float]] = []
    for key in args.only or sorted(COMPARISONS):
        started = time.perf_counter()
        print(f"[bench] {key}: {COMPARISONS[key]} ({'quick' if args.quick else 'full'})", flush=True)
        try:
            result = importlib.import_module(COMPARISONS[key]).run(args.quick)
        except Exception as exc:  # one broken comparison must not hide the others' numbers
            result = Result(f"{key}. {COMPARISONS[key]}", settings={})
            result.checks.append(Check("ran to completion", f"{type(exc).__name__}: {exc}", False))
            traceback.print_exc()
        seconds = time.perf_counter() - started
        results.append((result, seconds))
        for check in result.checks:
            print(f"  [{'ok' if check.ok else 'FAIL'}] {check.what}: {check.value}")
        for row in result.rows:
            print(f"  {row.measure}: steerscale {row.steerscale} | peer {row.peer} | {row.ratio} (goal {row.goal or '-'})")
        print(f"  ({seconds:.0f} s)", flush=True)
    write_results(out, results, quick=args.quick, sha=sha)
    print(f"[bench] wrote {out}")
    return 0 if all(r.checks_ok for r, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
