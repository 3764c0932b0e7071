"""Tiny random models of every supported architecture, a word-level tokenizer and a toy task.

Shared by the method, steering, LM and training tests (and the peer-parity tests); imported as a
plain module so that tests/conftest.py stays the lead's. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from workers.lm import LanguageModel
from workers.methods import FitContext
from workers.tasks.base import Evaluation, Example, answer_contrast, score_choices

N_A, N_B, N_ANSWERS = 8, 8, 5
WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "q:", "=", ";", "persona:", "honest", "liar"]
WORDS += [f"a{i}" for i in range(N_A)] + [f"b{i}" for i in range(N_B)] + [str(d) for d in range(N_ANSWERS)]
VOCAB = {w: i for i, w in enumerate(WORDS)}
HIDDEN, LAYERS = 32, 3


def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    core.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", VOCAB["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


_IDS = dict(vocab_size=len(WORDS), pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4)


def _gemma2(sliding_window: int = 4096) -> PreTrainedModel:
    """Gemma 2's layout; its even layers attend within `sliding_window` positions (Gemma 2's own default: wider than any test text)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_IDS, **_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=sliding_window))


def _gemma3() -> PreTrainedModel:
    transformers = pytest.importorskip("transformers", minversion="4.50", reason="Gemma 3 arrived in transformers 4.50")
    Gemma3ForCausalLM, Gemma3TextConfig = transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_IDS, **_DECODER, num_key_value_heads=2, head_dim=8))


def _opt() -> PreTrainedModel:
    """OPT-350m's layout: learned positions, and embeddings half the residual width projected in and out."""
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(**_IDS, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN // 2, ffn_dim=64,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, dropout=0.0))  # fmt: skip


ARCHITECTURES: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_IDS, **_DECODER, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_IDS, **_DECODER, num_key_value_heads=2)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(**_IDS, **_DECODER, hidden_dropout=0.0, attention_dropout=0.0)
    ),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(**_IDS, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ),
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "opt": _opt,
}


def _lfm2() -> PreTrainedModel:
    """LFM2's layout: a short convolution in its first block, whose cache state is updated in place."""
    transformers = pytest.importorskip("transformers", minversion="4.54", reason="LFM2 arrived in transformers 4.54")
    config = transformers.Lfm2Config(**_IDS, **_DECODER, num_key_value_heads=2, layer_types=["conv", "full_attention", "full_attention"])
    return transformers.Lfm2ForCausalLM(config)


# not in every architecture's tests: for the few that need them
VARIANTS: dict[str, Callable[[], PreTrainedModel]] = {
    "gemma2-window4": lambda: _gemma2(sliding_window=4),  # a window narrower than the test texts
    "lfm2": _lfm2,
}


def model(arch: str = "llama", seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return {**ARCHITECTURES, **VARIANTS}[arch]().eval()


def language_model(arch: str = "llama", seed: int = 0, batch_size: int = 8) -> LanguageModel:
    return LanguageModel(model=model(arch, seed), tokenizer=tokenizer(), batch_size=batch_size)


def answer(a: int, b: int) -> int:
    return (3 * a + b) % N_ANSWERS


class ToyTask:
    """A fact-recall task over the tiny vocabulary: 'q: a3 b5 =' -> ' 4', five one-token choices."""

    name = "toy"
    task_type = "general"

    def examples(self, split: str, n: int, seed: int) -> list[Example]:
        offset = {"train": 0, "validation": 1, "test": 2}[split]
        g = torch.Generator().manual_seed(seed * 3 + offset)
        pairs = torch.randint(0, N_A, (n, 2), generator=g).tolist()
        return [
            Example(
                prompt=f"q: a{a} b{b} =",
                target=f" {answer(a, b)}",
                choices=tuple(f" {d}" for d in range(N_ANSWERS)),
                elicited_prompt=f"persona: honest q: a{a} b{b} =",
            )
            for a, b in pairs
        ]

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        return answer_contrast(examples)

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        return score_choices(lm, examples, elicited=elicited)


def fit_context(lm: LanguageModel, n_train: int = 16, n_val: int = 8, seed: int = 0) -> FitContext:
    task = ToyTask()
    return FitContext(
        lm=lm, task=task, train=task.examples("train", n_train, seed), validation=task.examples("validation", n_val, 0), seed=seed
    )


def logits(lm: LanguageModel, texts: Sequence[str] = ("q: a1 b2 = 3 ; q: a4 b0 =", "persona: liar q: a7 b7 =")) -> torch.Tensor:
    """The model's logits on a fixed batch, through the wrapper (so prefixes and steering apply)."""
    with torch.no_grad():
        return lm.forward(next(lm.batches(list(texts), [" 1"] * len(texts))))


@contextlib.contextmanager
def out_of_memory_past(lm, rows: int):
    """The model runs out of accelerator memory on a batch of more than `rows` rows, as a card does on
    a 150k vocabulary's logits: a real torch.OutOfMemoryError cannot be caused on a CPU box."""

    def check(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        if ids.shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (a batch of {ids.shape[0]})")

    handle = lm.model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
