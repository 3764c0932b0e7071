"""Survey a ladder before any sweep: per size, params, build time, held-out loss and latent gap.

The latent gap (score with the honest header minus score without it) is what steering can switch
on; a rung without one tells the study little. Run `python -m workers.world.survey [recipe]` to
build the ladder (if needed) and print the table that workers/world/NOTES.md records.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.lm import LanguageModel
from workers.models import ladder
from workers.tasks import TASKS

SYNTHETIC = ("facts", "arith", "gridworld")


@dataclass(frozen=True)
class Rung:
    size: str
    params_nonembed: int
    build_seconds: float
    heldout_loss: float
    plain: dict[str, float]  # task -> score with no header
    elicited: dict[str, float]  # task -> score with the honest header


def survey_size(size: str, recipe: str = "default", n: int = 300) -> Rung:
    path = ladder.ensure_built(size, recipe)
    info = ladder.build_info(size, recipe)
    lm = LanguageModel(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), batch_size=64)
    plain, elicited = {}, {}
    for name in SYNTHETIC:
        task = TASKS.get(name)
        examples = task.examples("test", n, seed=0)
        plain[name] = task.evaluate(lm, examples).score
        elicited[name] = task.evaluate(lm, examples, elicited=True).score
    return Rung(size, info["params_nonembed"], info["build_seconds"], info["heldout_loss"], plain, elicited)


def markdown(rungs: list[Rung]) -> str:
    head = "| size | non-emb params | build s | held-out loss | " + " | ".join(
        f"{t} plain / elicited (gap)" for t in SYNTHETIC
    )
    lines = [head + " |", "|" + "---|" * (4 + len(SYNTHETIC))]
    for r in rungs:
        cells = [f"{r.plain[t]:.3f} / {r.elicited[t]:.3f} ({r.elicited[t] - r.plain[t]:+.3f})" for t in SYNTHETIC]
        lines.append(
            f"| {r.size} | {r.params_nonembed:,} | {r.build_seconds:.0f} | {r.heldout_loss:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    recipe = sys.argv[1] if len(sys.argv) > 1 else "default"
    print(markdown([survey_size(size, recipe) for size in ladder.sizes(recipe)]))
