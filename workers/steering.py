"""Adding vectors to the residual stream of any decoder-only Hugging Face model.

Hooks return a new tensor instead of editing the layer's output in place, so gradients flow
through a steered model (needed to train a steering vector, or LoRA under a fixed vector), and
they handle layers that return a bare tensor (Llama in transformers >= 4.57) as well as a tuple.

Steering "after the prompt" needs to know, for every forward, which absolute token columns the
current chunk covers (with a KV cache, generation feeds one new column at a time) and where each
row's prompt ends. The first comes from a pre-hook on the model's own forward (cache position or
attention-mask width); the second is declared by the caller with `prompt_boundary` — the
`LanguageModel` wrapper does that for every forward and generation it runs.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from workers import last_row_attention as last_row
from workers.kv_cache import SharedPrefix, cache_among, cache_argument, release_layer, shareable_cache

Positions = Literal["all", "after_prompt"]

# Where each architecture keeps its decoder blocks. Written as an explicit table rather than a
# search over named_modules so an unsupported model fails loudly instead of hooking the wrong list.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma 2/3, Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal wrappers
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.h",  # GPT-2, GPT-J
    "model.decoder.layers",  # OPT
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (through a PEFT wrapper if there is one)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in _LAYER_PATHS:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}; known layouts: {', '.join(_LAYER_PATHS)}")


def residual_width(model: nn.Module) -> int:
    """The width of the residual stream the decoder blocks write: a steering vector's size. Not the
    embedding's (OPT-350m projects 512-wide embeddings into a 1024-wide stream), and read from the
    text config where a multimodal config (Gemma 3's) keeps it."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # transformers < 4.45 has no text config
    return text.hidden_size


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _add(output: torch.Tensor | tuple, vector: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | tuple:
    """`output` with `vector` added (where `mask` (batch, seq, 1), in the hidden dtype, is 1)."""
    hidden = _hidden(output)
    if vector.dtype != hidden.dtype or vector.device != hidden.device:  # e.g. a trained fp32 vector, a sharded model
        vector = vector.to(dtype=hidden.dtype, device=hidden.device)
    if mask is not None and (mask.dtype != hidden.dtype or mask.device != hidden.device):
        mask = mask.to(dtype=hidden.dtype, device=hidden.device)
    # a new tensor (never in place), so the layer's own output stays untouched for autograd;
    # masked, one fused kernel instead of materialising the (batch, seq, d) shift first
    steered = hidden + vector if mask is None else torch.addcmul(hidden, mask, vector)
    return (steered, *output[1:]) if isinstance(output, tuple) else steered


class _Boundary:
    """Each row's last prompt column, and (computed on first use) the latest of them."""

    def __init__(self, last: torch.Tensor) -> None:
        self.last = last
        self._latest: int | None = None

    @property
    def latest(self) -> int:
        if self._latest is None:  # one device sync per boundary, not one per forward of a generation
            self._latest = int(self.last.max())
        return self._latest


# Each row's last prompt column, for the forwards running inside `prompt_boundary`.
_PROMPT_LAST: ContextVar[_Boundary | None] = ContextVar("steerscale_prompt_last", default=None)


@contextmanager
def prompt_boundary(last_prompt_column: torch.Tensor) -> Iterator[None]:
    """Declare each row's last prompt column (batch,) for the forwards inside; `after_prompt` steers from it."""
    token = _PROMPT_LAST.set(_Boundary(last_prompt_column))
    try:
        yield
    finally:
        _PROMPT_LAST.reset(token)


def _chunk(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int, int, torch.device]:
    """(batch size, first absolute column, width, device) of the chunk a model forward is about to run."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    source = ids if ids is not None else kwargs["inputs_embeds"]
    batch, width = source.shape[:2]
    cache_position, mask = kwargs.get("cache_position"), kwargs.get("attention_mask")
    # transformers 5.2x renamed `past_key_values` to `cache` and stopped passing `cache_position`
    past = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache_position is not None:
        offset = int(cache_position.reshape(-1)[0])
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        offset = mask.shape[-1] - width  # generation passes the mask of past + new columns
    elif past is not None and hasattr(past, "get_seq_length"):
        offset = int(past.get_seq_length())
    else:
        offset = 0
    return batch, offset, width, source.device


@contextmanager
def steer(model: nn.Module, vectors: Mapping[int, torch.Tensor], positions: Positions = "all") -> Iterator[None]:
    """Add `vectors[layer]` to the output of each given decoder layer, at all positions or only after the prompt.

    With `after_prompt`, a position is steered when its column is at or after the row's last prompt
    token (the one whose output predicts the first answer token), as in CAA. Forwards that run
    outside any `prompt_boundary` have no known prompt and are steered everywhere.

    The hooks are on every forward of a steered evaluation, so they do as little as possible: a
    vector that is not being trained is converted to the model's dtype and device once, the mask is
    built once per forward (not per layer) and skipped when the whole chunk is after the prompt
    (every step of cached generation), and the add is one kernel.
    """
    layers = decoder_layers(model)
    dtype = _dtype_device(model)[0]
    state: list[torch.Tensor | None] = [None]  # the current forward's mask, (batch, seq, 1) in `dtype`
    columns: dict[tuple[int, int, torch.device], torch.Tensor] = {}  # arange is slow to build, a width recurs

    def set_mask(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        boundary = _PROMPT_LAST.get()
        if boundary is None:
            state[0] = None
            return
        batch, offset, width, at = _chunk(args, kwargs)
        if boundary.last.shape[0] != batch:
            raise ValueError(f"prompt boundary covers {boundary.last.shape[0]} rows but the forward has {batch}")
        if offset > 0 and offset >= boundary.latest:
            state[0] = None  # every row's prompt ends at or before this chunk (cached generation): steer all of it
            return
        key = (offset, width, at)
        if key not in columns:
            columns[key] = torch.arange(offset, offset + width, device=at).view(1, width, 1)
        state[0] = (columns[key] >= boundary.last.to(at).view(batch, 1, 1)).to(dtype)

    def hook(vector: torch.Tensor, layer: nn.Module) -> Any:
        if not vector.requires_grad:  # a trained vector must stay the leaf the optimiser updates
            # on the layer's own device: a model split over GPUs has its layers on several
            vector = vector.detach().to(dtype=dtype, device=_dtype_device(layer)[1])
        return lambda _m, _i, out: _add(out, vector, state[0])

    handles = []
    try:
        if positions == "after_prompt":
            handles.append(model.register_forward_pre_hook(set_mask, with_kwargs=True))
        for index, vector in vectors.items():
            handles.append(layers[index].register_forward_hook(hook(vector, layers[index])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """Dtype and device of the model's floating-point weights (where its residual stream lives)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError(f"{type(model).__name__} has no floating-point parameters")


class _StopForward(Exception):
    """Raised by the deepest reading hook: nothing after that layer is needed."""


def matmul_params_through(model: nn.Module, layer: int) -> int:
    """Parameters a token multiplies through in the decoder layers up to `layer` (the embedding lookup
    costs nothing): N for the FLOP formula of a forward, or a backward, that ends at that layer."""
    return sum(p.numel() for block in decoder_layers(model)[: layer + 1] for p in block.parameters())


# Model types whose decoder layer adds its MLP's output to the residual out of place, position by
# position (read in transformers' modeling files), so `last_token_states` can run the deepest block's
# MLP on the last tokens alone (and `workers.last_block` the last block's on the scored positions).
# Elsewhere it runs whole: Falcon adds the attention output into the MLP's output in place, which a
# one-row output cannot take.
POSITION_WISE_MLP_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "gemma3_text",
    "phi", "phi3", "olmo2", "gpt2", "gpt_neox", "gptj",
})  # fmt: skip


def position_wise_mlp(model: nn.Module, layer: int) -> nn.Module | None:
    """Decoder layer `layer`'s position-wise MLP where the model's type is known to allow running it on
    some positions alone (`POSITION_WISE_MLP_TYPES`); None where it must run whole."""
    if getattr(getattr(model, "config", None), "model_type", None) not in POSITION_WISE_MLP_TYPES:
        return None
    mlp = getattr(decoder_layers(model)[layer], "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None


def _last_row_attention(model: nn.Module, layer: int) -> nn.Module | None:
    """Decoder layer `layer`'s attention where `last_row_attention` can compute it for the last tokens
    alone (`workers.last_row_attention.supported`); None where it must run whole."""
    attention = getattr(decoder_layers(model)[layer], "self_attn", None)
    return attention if isinstance(attention, nn.Module) and last_row.supported(model, attention) else None


def last_token_flops(model: nn.Module, layer: int, tokens: int, texts: int) -> float:
    """FLOPs of `last_token_states` reading up to decoder layer `layer` over `texts` texts of `tokens`
    tokens in all: 2 · N · tokens through the blocks, but the deepest block's MLP (and, where its
    attention runs on the last rows, its query and output projections) count `texts` only."""
    mlp = position_wise_mlp(model, layer)
    attention = _last_row_attention(model, layer)
    last_only = ([] if mlp is None else [mlp]) + ([] if attention is None else [attention.q_proj, attention.o_proj])
    once = sum(p.numel() for module in last_only for p in module.parameters())
    return 2.0 * (matmul_params_through(model, layer) - once) * tokens + 2.0 * once * texts


@torch.inference_mode()  # cheaper per op than no_grad; results used outside it become ordinary tensors
def last_token_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None = None,
    prefix: SharedPrefix | None = None,
) -> torch.Tensor:
    """Decoder layers' outputs at each row's last real token (right padding): (len(layers), batch, d).

    `layers` defaults to all of them. Read with hooks on the layers themselves, not from
    `output_hidden_states`, whose last entry is after the final norm in most architectures: this is
    exactly what a steering hook adds to. The forward stops (raised from the hook) once the deepest
    wanted layer has run, so the blocks after it, the final norm and the vocabulary projection —
    often the largest matmul of all — are never computed. Nothing reads the deepest block's other
    positions either, so its MLP (position-wise, the larger half of a block) runs on the last tokens
    alone; the residual add broadcasts that one row over the sequence, right at the read column. For
    Llama's attention the block's queries and output projection are also computed at the last tokens
    alone (`workers.last_row_attention`). Given `prefix` (`shared_prefix`), every row continues from
    those tokens, run once: `input_ids` hold the rest of each text.
    """
    return _read_last_tokens(model, input_ids, attention_mask, layers, prefix)[0]


@torch.inference_mode()
def shared_prefix(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int] | None = None) -> SharedPrefix | None:
    """Run `input_ids` (1, tokens), which every text of the reads to come begins with, once, up to the deepest of
    `layers`, and keep their keys and values for `last_token_states`; None where the model hands its blocks no
    cache of keys and values alone (`shareable_cache`: legacy tuples, as GPT-2, GPT-NeoX and OPT under transformers
    4.44; Gemma 2's hybrid cache before 4.53; LFM2's convolution state), found by running it: one text's forward,
    against the many a shared prefix saves. A prefix that is not a text's last token: no `after_prompt` vector acts
    on it, as none acts there when each text runs whole."""
    cache = shareable_cache(_read_last_tokens(model, input_ids, torch.ones_like(input_ids), layers, None, keep_cache=True)[1])
    return None if cache is None else SharedPrefix(cache, input_ids.shape[1], max(_wanted(model, layers)))


def _wanted(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """The decoder layers a read asks for (all by default), negative indices counted from the end."""
    depth = len(decoder_layers(model))
    return list(range(depth)) if layers is None else [range(depth)[i] for i in layers]


@contextmanager
def cache_released_block_by_block(model: nn.Module, cache: Any) -> Iterator[None]:
    """While open, each decoder block's keys and values in `cache` are let go of as soon as the block has run
    (`workers.kv_cache.release_layer`): for a forward that continues from a shared prefix and reads no layer's
    cache again."""
    blocks = decoder_layers(model)
    handles = [block.register_forward_hook(functools.partial(_release_after, cache, index)) for index, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _release_after(cache: Any, index: int, *_hook_arguments: Any) -> None:
    release_layer(cache, index)


def _read_last_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int] | None,
    prefix: SharedPrefix | None,
    keep_cache: bool = False,
) -> tuple[torch.Tensor, Any]:
    """`last_token_states`, and (`keep_cache`) the key/value cache the deepest read block was handed."""
    blocks = decoder_layers(model)
    wanted = _wanted(model, layers)
    deepest = max(wanted)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = attention_mask.sum(-1) - 1
    captured: dict[int, torch.Tensor] = {}
    kept: list[Any] = [None]

    def read(index: int) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any], out: torch.Tensor | tuple) -> None:
            hidden = _hidden(out)  # on a sharded model, on this layer's GPU: index there, keep on the input's
            captured[index] = hidden[rows.to(hidden.device), last.to(hidden.device)].float().to(input_ids.device)
            if index == deepest:
                kept[0] = cache_among([*args, *kwargs.values()]) if keep_cache else None
                raise _StopForward

        return hook

    def last_rows_only(_m: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden[rows.to(hidden.device), last.to(hidden.device)].unsqueeze(1), *args[1:])

    if prefix is not None and prefix.depth < deepest:  # the layers past its depth would attend without the prefix
        raise ValueError(f"the shared prefix was run to layer {prefix.depth}; this read goes to layer {deepest}")
    past = 0 if prefix is None else prefix.length
    whole_mask = attention_mask if prefix is None else torch.cat([attention_mask.new_ones(len(rows), past), attention_mask], dim=1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes the cache on
    cache = None if prefix is None else prefix.for_rows(len(rows))
    mlp = position_wise_mlp(model, deepest)
    # its own mask for the read row (columns up to each row's last real token): right padding only
    attention = _last_row_attention(model, deepest) if right_padded(whole_mask) else None
    # The texts are read at their last token, which is where an `after_prompt` vector already on
    # the model (a composition's first part) acts on a prompt at evaluation: there only, not at every
    # position. That holds for texts that end at the prompt (persona-header contrasts); an answer
    # contrast (prompt + answer: sst2, gsm8k, function_calling) is steered at its last token only, where
    # evaluation steers from the prompt's last token on: a gap for a steering part then `steer_mean`
    # on those tasks, which needs each text's prompt end from `contrast_pairs` to close. A prefix being
    # kept is no text's last token: steered nowhere (its boundary is past its end).
    boundary = torch.full_like(last, input_ids.shape[1]) if keep_cache else past + last
    handles: list[Any] = []
    try:  # the hooks registered inside: one left behind would stop every later forward of the model
        handles += [blocks[i].register_forward_hook(read(i), with_kwargs=True) for i in set(wanted)]
        if mlp is not None:
            handles.append(mlp.register_forward_pre_hook(last_rows_only))
        with (
            prompt_boundary(boundary),
            last_row.last_row_attention(attention, last) if attention is not None else nullcontext(),
            cache_released_block_by_block(model, cache) if cache is not None else nullcontext(),
        ):
            model(
                input_ids=input_ids, attention_mask=needed_attention_mask(whole_mask), use_cache=keep_cache or cache is not None,
                **position_ids_argument(model, (whole_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]),
                **({} if cache is None else {cache_argument(type(base)): cache}),
            )  # fmt: skip
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in wanted]), kept[0]


def needed_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask of a forward read at real tokens only (a cached prefix's columns included): all ones for
    right-padded rows. A real token's query sees only the columns before it, all real, so masking the padding after
    the text changes nothing that is read, and with no padding masked the model takes its causal-only
    attention: no padding mask to build (a vmap in transformers 4.5x, 5 ms a batch of 64) and a faster
    kernel (0.6 ms against 0.9 for the ladder's xl at 64 × 11 tokens). Left padding keeps its mask.
    (All ones, not none: without a mask transformers 4.5x builds one to find packed sequences.)"""
    return torch.ones_like(attention_mask) if right_padded(attention_mask) else attention_mask


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row's real tokens come first, its padding after."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.equal(attention_mask, (columns < attention_mask.sum(-1, keepdim=True)).to(attention_mask.dtype))


def position_ids_argument(model: nn.Module, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """`position_ids` for a forward that takes them; none for one that derives them from the attention mask
    (OPT before transformers 4.5x), which gives right-padded rows and a cached prefix's continuation the same."""
    return {"position_ids": positions} if _takes_position_ids(type(model)) else {}


@functools.cache
def _takes_position_ids(model_class: type) -> bool:
    parameters = inspect.signature(model_class.forward).parameters.values()  # a wrapper's **kwargs passes them on
    return any(p.name == "position_ids" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
