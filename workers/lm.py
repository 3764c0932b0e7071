"""A causal LM with its tokenizer, and the three things tasks and methods ask of it.

Everything here works for any Hugging Face causal LM: prompts and continuations are tokenized
separately and concatenated, a continuation with the ids it has after a prompt (the pair encoded whole,
as lm-evaluation-harness splits it: `_continuation_lead`), batches are right-padded with explicit
position ids, so a batched forward gives the same numbers as one example at a time.
"""

from __future__ import annotations

import functools
import inspect
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from workers.last_block import mlp_at, read_positions_mlp
from workers.kv_cache import SharedPrefix, cache_argument, shareable_cache
from workers.memory import release_memory
from workers.steering import cache_released_block_by_block, decoder_layers, needed_attention_mask, position_ids_argument, prompt_boundary

T = TypeVar("T")

if TYPE_CHECKING:  # annotations only: importing them loads transformers' modeling code (seconds), see workers/__init__.py
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def body_and_head_params(model: torch.nn.Module) -> tuple[int, int]:
    """(N_body, N_head) for FLOP counts: every parameter a token multiplies through, split into the output head's
    and the rest. Embedding lookups (token, learned position) cost nothing and are left out; an output head tied
    to the input embedding is a real matmul and is counted (as the head)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = output.weight if output is not None else None
    head = 0 if head_weight is None else head_weight.numel()
    body = sum(p.numel() for p in model.parameters() if id(p) not in lookups and p is not head_weight)
    return body, head


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Each text's token ids, as `tokenizer(texts, add_special_tokens=...)["input_ids"]` gives them.

    A fast tokenizer's Rust backend is called directly, with `encode_batch_fast` (tokenizers >= 0.21),
    which computes no character offsets: transformers' call computes them and converts every encoding
    to Python objects, 8.3 ms for 1,024 short texts where this takes 4.5. It is the same encoding
    where that call would neither truncate nor pad, which is how steerscale calls it: a backend left
    set to pad or truncate (by a padded call elsewhere) goes through transformers' call, which resets it.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if _encodes_in_backend(type(tokenizer)) else None
    if (
        backend is None or not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding
        or getattr(backend, "encode_special_tokens", False)  # set by an earlier `split_special_tokens=` call
    ):  # fmt: skip
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


@functools.cache
def _encodes_in_backend(tokenizer_class: type) -> bool:
    """Whether the class is a fast tokenizer that encodes as its Rust backend does: none of transformers'
    encoding methods overridden (transformers 5's CodeLlama tokenizer overrides `_encode_plus`)."""
    from transformers import PreTrainedTokenizerFast

    if not issubclass(tokenizer_class, PreTrainedTokenizerFast):
        return False
    methods = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus")
    return all(getattr(tokenizer_class, name, None) is getattr(PreTrainedTokenizerFast, name, None) for name in methods)


def _head_rows(keep: dict[str, torch.Tensor] | None, attention_mask: torch.Tensor) -> int:
    """Positions the output head runs at under `keep` (`LanguageModel._head_positions`): the kept entries
    of a (rows, columns) mask, every row at kept columns, or (no selection) every position, padding
    included (as in `generate`'s count: the head runs there too)."""
    if not keep:
        return attention_mask.numel()
    kept = keep["logits_to_keep"]
    if kept.dtype == torch.bool:
        return int(kept.sum())
    return attention_mask.shape[0] * kept.numel()


# a text continuations are encoded after, where encoding one alone marks its start (`_continuation_lead`): a line
# break, which no vocabulary merges with the letters after it (SentencePiece's byte fallback, BPE's pre-split)
CONTINUATION_PROBE = "\n"
HEAD_ROWS_UPCAST = 8192  # vocabulary rows of the head cast to fp32 at a time: a 150k x 4096 head at once would be 2.4 GB


@contextmanager
def fp32_head(model: PreTrainedModel) -> Iterator[None]:
    """A half-precision model's output head computes its logits in fp32 meanwhile (for scoring: no gradients).

    bf16 logits keep 8 bits: choices whose log-probabilities lie within one rounding step tie exactly, and an
    argmax gives every tie to the first choice (on the ladder's xl rung in bf16, 45 of 600 test questions).
    The head's inputs stay as the model computed them; its product is taken again in fp32, a slice of the
    weight at a time, at the positions the forward kept only. For the log-likelihood scores (choices, NLL);
    `generate`'s greedy argmax stays in the model's dtype. A head that is not a plain `nn.Linear` (a peft
    adapter on it) is left as it is.
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return

    def in_fp32(module: torch.nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        weight, bias = module.weight, module.bias
        # the input as given: accelerate's hook (a model sharded over GPUs) moves it to the weight's device inside forward
        hidden = args[0].to(weight.device).float()
        logits = torch.empty(*hidden.shape[:-1], weight.shape[0], dtype=torch.float32, device=weight.device)
        for i in range(0, weight.shape[0], HEAD_ROWS_UPCAST):
            rows = slice(i, i + HEAD_ROWS_UPCAST)
            logits[..., rows] = F.linear(hidden, weight[rows].float(), None if bias is None else bias[rows].float())
        return logits.to(output.device)

    handle = head.register_forward_hook(in_fp32)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def greedy_decoding(model: PreTrainedModel, stop_at: int | list[int] | None) -> Iterator[None]:
    """Plain greedy decoding up to `stop_at`, whatever decoding settings the checkpoint ships (an instruct
    model's generation_config.json often sets a repetition penalty): only its special tokens are kept.

    Passing a fresh `GenerationConfig` to `generate` is not enough: transformers fills the fields such
    a config leaves at their defaults from the model's own, so the model's is swapped out meanwhile.
    """
    from transformers import GenerationConfig  # here, not at the top: importing workers.lm stays quick

    own = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=own.bos_token_id, eos_token_id=stop_at, pad_token_id=own.pad_token_id, do_sample=False
    )
    try:
        yield
    finally:
        model.generation_config = own


@dataclass
class Batch:
    """Right-padded token ids with a mask over the continuation tokens (the ones that are scored)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor  # 1 where the token at t+1 is part of the continuation, aligned to logits[t]
    prompt_last: torch.Tensor  # (batch,) column of each row's last prompt token; steering "after the prompt" starts there

    @property
    def target_tokens(self) -> int:
        return int(self.target_mask.sum())

    def without_last_column(self) -> Batch:
        """The batch less its last column, which is only ever a label: it holds the longest rows'
        last tokens (they predict nothing scored: `target_mask`'s last column is always False) or
        padding. Causal attention leaves every other position's output as it was; the forward does
        1/width less work (~9 % on the ladder's tasks, whose sequences are ~11 tokens)."""
        if self.input_ids.shape[1] < 2:
            return self
        return Batch(self.input_ids[:, :-1], self.attention_mask[:, :-1], self.position_ids[:, :-1], self.target_mask[:, :-1], self.prompt_last)


@dataclass(frozen=True)
class EncodedPair:
    """A prompt+continuation pair as token ids, and the index of its first continuation token."""

    ids: list[int]
    continuation_start: int


# Scoring runs the tokens every row of a batch begins with once, when there are at least this many
# (few-shot demonstrations, shared instructions), as steer_mean's extraction does those every contrast text
# begins with; for fewer, the second forward and the cached forwards' masked attention cost more than they
# save (the extraction of 512 arith pairs on the ladder's xl rung, 2 shared tokens: 0.19 s → 0.25 s).
SHARED_PREFIX_MIN_TOKENS = 32


@functools.cache
def _logit_selection(model_class: type) -> str | None:
    """How `model_class`'s forward computes logits at chosen positions only (`logits_to_keep`):
    "mask", a boolean (batch, seq) tensor (transformers 5's `slice_logits_to_keep`, which its module
    imports); "columns", a 1-D tensor of positions kept in every row (transformers 4.50+); or None,
    every position (older versions, and remote code, whose handling of the argument is unknown)."""
    if not model_class.__module__.startswith("transformers.") or "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return None
    return "mask" if hasattr(sys.modules[model_class.__module__], "slice_logits_to_keep") else "columns"


def context_window(config: object) -> int | None:
    """The positions a model was built for, or None when its config names none.

    Past them a learned position table (GPT-2) indexes out of range and a rotary model runs where it
    never trained, so longer texts lose their oldest tokens instead (see `encode_pairs`, `generate`).
    """
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def unless_out_of_memory(attempt: Callable[[], T], *, last: bool) -> T | None:
    """`attempt()`, or None where it ran out of accelerator memory and a smaller try is left (not `last`): see
    `LanguageModel.in_batches`, `workers.training`. Returning from the handler drops the error, and with its
    traceback the tensors the failed frames held, before the retry allocates again."""
    try:
        return attempt()
    except torch.OutOfMemoryError:
        if last:
            raise
        return None


@dataclass
class LanguageModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 32
    halved_to: int | None = None  # the smallest batch `in_batches` halved to after running out of memory; None: none did
    train_parts: int = 1  # micro-batches a training step runs in: more after a step ran out of memory (`workers.training`)
    max_length: int | None = None  # tokens per sequence; None: the model's own position limit (`context_window`)
    forward_tokens: int = 0  # every token this wrapper has run through the model
    flops_run: float = 0.0  # the forward FLOPs of those passes, as run: 2·N_body per token + 2·N_head per position the head ran at
    head_flops_run: float = 0.0  # of flops_run, the output head's: what a backward that ends at the last block runs through
    prefix: str = ""  # text put before every prompt (few-shot demonstrations); see `prefixed`
    added_params: int = 0  # parameters a method has put into the model for now (LoRA's adapters): `running_added`
    provenance: dict[str, str] = field(default_factory=dict)  # what pins the weights: see models.loading.weights_provenance

    def __post_init__(self) -> None:
        if self.max_length is None:
            self.max_length = context_window(getattr(self.model, "config", None))
        # the model's own; a method that adds modules to it (LoRA's adapters) adds theirs while they are in
        self._body_params, self._head_params = body_and_head_params(self.model)

    @contextmanager
    def running_added(self, params: int) -> Iterator[None]:
        """Count `params` more parameters per token in `flops_run` inside the block: modules a method put into
        the blocks (LoRA's adapters) run on every token of every pass there, a part fitted after it included."""
        self._body_params += params
        self.added_params += params
        try:
            yield
        finally:
            self._body_params -= params
            self.added_params -= params

    def _ran(self, tokens: int, head_rows: int) -> None:
        """Count a pass: `tokens` through the blocks, the output head at `head_rows` positions."""
        self.forward_tokens += tokens
        self.flops_run += 2.0 * (self._body_params * tokens + self._head_params * head_rows)
        self.head_flops_run += 2.0 * self._head_params * head_rows

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefixed(self, text: str) -> ContextManager[None]:
        """Put `text` before every prompt inside the block (restored on exit, even on error)."""
        return self._prefix_is(text + self.prefix)

    def unprefixed(self) -> ContextManager[None]:
        """No prefix inside the block: to count a text's own tokens under a `prompt` part."""
        return self._prefix_is("")

    @contextmanager
    def _prefix_is(self, prefix: str) -> Iterator[None]:
        previous, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = previous

    def _ids(self, text: str, *, prompt: bool) -> list[int]:
        return self.encode([text], prompt=prompt)[0]

    def encode(self, texts: Sequence[str], *, prompt: bool) -> list[list[int]]:
        """Token ids of each text as a prompt (special tokens, current prefix) or as a continuation.

        One tokenizer call for the whole list: a fast tokenizer encodes it in one batch, where a
        call per text costs more than the forward itself at small model sizes.
        """
        if not texts:
            return []
        if prompt:
            encoded = token_ids(self.tokenizer, [self.prefix + t for t in texts], add_special_tokens=True)
            return [self._without_trailing(ids) for ids in encoded] if self._trailing_specials else encoded
        if self._continuation_lead is None:
            return token_ids(self.tokenizer, list(texts), add_special_tokens=False)
        lead = self._continuation_lead
        after = token_ids(self.tokenizer, [CONTINUATION_PROBE + t for t in texts], add_special_tokens=False)
        merged = [i for i, ids in enumerate(after) if ids[: len(lead)] != lead]  # the probe merged into the text: alone
        return self._encoded_alone([ids[len(lead) :] for ids in after], texts, merged)

    def _encoded_alone(self, encoded: list[list[int]], texts: Sequence[str], indices: list[int]) -> list[list[int]]:
        """`encoded`, with the texts at `indices` encoded on their own instead (one tokenizer call for them all)."""
        if indices:
            for i, ids in zip(indices, token_ids(self.tokenizer, [texts[i] for i in indices], add_special_tokens=False)):
                encoded[i] = ids
        return encoded

    @functools.cached_property
    def _continuation_lead(self) -> list[int] | None:
        """The probe's ids, where a continuation must be encoded after it to get the ids it has after a prompt; None
        where a text encodes alone as it does after another (byte-level BPE, word-level, transformers 5's Metaspace).

        The legacy SentencePiece normalizer (Llama 2, Mistral v0.1, TinyLlama on transformers 4.x) prepends "▁" to
        every text it encodes: " negative" alone is ['▁', '▁negative'], after a prompt ['▁negative'], so a choice
        was scored after a stray token and fine-tuning taught the model to write it. lm-evaluation-harness encodes
        the pair whole and splits it; this encodes the continuation after a fixed probe and drops the probe's ids.
        """
        lead = token_ids(self.tokenizer, [CONTINUATION_PROBE], add_special_tokens=False)[0]
        alone = token_ids(self.tokenizer, [" a"], add_special_tokens=False)[0]
        after = token_ids(self.tokenizer, [CONTINUATION_PROBE + " a"], add_special_tokens=False)[0]
        return None if after == lead + alone else lead

    @functools.cached_property
    def _marked_probe(self) -> tuple[list[int], list[int]]:
        """A one-letter text's ids without and with the special tokens the tokenizer puts around a prompt."""
        return (list(self.tokenizer("x", add_special_tokens=False)["input_ids"]),
                list(self.tokenizer("x", add_special_tokens=True)["input_ids"]))  # fmt: skip

    @functools.cached_property
    def _leading_specials(self) -> int:
        """How many special tokens the tokenizer puts before a prompt's text (a BOS: 1; GPT-2's: none)."""
        plain, full = self._marked_probe
        return next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)

    @functools.cached_property
    def _trailing_specials(self) -> list[int]:
        """The special tokens the tokenizer puts after a prompt's text, which a prompt goes without: a tokenizer that
        appends an EOS to every text (`add_eos_token=True`, a "$A </s>" template) would put it between a prompt and
        its answer, scored and trained on as the end of the document (lm-eval likewise encodes a context without)."""
        plain, full = self._marked_probe
        return full[self._leading_specials + len(plain) :]

    def _without_trailing(self, ids: list[int]) -> list[int]:
        """`ids` less the trailing specials, where they end with them (only those: a count alone would cut a text's
        own last token from a tokenizer whose template changed since it was measured)."""
        k = len(self._trailing_specials)
        return ids[:-k] if k and ids[-k:] == self._trailing_specials else ids

    def clipped(self, ids: list[int]) -> list[int]:
        """A prompt's ids (`encode(..., prompt=True)`, perhaps with more after) cut to `max_length` by
        dropping its oldest text, not the special tokens the tokenizer put first: a model trained with a
        BOS reads every sequence from one, and without it scores worse (as the tokenizer's own left
        truncation, used by `generate`, keeps it)."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        lead = min(self._leading_specials, self.max_length - 1)
        return ids[:lead] + ids[len(ids) - (self.max_length - lead) :]

    @property
    def _stop_at(self) -> int | list[int] | None:
        """The token(s) `generate` stops at: the checkpoint's generation config's, else the tokenizer's (a model trained to
        stop at that one, `end_of_text`, would otherwise write on)."""
        config = self.model.generation_config
        eos = config.eos_token_id if config is not None else None
        return self.tokenizer.eos_token_id if eos is None else eos

    @property
    def end_of_text(self) -> int:
        """The token a generating task's target ends with (`Example.ends_text`): one `generate` stops at."""
        eos = self._stop_at
        if isinstance(eos, list):  # a checkpoint that stops at any of several (Llama 3's): the tokenizer's is one of them
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in eos else eos[0]
        if eos is None:
            raise ValueError(f"{type(self.tokenizer).__name__} has no end-of-text token, which a generated answer's training "
                             "target ends with (so that a tuned model stops): give the tokenizer an eos_token")  # fmt: skip
        return int(eos)

    @property
    def end_of_text_string(self) -> str:
        """`end_of_text` as text, which the tokenizer reads back as that token (a demonstration's end)."""
        return self.tokenizer.decode([self.end_of_text])

    def token_count(self, text: str, *, prompt: bool) -> int:
        """Tokens `text` takes as a prompt (with special tokens and the current prefix) or as a continuation."""
        return len(self._ids(text, prompt=prompt))

    def batches(self, prompts: Sequence[str], continuations: Sequence[str]) -> Iterator[Batch]:
        """Token batches of prompt+continuation pairs, `batch_size` at a time (no halving: see `in_batches`)."""
        for start in range(0, len(prompts), self.batch_size):
            yield self.batch(prompts, continuations, rows=slice(start, start + self.batch_size))

    def batch(
        self, prompts: Sequence[str], continuations: Sequence[str], ends_text: Sequence[bool] | None = None,
        rows: slice = slice(None),
    ) -> Batch:
        """One batch of the prompt+continuation pairs in `rows` (default: all)."""
        return self.collate(self.encode_pairs(prompts[rows], continuations[rows], None if ends_text is None else ends_text[rows]))

    @property
    def counters(self) -> tuple[int, float, float]:
        """`forward_tokens`, `flops_run`, `head_flops_run`: taken before a try that may run out of memory, and
        set back after one that did (a row bills what ran to the end)."""
        return self.forward_tokens, self.flops_run, self.head_flops_run

    @counters.setter
    def counters(self, counted: tuple[int, float, float]) -> None:
        self.forward_tokens, self.flops_run, self.head_flops_run = counted

    def in_batches(self, count: int, run: Callable[[slice], list[T]], *, width: int = 1) -> list[T]:
        """`run` over `count` items, `width` × `batch_size` at a time, its lists joined in order (`width` 2:
        steer_mean's contrast texts, two per pair of its batch).

        A batch that runs out of accelerator memory runs again as two halves, and the rest of the cell's
        training, or of its evaluation, keeps the smaller size (`halved_to`; `WorkerCache.model` sets the
        configured one again for the next cell, `evaluate_cell` after a method's fit): at a
        150k vocabulary one batch's fp32 logits can outgrow a card that holds the model, and a smaller
        batch changes no score but by float rounding. A batch of one (`width` items, the last at most)
        that runs out fails the cell, as any error does. What the failed try had counted in
        `forward_tokens` and the FLOPs is taken back: a row bills the batches that ran.
        """
        out: list[T] = []
        start = 0
        while start < count:
            rows = slice(start, min(start + width * self.batch_size, count))
            counted = self.counters
            done = unless_out_of_memory(lambda: run(rows), last=rows.stop - rows.start <= width)
            if done is not None:
                out.extend(done)
                start = rows.stop
                continue
            self.counters = counted
            self.batch_size = max(1, (rows.stop - rows.start) // width // 2)
            self.halved_to = min(self.halved_to or self.batch_size, self.batch_size)
            release_memory()  # the failed try's blocks, back to the card for the smaller batch's
            print(f"steerscale: out of accelerator memory on a batch of {rows.stop - rows.start}; "
                  f"{width * self.batch_size} at a time for the rest of this cell", file=sys.stderr)  # fmt: skip
        return out

    def encode_pairs(
        self, prompts: Sequence[str], continuations: Sequence[str], ends_text: Sequence[bool] | None = None
    ) -> list[EncodedPair]:
        """Each pair's token ids (prompt then continuation) and where its continuation starts; where `ends_text`
        says so, the continuation ends with the tokenizer's end-of-text token (`Example.ends_text`).

        A training loop encodes its examples once with this and `collate`s every step's batch from
        the ids: tokenizing 64 pairs again each step cost ~6 % of a step on the ladder's models.
        """
        pairs = []
        continued = self.encode(continuations, prompt=False)
        if self._continuation_lead is not None:  # after an empty prompt a text starts the document: encoded alone, as there,
            # whatever prefix is in front (a `prompt` method's demonstrations before a neutral text: the tokens its
            # reference scored without them, or their KL compared different tokens)
            continued = self._encoded_alone(continued, continuations, [i for i, p in enumerate(prompts) if not p])
        if ends_text is not None and any(ends_text):
            continued = [c + [self.end_of_text] if end else c for c, end in zip(continued, ends_text, strict=True)]
        for p, c in zip(self.encode(prompts, prompt=True), continued):
            ids = self.clipped(p + c)  # keep the continuation; drop the oldest context
            pairs.append(EncodedPair(ids, max(len(ids) - len(c), 0)))
        return pairs

    def collate(self, pairs: Sequence[EncodedPair]) -> Batch:
        """One right-padded batch of encoded pairs, on the model's device."""
        input_ids, attention = self.pad([pair.ids for pair in pairs])
        prompt_last = torch.tensor([max(pair.continuation_start - 1, 0) for pair in pairs], dtype=torch.long)
        columns = torch.arange(input_ids.shape[1])
        # the positions from the prompt's last token to the one before the last: each predicts a continuation token
        target = (columns >= prompt_last.unsqueeze(1)) & (columns < attention.sum(-1, keepdim=True) - 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return Batch(*(t.to(self.device) for t in (input_ids, attention, positions, target, prompt_last)))

    def pad(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (ids, attention mask) on the CPU, as wide as the longest row."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = torch.tensor([len(ids) for ids in rows])
        width = int(lengths.max())
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], dtype=torch.long)
        return input_ids, (torch.arange(width) < lengths.unsqueeze(1)).long()

    def forward(self, batch: Batch, keep: dict[str, torch.Tensor] | None = None, read: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits for `batch`: at every position, or where `keep` (see `_head_positions`) says.
        Given `read`, the positions (rows, columns) whose logits are used, the last block's MLP runs there
        alone where the architecture allows (`workers.last_block`): elsewhere the logits lack its part."""
        tokens = int(batch.attention_mask.sum())
        mlp = None if read is None else read_positions_mlp(self.model)
        self._ran(tokens, _head_rows(keep, batch.attention_mask))
        if mlp is not None:  # what did not run: its parameters (adapters in it too) at the positions not read
            self.flops_run -= 2.0 * sum(p.numel() for p in mlp.parameters()) * (tokens - int(read.sum()))
        with prompt_boundary(batch.prompt_last), mlp_at(mlp, read) if mlp is not None else nullcontext():
            return self.model(
                input_ids=batch.input_ids, attention_mask=needed_attention_mask(batch.attention_mask),
                **position_ids_argument(self.model, batch.position_ids), **(keep or {}),
            ).logits  # fmt: skip

    def scored_logits(self, batch: Batch) -> torch.Tensor:
        """Logits (scored tokens, vocab) at the positions that predict a continuation token, row by
        row: the True entries of `batch.target_mask` (whose last column is always False).

        The output head runs only at those positions where the model can: the prompt's positions
        need no logits, and at a 150k vocabulary theirs (and their gradients) would be most of a
        training step's memory. Same numbers as the full forward's rows (up to float rounding: the
        last column, a label only, does not run).
        """
        inputs = batch.without_last_column()
        keep, pick = self._head_positions(inputs.target_mask)
        return pick(self.forward(inputs, keep, read=inputs.target_mask))

    def _head_positions(self, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """The forward's `logits_to_keep` for the True entries of `mask` (rows, columns), and how to
        take exactly those entries' logits, row by row, from what the forward then returns."""
        base = self._base_model()
        how = _logit_selection(type(base))
        if len(set(getattr(base, "hf_device_map", {}).values())) > 1:
            # sharded over GPUs: the head's input sits on the last one, the batch on the first, and
            # a tensor indexes across devices only from the CPU
            mask = mask.cpu()
        if how == "mask":
            return {"logits_to_keep": mask}, lambda logits: logits
        if how == "columns":
            columns = mask.any(0).nonzero().squeeze(1)
            return {"logits_to_keep": columns}, lambda logits: logits[mask[:, columns]]
        return {}, lambda logits: logits[mask]

    def _base_model(self) -> PreTrainedModel:
        """The transformers model itself, inside a peft wrapper if there is one."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @torch.no_grad()
    def scoring_logits(self, batch: Batch) -> torch.Tensor:
        """`scored_logits` for scoring (no gradients), running shared leading columns once, in fp32
        from the output head on (`fp32_head`: a half-precision model's logits would tie).
        """
        with fp32_head(self._base_model()):
            return self._scoring_logits(batch)

    def _scoring_logits(self, batch: Batch) -> torch.Tensor:
        """`scoring_logits`, with shared leading columns run once.

        Columns before `start` hold tokens every row begins with (a `prompt` method's
        demonstrations, a task's shared instructions) and are scored by no row: they run once,
        as a batch of one, and every row continues from their key/value cache. Same numbers as
        `scored_logits` up to float rounding; a many-shot prompt then costs its demonstrations once
        per batch instead of once per row (on the ladder, a 230-token prefix: ~5x less work).
        """
        start = self._shared_columns(batch)
        if start == 0:
            return self.scored_logits(batch)
        shared = slice(0, start)
        no_logits = {"logits_to_keep": 1} if _logit_selection(type(self._base_model())) else {}  # only the cache is read
        with prompt_boundary(batch.prompt_last.min().view(1)):  # nothing shared is after any row's prompt
            out = self.model(
                input_ids=batch.input_ids[:1, shared], attention_mask=batch.attention_mask[:1, shared],
                use_cache=True, **position_ids_argument(self.model, batch.position_ids[:1, shared]), **no_logits,
            )  # fmt: skip
        self._ran(start, 1 if no_logits else start)
        shared_cache = shareable_cache(out.cache if "cache" in out else out.past_key_values)  # renamed in transformers 5.2x
        if shared_cache is None:
            return self.scored_logits(batch)
        cache = SharedPrefix(shared_cache, start, len(decoder_layers(self.model)) - 1).for_rows(batch.input_ids.shape[0])  # every layer run
        keep, pick = self._head_positions(batch.target_mask[:, start:])
        tokens = int(batch.attention_mask[:, start:].sum())
        self._ran(tokens, _head_rows(keep, batch.attention_mask[:, start:]))
        base = self._base_model()  # a peft wrapper passes it on
        with prompt_boundary(batch.prompt_last), cache_released_block_by_block(self.model, cache):
            logits = self.model(
                input_ids=batch.input_ids[:, start:], attention_mask=batch.attention_mask,
                use_cache=True, **position_ids_argument(self.model, batch.position_ids[:, start:]), **{cache_argument(type(base)): cache}, **keep,
            ).logits  # fmt: skip
        return pick(logits)

    @staticmethod
    def _shared_columns(batch: Batch) -> int:
        """How many leading columns every row shares and none scores; 0 when too few to be worth a second forward."""
        ids = batch.input_ids
        limit = int(batch.prompt_last.min())  # each row needs logits from its last prompt column on
        if ids.shape[0] < 2 or limit < SHARED_PREFIX_MIN_TOKENS:
            return 0
        differs = (ids[:, :limit] != ids[:1, :limit]).any(dim=0).nonzero()
        start = int(differs[0]) if len(differs) else limit
        return start if start >= SHARED_PREFIX_MIN_TOKENS else 0

    @staticmethod
    def token_nll(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """NLL of each continuation token (scored tokens,), row by row, from the logits at the scored
        positions (`scored_logits` / `scoring_logits`): fused cross-entropy, in fp32."""
        labels = batch.input_ids[:, 1:][batch.target_mask[:, :-1]]
        return F.cross_entropy(logits.float(), labels, reduction="none")

    @staticmethod
    def row_sums(batch: Batch, per_token: torch.Tensor) -> torch.Tensor:
        """Per-token values (scored tokens,), row by row, summed per row of `batch`: (batch,)."""
        rows = batch.target_mask.nonzero()[:, 0]
        return torch.zeros(batch.input_ids.shape[0], dtype=per_token.dtype, device=per_token.device).index_add_(0, rows, per_token)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean continuation NLL over the batch's target tokens: the training loss (`workers.training.accumulated_step`
        computes it in parts)."""
        return self.token_nll(batch, self.scored_logits(batch)).sum() / batch.target_mask.sum().clamp(min=1)

    @torch.no_grad()
    def target_nll(self, prompts: Sequence[str], targets: Sequence[str], ends_text: Sequence[bool] | None = None) -> float:
        """Mean NLL per continuation token over all pairs (nats), an end-of-text token where `ends_text` says."""

        def summed(rows: slice) -> list[tuple[float, int]]:
            batch = self.batch(prompts, targets, ends_text, rows)
            return [(float(self.token_nll(batch, self.scoring_logits(batch)).sum()), batch.target_tokens)]

        sums = self.in_batches(len(prompts), summed)
        return sum(total for total, _ in sums) / max(sum(count for _, count in sums), 1)

    @torch.no_grad()
    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-probability of each choice after its prompt, as a ragged list per prompt.

        When every choice is one token (digits, labels), all of a prompt's choices are read off one
        forward instead of one forward per choice: the same numbers, len(choices) times cheaper.
        """
        flat = iter(self.encode([c for cs in choices for c in cs], prompt=False))
        ids = [[next(flat) for _ in cs] for cs in choices]
        for cs, encoded in zip(choices, ids):
            seen: dict[tuple[int, ...], str] = {}
            for choice, tokens in zip(cs, encoded):
                if seen.setdefault(tuple(tokens), choice) != choice:
                    raise ValueError(
                        f"the choices {seen[tuple(tokens)]!r} and {choice!r} encode to the same tokens {tokens}: this tokenizer "
                        "cannot tell them apart (words it does not have, e.g. a ladder model on a hub task), so every "
                        "argmax over them would pick the first"
                    )
        if all(cs and all(len(c) == 1 for c in cs) for cs in ids):
            return self._single_token_logprobs(prompts, choices, ids)
        flat_prompts = [p for p, cs in zip(prompts, choices) for _ in cs]
        flat_choices = [c for cs in choices for c in cs]

        def scored(rows: slice) -> list[float]:
            batch = self.batch(flat_prompts, flat_choices, rows=rows)
            return (-self.row_sums(batch, self.token_nll(batch, self.scoring_logits(batch)))).tolist()

        scores = self.in_batches(len(flat_prompts), scored)
        out, i = [], 0
        for cs in choices:
            out.append(scores[i : i + len(cs)])
            i += len(cs)
        return out

    def _single_token_logprobs(
        self, prompts: Sequence[str], choices: Sequence[Sequence[str]], ids: list[list[list[int]]]
    ) -> list[list[float]]:
        # Each prompt runs with its first choice appended, so truncation and token ids are exactly
        # those of the per-choice path; its one scored position is the prompt's last column, whose
        # logits give every choice's.
        firsts = [cs[0] for cs in choices]

        def scored(rows: slice) -> list[list[float]]:
            batch = self.batch(prompts, firsts, rows=rows)
            logits = self.scoring_logits(batch)
            if logits.shape[0] != batch.input_ids.shape[0]:
                raise ValueError("a choice needs at least one prompt token before it (an empty prompt, and no BOS token?)")
            logp = F.log_softmax(logits.float(), dim=-1)
            return [row[[c[0] for c in cs]].tolist() for row, cs in zip(logp, ids[rows])]

        return self.in_batches(len(prompts), scored)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations (left-padded batches; `generate` derives positions from the mask)."""
        tok = self.tokenizer
        limit = None if self.max_length is None else self.max_length - max_new_tokens
        if limit is not None and limit < 1:
            raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's {self.max_length} positions")

        def continued(rows: slice) -> list[str]:
            texts = [self.prefix + p for p in prompts[rows]]
            trailing = self._trailing_specials  # truncated with them, so that the prompt keeps `limit` tokens without
            enc = tok(texts, return_tensors="pt", padding=True, truncation=limit is not None,
                      max_length=None if limit is None else limit + len(trailing))  # fmt: skip
            # only ids and mask: some tokenizers also return token_type_ids, which GPT-2 would embed; without the
            # specials a tokenizer appends (left-padded, every row ends with them): the answer follows the prompt
            end = enc["input_ids"].shape[1]
            if trailing and (enc["input_ids"][:, -len(trailing) :] == torch.tensor(trailing)).all():
                end -= len(trailing)
            ids, mask = enc["input_ids"][:, :end].to(self.device), enc["attention_mask"][:, :end].to(self.device)
            width = ids.shape[1]
            last = torch.full((len(texts),), width - 1, dtype=torch.long, device=self.device)  # left padding
            with prompt_boundary(last), greedy_decoding(self.model, self._stop_at):
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          pad_token_id=tok.pad_token_id)  # fmt: skip
            # tokens: an upper bound, padding included; the head: at each new token (generate asks the prompt's
            # forward for its last position's logits alone where the model takes logits_to_keep, else for all)
            head = max_new_tokens + (1 if _logit_selection(type(self._base_model())) else width)
            self._ran(int(gen.shape[0] * gen.shape[1]), int(gen.shape[0]) * head)
            return tok.batch_decode(gen[:, width:], skip_special_tokens=True)

        sides = tok.padding_side, tok.truncation_side
        tok.padding_side = tok.truncation_side = "left"  # a long prompt loses its oldest tokens, as in `encode_pairs`
        try:
            return self.in_batches(len(prompts), continued)
        finally:
            tok.padding_side, tok.truncation_side = sides
