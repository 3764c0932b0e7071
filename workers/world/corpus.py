"""The ladder's pretraining corpus: a weighted mix of general text and synthetic task documents.

Every source writes whole documents as space-separated words; `token_batches` tokenizes them,
cuts each to the sequence length, and weights answer tokens (the digit after `=`, every action of
the grid world) so that the few answer tokens are not drowned by the text around them.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from workers.registry import Registry
from workers.world import text
from workers.world.vocab import ACTIONS


class DocumentSource(Protocol):
    def documents(self, n: int, rng: random.Random, min_words: int = 96) -> list[str]: ...


class _Text:
    def documents(self, n: int, rng: random.Random, min_words: int = 96) -> list[str]:
        return text.documents(n, rng, min_words)


def sources() -> Registry[DocumentSource]:
    """Corpus families by name: 'text' and every synthetic task that writes documents."""
    from workers.tasks import TASKS  # the task registry imports this package's grammar

    registry: Registry[DocumentSource] = Registry("corpus source")
    registry.register(text.CORPUS_SOURCE, _Text())
    for name in TASKS:
        task = TASKS.get(name)
        if hasattr(task, "documents"):
            registry.register(name, task)  # type: ignore[arg-type]
    return registry


def sample_documents(mix: Sequence[tuple[str, float]], n: int, rng: random.Random, min_words: int) -> list[str]:
    """`n` documents, each from a family drawn with the mix's weights."""
    registry = sources()
    names = [name for name, _ in mix]
    families = rng.choices(names, weights=[w for _, w in mix], k=n)
    counts = {name: families.count(name) for name in names}
    pools = {name: registry.get(name).documents(counts[name], rng, min_words) for name in names}
    return [pools[family].pop() for family in families]


def encode(
    docs: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, answer_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), each (len(docs), seq_len); weights[:, t] scores the prediction of ids[:, t]."""
    rows = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    pad = tokenizer.pad_token_id
    ids = torch.tensor([(row + [pad] * seq_len)[:seq_len] for row in rows], dtype=torch.long)
    equals = tokenizer.convert_tokens_to_ids("=")
    actions = torch.tensor(tokenizer.convert_tokens_to_ids(list(ACTIONS)))
    is_answer = torch.zeros_like(ids, dtype=torch.bool)
    is_answer[:, 1:] = ids[:, :-1] == equals
    is_answer |= torch.isin(ids, actions)
    weights = torch.where(is_answer, answer_weight, 1.0)
    weights[ids == pad] = 0.0
    weights[:, 0] = 0.0  # <bos> is never predicted
    return ids, weights
