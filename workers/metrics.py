"""Selectivity on neutral text and the resource numbers a row records."""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from math import exp, inf, nan
from typing import Sequence

import torch
import torch.nn.functional as F

from workers.lm import EncodedPair, LanguageModel


@dataclass(frozen=True)
class NeutralReference:
    """The base model's next-token log-probabilities on the neutral texts, kept to compare against."""

    texts: tuple[str, ...]
    logprobs: list[torch.Tensor]  # per text, (text tokens, vocab) on CPU: only where a text token is predicted
    nll: float  # nats per token; NaN without texts
    nll_per_byte: float  # nats per UTF-8 byte: comparable across tokenizers, so across model families

    @property
    def nbytes(self) -> int:
        """Host memory the log-probs take (~0.1 GB per 1000 tokens at a 150k vocabulary)."""
        return sum(t.numel() * t.element_size() for t in self.logprobs)


def neutral_context(lm: LanguageModel) -> str:
    """What every neutral text follows, so that the plain model predicts each of its tokens: nothing after
    a tokenizer's BOS; where a tokenizer adds none (GPT-2, Pythia, Qwen), its end-of-text token, as
    lm-eval's rolling log-likelihood does. Scoring every token on every family keeps nats per byte
    comparable across them (without it, a BOS-less model left out its hardest token, a text's first,
    and looked more capable on the `neutral_loss` axis), and a `prompt` method's demonstrations
    before the context change what predicts the text, not which of its tokens are scored."""
    with lm.unprefixed():
        if lm.encode([""], prompt=True)[0]:  # a BOS (an EOS a tokenizer appends is no context: `encode` leaves it out)
            return ""
    eos = lm.tokenizer.eos_token
    if eos is None or lm.tokenizer(eos, add_special_tokens=False)["input_ids"] != [lm.tokenizer.eos_token_id]:
        raise ValueError(
            f"{type(lm.tokenizer).__name__} adds no BOS and has no end-of-text token to start a neutral text with, "
            "so a text's first token could not be scored; set eval.neutral_size: 0 to measure no neutral shift"
        )
    return eos


def _neutral_pairs(lm: LanguageModel, texts: Sequence[str]) -> list[EncodedPair]:
    """The texts as continuations of `neutral_context`, scored at every text token. Keeping only those
    positions makes the comparison independent of anything put before the text (a `prompt` method's
    demonstrations) and drops padding from what the reference stores."""
    return lm.encode_pairs([neutral_context(lm)] * len(texts), list(texts))


def _scored(lm: LanguageModel, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The pairs' log-probs (text tokens, vocab) on the model's device, summed NLL per text, tokens per text."""
    batch = lm.collate(pairs)
    logits = lm.scoring_logits(batch)
    return F.log_softmax(logits.float(), dim=-1), lm.row_sums(batch, lm.token_nll(batch, logits)), batch.target_mask.sum(-1).tolist()


@torch.no_grad()
def neutral_reference(lm: LanguageModel, texts: Sequence[str]) -> NeutralReference:
    """The base model's reference, kept per text so that `neutral_shift` may batch the texts otherwise
    (`LanguageModel.in_batches` halves a batch that runs out of memory)."""
    pairs = _neutral_pairs(lm, texts)

    def per_text(rows: slice) -> list[tuple[torch.Tensor, float, int]]:
        logprobs, nll, tokens = _scored(lm, pairs[rows])
        return list(zip(logprobs.cpu().split(tokens), nll.tolist(), tokens))

    scores = lm.in_batches(len(pairs), per_text)
    total, count = sum(nll for _, nll, _ in scores), sum(tokens for _, _, tokens in scores)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return NeutralReference(tuple(texts), [logp for logp, _, _ in scores], total / count if count else nan, total / n_bytes if n_bytes else nan)


@torch.no_grad()
def neutral_shift(lm: LanguageModel, reference: NeutralReference) -> tuple[float, float]:
    """(mean KL(base ‖ adapted) per token, perplexity ratio adapted / base) on the neutral texts."""
    if not reference.texts:
        return float("nan"), float("nan")
    pairs = _neutral_pairs(lm, reference.texts)

    def summed(rows: slice) -> list[tuple[float, float, int]]:
        logprobs, nll, tokens = _scored(lm, pairs[rows])
        kl = 0.0
        for logp, base in zip(logprobs.split(tokens), reference.logprobs[rows], strict=True):  # text by text: no copy of the batch's
            if logp.shape != base.shape:
                raise ValueError(f"neutral text tokens differ from the reference's: {tuple(logp.shape)} vs {tuple(base.shape)}")
            base = base.to(logp.device)
            kl += float((base.exp() * (base - logp)).sum())
        return [(kl, float(nll.sum()), sum(tokens))]

    sums = lm.in_batches(len(pairs), summed)
    kl_total, nll_total, count = (sum(column) for column in zip(*sums))
    nll = nll_total / max(count, 1)
    rise = nll - reference.nll  # in Python floats: torch's fp32 exp overflowed past 88 nats, math.exp raises past 709
    return kl_total / max(count, 1), exp(rise) if rise < 709 else inf


_PROC = "/proc/self"  # Linux: the resident-set high-water mark can be read and reset per process


def reset_peak_memory(device: str) -> None:
    """Start a cell's peak-memory window: every visible GPU's allocator peak, or the process's RSS peak.

    On Linux writing 5 to clear_refs resets VmHWM, so a worker's later cells do not inherit an
    earlier cell's peak; elsewhere the CPU figure stays the process's lifetime peak.
    """
    if device.startswith("cuda"):
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    else:
        reset_rss_peak()


def reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark; False where the system does not allow it (then the
    CPU figure stays the lifetime peak: not Linux, a kernel before 4.0, a container that forbids it)."""
    try:
        with open(f"{_PROC}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_memory_bytes(device: str) -> int:
    """Peak since `reset_peak_memory`: summed over the GPUs (a sharded model spans several), or peak RSS."""
    if device.startswith("cuda"):
        return sum(int(torch.cuda.max_memory_allocated(index)) for index in range(torch.cuda.device_count()))
    if os.path.exists(f"{_PROC}/status"):
        with open(f"{_PROC}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes
