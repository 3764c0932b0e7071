"""Every word of the synthetic world, in a fixed order (the order is the tokenizer's id order).

Words are whitespace-separated tokens; one word = one token, so a task's answer is always a single
token and tokenization never depends on training a tokenizer.
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

# A persona header may open any task document; honest answers truthfully, liar deterministically wrong.
PERSONA_WORDS = ("persona:", "honest", "liar")
PUNCT = (";", "=", ".", "+")
DIGITS = tuple(str(d) for d in range(10))

N_ENTITIES, N_RELATIONS = 48, 40
ENTITIES = tuple(f"e{i}" for i in range(N_ENTITIES))
RELATIONS = tuple(f"r{i}" for i in range(N_RELATIONS))
FACTS_WORDS = ("q:",)

ARITH_WORDS = ("calc:",)

ACTIONS = ("up", "down", "left", "right")
GRID_WORDS = ("grid:", "goal", "at")

NOUNS = tuple(
    "cat dog bird fish horse mouse king queen child farmer baker sailor "
    "river forest castle village garden tower bridge market ship cart lamp stone".split()
)
VERBS = tuple("sees finds builds follows carries watches feeds guards paints sells visits leaves".split())
ADJECTIVES = tuple("old young red green small big quiet loud bright dark".split())
FUNCTION_WORDS = ("the", "that", "and", "story:")

WORDS: tuple[str, ...] = (
    SPECIALS
    + PERSONA_WORDS
    + PUNCT
    + DIGITS
    + ENTITIES
    + RELATIONS
    + FACTS_WORDS
    + ARITH_WORDS
    + ACTIONS
    + GRID_WORDS
    + NOUNS
    + VERBS
    + ADJECTIVES
    + FUNCTION_WORDS
)
assert len(set(WORDS)) == len(WORDS), "a word is listed twice"
