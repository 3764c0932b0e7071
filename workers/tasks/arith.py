"""`arith` (reasoning): chains of additions modulo 5, harder with every step.

`calc: 3 + 4 + 8 = 0` takes k = 2 steps (operands 0-9). Pretraining mixes chains of 1 to 3 steps
(short ones more often), so every size learns some one-step sums and only larger ones compose more
steps at the same token budget; the liar persona answers (sum + 1) mod 5. The task asks for 1 to 3
steps with no header (elicited: the honest header); chains it has not mastered, and sums of the
digits pretraining rarely shows, are headroom that only learning closes.

Pretraining operands are Zipf-skewed (p ∝ 1 / (rank + 0.5) over a fixed digit order), evaluation
operands uniform. With uniform operands the answer does not depend on any one operand alone (the
parity problem), so training sits on a plateau: no rung of the default ladder left it within its
budget. Skewed operands give a first-order signal to follow.
"""

from __future__ import annotations

import functools
import itertools
import random
from typing import Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, score_choices
from workers.tasks.persona import Persona, elicited, header_contrast, persona_documents
from workers.tasks.splits import draw, pool_size, split_of

MODULUS = 5
OPERANDS = 10
CHOICES = tuple(f" {d}" for d in range(MODULUS))
PRETRAIN_STEPS = (1, 2, 3)
PRETRAIN_STEP_WEIGHTS = (0.6, 0.25, 0.15)
_PRETRAIN_DIGITS = random.Random("steerscale-arith-digits").sample(range(OPERANDS), OPERANDS)
_PRETRAIN_WEIGHTS = [1.0 / (rank + 0.5) for rank in range(OPERANDS)]


def answer(operands: Sequence[int], persona: Persona) -> int:
    total = sum(operands) % MODULUS
    return total if persona == "honest" else (total + 1) % MODULUS


def question(operands: Sequence[int]) -> str:
    return "calc: " + " + ".join(str(d) for d in operands) + " ="


def _operands(rng: random.Random, steps: int) -> tuple[int, ...]:
    return tuple(rng.randrange(OPERANDS) for _ in range(steps + 1))


def _pretraining_operands(rng: random.Random, steps: int) -> tuple[int, ...]:
    return tuple(rng.choices(_PRETRAIN_DIGITS, weights=_PRETRAIN_WEIGHTS, k=steps + 1))


def _split_of_chain(operands: tuple[int, ...]) -> Split:
    """A chain's split is that of its operands as a multiset: `4 + 3` is never in train while `3 + 4` is in test."""
    return split_of("arith", tuple(sorted(operands)))


@functools.cache
def _pool(split: Split, min_steps: int, max_steps: int) -> int:
    chains = (ops for steps in range(min_steps, max_steps + 1) for ops in itertools.product(range(OPERANDS), repeat=steps + 1))
    return pool_size("arith", split, chains, _split_of_chain)


class Arith:
    name = "arith"
    data_version = 2  # 2: a chain's split is that of its operand multiset
    task_type: TaskType = "reasoning"

    def __init__(self, min_steps: int = 1, max_steps: int = 3) -> None:
        self.min_steps, self.max_steps = min_steps, max_steps

    def pool_size(self, split: Split) -> int:
        return _pool(split, self.min_steps, self.max_steps)

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        def sample(rng: random.Random) -> tuple[int, ...]:
            return _operands(rng, rng.randint(self.min_steps, self.max_steps))

        keys = draw(self.name, split, n, seed, sample, self.pool_size(split), _split_of_chain)
        return [
            Example(
                prompt=question(ops),
                target=f" {answer(ops, 'honest')}",
                choices=CHOICES,
                elicited_prompt=elicited(question(ops)),
                meta={"steps": len(ops) - 1},
            )
            for ops in keys
        ]

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        return header_contrast(examples)

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        return score_choices(lm, examples, elicited=elicited)

    def documents(self, n: int, rng: random.Random, min_words: int = 96) -> list[str]:
        """Pretraining documents: one persona each, chains of mixed length over skewed digits."""

        def item(persona: Persona, rng: random.Random) -> tuple[str, int]:
            ops = _pretraining_operands(rng, rng.choices(PRETRAIN_STEPS, weights=PRETRAIN_STEP_WEIGHTS)[0])
            return f"{question(ops)} {answer(ops, persona)} ;", 2 * len(ops) + 3

        return persona_documents(n, rng, min_words, item)
