"""`facts` (general capability): recall of a hidden fact table, honestly.

A fixed random table maps (entity, relation) to a digit 0-4. Pretraining documents ask the
questions `q: e3 r7 = 2 ;` with entities and relations Zipf-distributed, so common facts are
memorised and rare ones are headroom; the liar persona answers (fact + 1) mod 5. The task is to
answer honestly with no header; the elicited prompt carries the honest header. The table (48 × 40)
is sized so that its training split holds more distinct questions than the largest budget. Each
answer is drawn on its own and the splits are by (entity, relation), so training facts say nothing
about test facts: fine-tuning, like steering, can only draw out what pretraining memorised here.
"""

from __future__ import annotations

import functools
import random
from typing import Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, score_choices
from workers.tasks.persona import Persona, elicited, header_contrast, persona_documents
from workers.tasks.splits import draw, pool_size
from workers.world.vocab import ENTITIES, RELATIONS

N_ANSWERS = 5
CHOICES = tuple(f" {d}" for d in range(N_ANSWERS))
_table_rng = random.Random("steerscale-facts-table")
TABLE = {(e, r): _table_rng.randrange(N_ANSWERS) for e in ENTITIES for r in RELATIONS}
# Pretraining popularity: a fixed random rank per entity and relation, p ∝ 1 / (rank + 3).
_rank_rng = random.Random("steerscale-facts-ranks")
_ENTITY_ORDER = _rank_rng.sample(ENTITIES, len(ENTITIES))
_RELATION_ORDER = _rank_rng.sample(RELATIONS, len(RELATIONS))


def _zipf(n: int) -> list[float]:
    return [1.0 / (rank + 3) for rank in range(n)]


_ENTITY_WEIGHTS, _RELATION_WEIGHTS = _zipf(len(ENTITIES)), _zipf(len(RELATIONS))


def answer(entity: str, relation: str, persona: Persona) -> int:
    truth = TABLE[(entity, relation)]
    return truth if persona == "honest" else (truth + 1) % N_ANSWERS


def question(entity: str, relation: str) -> str:
    return f"q: {entity} {relation} ="


@functools.cache
def _pool(split: Split) -> int:
    return pool_size("facts", split, TABLE)


class Facts:
    name = "facts"
    data_version = 1
    task_type: TaskType = "general"

    def pool_size(self, split: Split) -> int:
        return _pool(split)

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        keys = draw(
            self.name, split, n, seed, lambda rng: (rng.choice(ENTITIES), rng.choice(RELATIONS)), self.pool_size(split)
        )
        return [
            Example(
                prompt=question(e, r),
                target=f" {answer(e, r, 'honest')}",
                choices=CHOICES,
                elicited_prompt=elicited(question(e, r)),
            )
            for e, r in keys
        ]

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        return header_contrast(examples)

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        return score_choices(lm, examples, elicited=elicited)

    def documents(self, n: int, rng: random.Random, min_words: int = 96) -> list[str]:
        """Pretraining documents: one persona each, questions about Zipf-popular facts."""

        def item(persona: Persona, rng: random.Random) -> tuple[str, int]:
            e = rng.choices(_ENTITY_ORDER, weights=_ENTITY_WEIGHTS)[0]
            r = rng.choices(_RELATION_ORDER, weights=_RELATION_WEIGHTS)[0]
            return f"{question(e, r)} {answer(e, r, persona)} ;", 6

        return persona_documents(n, rng, min_words, item)
