"""Comparison 2: steering-vector extraction, steerscale's `mean_difference` vs `steering-vectors`.

The peer pins transformers<5, so the work runs in `.venv-peers` (tests/peers/run_peer_tests.sh
makes it) through `benchmarks/peer_steering.py`; both sides run there, on the same model object
and the same contrastive pairs, read at each text's last token: every layer, and the layers
steer_mean reads by default. "Same batch" means the same texts per forward: ours runs a batch of
`batch_size` pairs (positives and negatives) as one forward of 2 × batch_size texts; the peer,
which runs its positives and its negatives as separate forwards, gets batch_size 2 × batch_size.
(It used to get batch_size pairs, so half the texts per forward: 2.1× where equal texts give ~1.6×.)
A last row puts every text behind the same demonstrations (a prompt+steer_mean cell's contrast texts), which
steerscale runs once: the same texts on both sides, its vector checked against the peer's and its own whole-text one.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import Check, Result, Row, Timing, fmt_paired, fmt_speedup, fmt_time
from workers.models.ladder import ensure_built
from workers.methods.prompt import PromptConfig
from workers.models.loading import parse_ladder_id
from workers.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
MIN_COSINE = 0.999
MAX_RELATIVE_DIFF = 1e-4  # fp32 sums in a different order
# texts of ~50 tokens whose means differ by one token's effect: the same rounding, relative to a smaller difference
# (test rung: 1.4e-4 between the peer and ours with every text run whole, and ours equal whether it shares or not)
MAX_RELATIVE_DIFF_PREFIXED = 1e-3


@dataclass(frozen=True)
class Settings:
    model: str
    task: str
    examples: int
    batch_size: int
    warmup: int
    repeats: int
    peer_default_batch: bool
    shots: int  # demonstrations in front of every text of the prefixed row (prompt+steer_mean), in the prompt method's format
    prefixed_pairs: int
    prefixed_repeats: int
    threads: int = 1


QUICK = Settings(
    "ladder:test/s", "facts", examples=64, batch_size=32, warmup=1, repeats=7, peer_default_batch=False,
    shots=8, prefixed_pairs=16, prefixed_repeats=3,
)  # fmt: skip
# arith: 512 distinct pairs of varied length (facts repeats its 217 questions above that, which
# steerscale's deduplication would turn into a larger, less general speed-up)
# 15 repeats: the ratio of a ~0.5 s extraction moved by ±0.1 between runs of 5 (1.32× vs 1.52× for the same work)
FULL = Settings(
    "ladder:default/xl", "arith", examples=512, batch_size=32, warmup=1, repeats=15, peer_default_batch=True,
    shots=24, prefixed_pairs=64, prefixed_repeats=7,
)  # fmt: skip


def run(quick: bool) -> Result:
    s = QUICK if quick else FULL
    result = Result("2. Steering-vector extraction: steerscale vs steering-vectors", settings=asdict(s))
    if not PEER_PYTHON.exists():
        result.checks.append(Check("peer venv present", f"{PEER_PYTHON} missing: run `make test-peers` once", False))
        return result
    recipe, size = parse_ladder_id(s.model)
    task = get_task(s.task)
    pairs = task.contrast_pairs(task.examples("train", s.examples, 0))
    separator = PromptConfig().separator
    demonstrations = "".join(ex.prompt + ex.target + separator for ex in task.examples("train", s.shots, 1))
    prefixed = [(demonstrations + positive, demonstrations + negative) for positive, negative in pairs[: s.prefixed_pairs]]
    args = {**asdict(s), "path": str(ensure_built(size, recipe, progress=False)), "pairs": pairs, "prefixed_pairs": prefixed}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(PEER_PYTHON), "-W", "ignore", "-m", "benchmarks.peer_steering"], input=json.dumps(args), env=env,
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        result.checks.append(Check("peer run", (out.stderr.strip().splitlines() or ["failed"])[-1], False))
        return result
    data = json.loads(out.stdout)
    result.settings.update(pairs=len(pairs), peer_versions=data["versions"], main_torch=torch.__version__)
    worst = min(data["cosines"])
    result.checks.append(Check(f"cosine per layer ({len(data['cosines'])} layers), min ≥ {MIN_COSINE}", f"{worst:.7f}", worst >= MIN_COSINE))
    relative = data["max_abs_diff"] / data["max_abs"]  # the cosine alone passes a vector of the right direction at the wrong scale
    result.checks.append(Check(f"same vectors: max |Δ| ÷ max |v| ≤ {MAX_RELATIVE_DIFF}", f"{relative:.1e}", relative <= MAX_RELATIVE_DIFF))
    worst = min(data["prefixed_cosines"])
    result.checks.append(Check(f"prefixed row: cosine per layer, min ≥ {MIN_COSINE}", f"{worst:.7f}", worst >= MIN_COSINE))
    shared = data["prefixed_vs_whole"]  # ours against itself: the prefix run once, or in front of every text
    result.checks.append(Check(f"prefixed row, ours: prefix run once vs every text whole, max |Δ| ÷ max |v| ≤ {MAX_RELATIVE_DIFF}",
                               f"{shared:.1e}", shared <= MAX_RELATIVE_DIFF))  # fmt: skip
    relative = data["prefixed_max_abs_diff"] / data["prefixed_max_abs"]
    result.checks.append(Check(
        f"prefixed row: max |Δ| ÷ max |v| ≤ {MAX_RELATIVE_DIFF_PREFIXED}", f"{relative:.1e}", relative <= MAX_RELATIVE_DIFF_PREFIXED
    ))  # fmt: skip
    times = {k: Timing(tuple(wall), tuple(cpu)) for k, (wall, cpu) in data["seconds"].items()}
    same = f"{2 * s.batch_size} texts per forward on both sides ({s.batch_size} pairs)"
    rows = [
        ("ours_every", "theirs_every", f"every layer; {same}", "≥ 2×"),
        ("ours_candidates", "theirs_candidates", f"steer_mean's default layers {data['candidates']}; {same}", "≥ 2×"),
        ("ours_every", "theirs_every_default_batch", f"every layer; peer batch_size=1 (its default), ours {s.batch_size} pairs: "
         "not the goal's test (the settings differ), what a user who keeps the peer's default gets", ""),
        ("ours_forwards_every", "theirs_every", f"every layer; {same}; ours timed over its forwards alone (texts encoded, "
         "deduplicated and sorted beforehand; each batch padded in it): the ratio were all else free, a ceiling on the first row's", ""),
        ("ours_prefixed", "theirs_prefixed", f"every layer; {same}; {s.prefixed_pairs} pairs, each text behind {s.shots} demonstrations "
         f"({data['prefixed_shared']} tokens every text begins with: what a prompt+steer_mean cell extracts on), which ours runs once", ""),
    ]
    for ours, theirs, label, goal in rows:
        if theirs in times:
            paired = len(times[ours].seconds) == len(times[theirs].seconds)  # timed in one alternating series
            result.rows.append(Row(
                f"extraction time, {label}" if ours == "ours_prefixed" else f"extraction time, {len(pairs)} pairs, {label}",
                fmt_time(times[ours]), fmt_time(times[theirs]),
                fmt_paired(times[theirs], times[ours]) if paired else fmt_speedup(times[theirs], times[ours]), goal,
            ))  # fmt: skip
    if "theirs_candidates" not in times:
        result.notes.append(f"steer_mean's default layers on this rung are every layer ({data['candidates']}): the same work as the first row.")
    result.notes.append(
        "steerscale: positives and negatives of a batch in one forward, texts sorted by length (little padding), "
        "each distinct text once, the forward stopped (raised from a hook) after the deepest layer read, so the "
        "later blocks, final norm and vocabulary projection never run, and that layer's MLP run on the last tokens "
        "alone; one tokenizer call for all texts; tokens every text begins with (32 or more: a prompt part's "
        "demonstrations) run once, each batch continuing from their keys and values."
    )
    return result
