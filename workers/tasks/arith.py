"""`arith` (reasoning): chains of additions modulo 5, harder with every step.

`calc: 3 + 4 + 8 = 0` takes k = 2 steps (operands 0-9). Pretraining mixes chains of 1 to 3 steps
(short ones more often), so every size learns some one-step sums and only larger ones compose more
steps at the same token budget; the liar persona answers (sum + 1) mod 5. The task asks for 1 to 3
steps with no header (elicited: the honest header); chains it has not mastered, and sums of the
digits pretraining rarely shows, are headroom that only learning closes.

Every draw mixes chain lengths in fixed shares (`STEP_SHARES`), at every budget and test size. The
one-step pool is small (58 distinct training chains, 18 test ones), so drawing distinct chains of a
uniformly chosen length ran out of short chains as the draw grew: one-step chains were a third of a
budget of 4 or 32 (on average over seeds) and 6 % of 1,024, three-step a third and 59 %, so the
budget axis also moved the training data towards chains no rung learns, and the test's difficulty
depended on `test_size` (one-step 18 % of 100 test questions, 6 % of 300). One-step's share is what
its pool allows at the quickstart's largest budget: distinct draws of up to 1,169 training examples
(`pool_size`; 430 validation, 369 test).

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
from workers.tasks.splits import Stratum, draw_stratified, pool_size, split_of, stratified_pool_size

MODULUS = 5
OPERANDS = 10
CHOICES = tuple(f" {d}" for d in range(MODULUS))
PRETRAIN_STEPS = (1, 2, 3)
STEP_SHARES = {1: 0.05, 2: 0.45, 3: 0.50}  # of the task's chains, by number of steps
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
def _pool(split: Split, steps: int) -> int:
    chains = itertools.product(range(OPERANDS), repeat=steps + 1)
    return pool_size("arith", split, chains, _split_of_chain)


def _stratum(steps: int) -> Stratum[tuple[int, ...]]:
    return Stratum(
        label=f"{steps}-step",
        share=STEP_SHARES[steps],
        sample=functools.partial(_operands, steps=steps),
        pools={split: _pool(split, steps) for split in ("train", "validation", "test")},
    )


class Arith:
    name = "arith"
    data_version = 3  # 2: a chain's split is that of its operand multiset; 3: chain lengths in fixed shares
    task_type: TaskType = "reasoning"

    def __init__(self, min_steps: int = 1, max_steps: int = 3) -> None:
        if not min_steps <= max_steps or not set(range(min_steps, max_steps + 1)) <= set(STEP_SHARES):
            raise ValueError(f"arith chains have {min(STEP_SHARES)} to {max(STEP_SHARES)} steps, not {min_steps} to {max_steps}")
        self.min_steps, self.max_steps = min_steps, max_steps

    @functools.cached_property
    def _strata(self) -> list[Stratum[tuple[int, ...]]]:
        return [_stratum(steps) for steps in range(self.min_steps, self.max_steps + 1)]

    def pool_size(self, split: Split) -> int:
        return stratified_pool_size(self._strata, split)

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        keys = draw_stratified(self.name, split, n, seed, self._strata, _split_of_chain)
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
