"""General text: a small grammar with hidden selectional preferences, for loss that falls with size.

Each noun takes a few verbs and each verb a few objects and adjectives, drawn once from a fixed seed;
relative clauses make the main verb depend on a subject several tokens back. A bigger model learns
more of these tables and dependencies, so held-out loss on this text keeps moving with size. The
same grammar, sampled from a separate stream, is the neutral text of the selectivity metrics.
"""

from __future__ import annotations

import random

from workers.world.vocab import ADJECTIVES, NOUNS, VERBS

CORPUS_SOURCE = "text"  # this grammar's name among the ladder corpus's sources, beside the tasks that write documents

_TABLES = random.Random("steerscale-text-grammar")
VERBS_OF = {n: tuple(_TABLES.sample(VERBS, 3)) for n in NOUNS}
OBJECTS_OF = {v: tuple(_TABLES.sample(NOUNS, 4)) for v in VERBS}
ADJECTIVES_OF = {n: tuple(_TABLES.sample(ADJECTIVES, 2)) for n in NOUNS}


def _noun_phrase(noun: str, rng: random.Random) -> list[str]:
    return ["the", rng.choice(ADJECTIVES_OF[noun]), noun] if rng.random() < 0.4 else ["the", noun]


def sentence(rng: random.Random) -> list[str]:
    """'the [adj] N [that V N] V N .' with the main verb chosen by the subject N."""
    subject = rng.choice(NOUNS)
    words = _noun_phrase(subject, rng)
    if rng.random() < 0.4:
        inner = rng.choice(VERBS_OF[subject])
        words += ["that", inner, *_noun_phrase(rng.choice(OBJECTS_OF[inner]), rng)]
    verb = rng.choice(VERBS_OF[subject])
    obj = rng.choice(OBJECTS_OF[verb])
    words += [verb, *_noun_phrase(obj, rng)]
    if rng.random() < 0.3:
        verb2 = rng.choice(VERBS_OF[subject])
        words += ["and", verb2, *_noun_phrase(rng.choice(OBJECTS_OF[verb2]), rng)]
    return words + ["."]


def documents(n: int, rng: random.Random, min_words: int = 96) -> list[str]:
    """`n` stories of at least `min_words` words each."""
    docs = []
    for _ in range(n):
        words = ["story:"]
        while len(words) < min_words:
            words += sentence(rng)
        docs.append(" ".join(words))
    return docs
