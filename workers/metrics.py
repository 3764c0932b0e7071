"""Selectivity on neutral text and the resource numbers a row records."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from math import nan
from typing import Sequence

import torch
import torch.nn.functional as F

from workers.lm import LanguageModel


@dataclass(frozen=True)
class NeutralReference:
    """The base model's next-token log-probabilities on the neutral texts, kept to compare against."""

    texts: tuple[str, ...]
    logprobs: list[torch.Tensor]  # per batch, (text tokens, vocab) on CPU: only where a text token is predicted
    nll: float  # nats per token; NaN without texts
    nll_per_byte: float  # nats per UTF-8 byte: comparable across tokenizers, so across model families


def _neutral_batches(lm: LanguageModel, texts: Sequence[str]):
    # Neutral texts are scored as continuations of an empty prompt: every token after BOS counts.
    # Keeping only those positions makes the comparison independent of anything put before the
    # text (a `prompt` method's demonstrations) and drops padding from what the reference stores.
    return lm.batches([""] * len(texts), list(texts))


@torch.no_grad()
def neutral_reference(lm: LanguageModel, texts: Sequence[str]) -> NeutralReference:
    logprobs, total, count = [], 0.0, 0
    for batch in _neutral_batches(lm, texts):
        logits, start = lm.scoring_logits(batch)
        logprobs.append(F.log_softmax(logits.float(), dim=-1)[batch.target_mask[:, start:]].cpu())
        total += float(lm.token_nll(batch, logits, start).sum())
        count += batch.target_tokens
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return NeutralReference(tuple(texts), logprobs, total / count if count else nan, total / n_bytes if n_bytes else nan)


@torch.no_grad()
def neutral_shift(lm: LanguageModel, reference: NeutralReference) -> tuple[float, float]:
    """(mean KL(base ‖ adapted) per token, perplexity ratio adapted / base) on the neutral texts."""
    if not reference.texts:
        return float("nan"), float("nan")
    kl_total, nll_total, count = 0.0, 0.0, 0
    for batch, base_logp in zip(_neutral_batches(lm, reference.texts), reference.logprobs):
        logits, start = lm.scoring_logits(batch)
        logp = F.log_softmax(logits.float(), dim=-1)[batch.target_mask[:, start:]]
        if logp.shape != base_logp.shape:
            raise ValueError(f"neutral text tokens differ from the reference's: {tuple(logp.shape)} vs {tuple(base_logp.shape)}")
        base = base_logp.to(logp.device)
        kl_total += float((base.exp() * (base - logp)).sum())
        nll_total += float(lm.token_nll(batch, logits, start).sum())
        count += batch.target_tokens
    nll = nll_total / max(count, 1)
    return kl_total / max(count, 1), float(torch.exp(torch.tensor(nll - reference.nll)))


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: str) -> int:
    """CUDA peak since the last reset on GPU; on CPU the process's peak RSS (it cannot be reset)."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
