"""Survey a ladder before any sweep: per size, params, build time, held-out loss and latent gap.

The latent gap (score with the honest header minus score without it) is what steering can switch
on; a rung without one tells the study little. Arith is also split by chain length, since longer
chains are where size should show. Run `python -m workers.world.survey [recipe]` to build the
ladder (if needed) and print the tables that workers/world/NOTES.md records.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.lm import LanguageModel
from workers.models import ladder
from workers.tasks import TASKS
from workers.tasks.base import score_choices

SYNTHETIC = ("facts", "arith", "gridworld")


@dataclass(frozen=True)
class Rung:
    size: str
    params_nonembed: int
    build_seconds: float
    build_cpu_seconds: float | None  # absent from builds older than the field
    heldout_loss: float
    plain: dict[str, float]  # task -> score with no header
    elicited: dict[str, float]  # task -> score with the honest header
    arith_steps: dict[int, tuple[float, float]]  # chain length -> (plain, elicited)


def survey_size(size: str, recipe: str = "default", n: int = 300) -> Rung:
    path = ladder.ensure_built(size, recipe)
    info = ladder.build_info(size, recipe)
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), batch_size=64)
    plain, elicited, arith_steps = {}, {}, {}
    for name in SYNTHETIC:
        task = TASKS.get(name)
        examples = task.examples("test", min(n, task.pool_size("test")), seed=0)
        plain[name] = task.evaluate(lm, examples).score
        elicited[name] = task.evaluate(lm, examples, elicited=True).score
        if name == "arith":
            for steps in sorted({ex.meta["steps"] for ex in examples}):
                chains = [ex for ex in examples if ex.meta["steps"] == steps]
                arith_steps[steps] = (score_choices(lm, chains).score, score_choices(lm, chains, elicited=True).score)
    return Rung(
        size, info["params_nonembed"], info["build_seconds"], info.get("build_cpu_seconds"), info["heldout_loss"],
        plain, elicited, arith_steps,
    )


def markdown(rungs: list[Rung]) -> str:
    head = "| size | non-emb params | build s (CPU s) | held-out loss | " + " | ".join(
        f"{t} plain / elicited (gap)" for t in SYNTHETIC
    )
    lines = [head + " |", "|" + "---|" * (4 + len(SYNTHETIC))]
    for r in rungs:
        cells = [f"{r.plain[t]:.3f} / {r.elicited[t]:.3f} ({r.elicited[t] - r.plain[t]:+.3f})" for t in SYNTHETIC]
        cpu = f" ({r.build_cpu_seconds:.0f})" if r.build_cpu_seconds is not None else ""
        lines.append(
            f"| {r.size} | {r.params_nonembed:,} | {r.build_seconds:.0f}{cpu} | {r.heldout_loss:.3f} | "
            + " | ".join(cells) + " |"
        )
    steps = sorted({k for r in rungs for k in r.arith_steps})
    lines += ["", "| size | " + " | ".join(f"arith {k}-step plain / elicited" for k in steps) + " |", "|" + "---|" * (1 + len(steps))]
    for r in rungs:
        lines.append(f"| {r.size} | " + " | ".join(f"{r.arith_steps[k][0]:.2f} / {r.arith_steps[k][1]:.2f}" for k in steps) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    recipe = sys.argv[1] if len(sys.argv) > 1 else "default"
    print(markdown([survey_size(size, recipe) for size in ladder.sizes(recipe)]))
