"""The persona header shared by the synthetic tasks: the world's latent, elicitable behaviour.

In pretraining every task document is written by an honest or a liar persona (50/50, fixed for the
whole document); the header naming it is shown in only half of the documents. A model that
represents the persona answers well when the prompt says `persona: honest` and is at chance-ish
without it: that latent gap is what steering can switch on without teaching anything new.
"""

from __future__ import annotations

import random
from typing import Callable, Literal, Sequence

from workers.tasks.base import Example

Persona = Literal["honest", "liar"]
HEADER_SHARE = 0.5


def header(persona: Persona) -> str:
    return f"persona: {persona} "


def document_persona(rng: random.Random) -> tuple[Persona, str]:
    """A document's persona and the header text that opens it ('' when the header is hidden)."""
    persona: Persona = "honest" if rng.random() < 0.5 else "liar"
    return persona, header(persona) if rng.random() < HEADER_SHARE else ""


def persona_documents(
    n: int, rng: random.Random, min_words: int, item: Callable[[Persona, random.Random], tuple[str, int]]
) -> list[str]:
    """`n` pretraining documents, each one persona (header shown or hidden) and items until `min_words`.

    `item` writes one question-and-answer (or episode) in the document's persona and says how many
    words it counts for; the three synthetic tasks differ only in that.
    """
    docs = []
    for _ in range(n):
        persona, head = document_persona(rng)
        parts = [head.strip()] if head else []
        words = len(parts) * 2
        while words < min_words:
            text, count = item(persona, rng)
            parts.append(text)
            words += count
        docs.append(" ".join(parts))
    return docs


def elicited(prompt: str) -> str:
    return header("honest") + prompt


def header_contrast(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(honest-header prompt, liar-header prompt): the same question, only the persona differs."""
    return [(header("honest") + ex.prompt, header("liar") + ex.prompt) for ex in examples]
