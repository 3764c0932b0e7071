"""A Llama attention that computes one query row per text: the deepest block of a read-only forward.

`last_token_states` reads each text's residual at its last token and stops after the deepest layer
it wants, so that block's attention is needed at one position a text: its keys and values at every
position, but its query projection, its scores against the keys and its output projection at the
last token alone. Hugging Face's attention computes every position; no option asks for fewer
queries, and a hook cannot shrink the query (the module reshapes it to the input's length). So, for
the architectures whose attention is Llama's exactly (read in transformers' modeling files), the
block's attention forward is swapped for this one while the read runs. Its output is one row a text,
which the decoder layer's residual add broadcasts over the sequence: right at the read column, the
only one read. A cache (a prefix every text shares, run once: `workers.kv_cache.SharedPrefix`) puts
its keys in front of the text's. Calls it was not built for (attention weights asked for, no rotary
tables passed in: transformers < 4.48) go to the module's own forward.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import transformers
from torch import nn
from workers.kv_cache import cache_among

# model types whose attention is LlamaAttention's computation (q/k/v/o projections, rotate-half
# rotary from the layer's `position_embeddings`, grouped keys repeated per query head, no sliding
# window, no query/key norm): Mistral and Qwen2 slide windows, Qwen3 and OLMo2 norm the queries.
_LLAMA_ATTENTION_TYPES = frozenset({"llama"})


@functools.cache
def _returns_two() -> bool:
    """transformers >= 4.48 attention returns (output, weights) and gets the rotary tables from the
    model; before, (output, weights, cache), and it may compute them itself."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) >= (4, 48)


def supported(model: nn.Module, attention: nn.Module) -> bool:
    """Whether `attention` (a decoder block's) can be swapped for the last-row forward."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    transformers_own = type(attention).__module__.startswith("transformers.models.")  # not a remote-code model's attention
    # an instance `forward` is accelerate's device hook (a model split over GPUs): keep it
    return model_type in _LLAMA_ATTENTION_TYPES and transformers_own and _returns_two() and "forward" not in vars(attention)


@contextmanager
def last_row_attention(attention: nn.Module, last: torch.Tensor) -> Iterator[None]:
    """While open, `attention` returns, for each text b, its output at column `last[b]` alone:
    (batch, 1, d). Right padding: text b's real tokens are columns 0..last[b]."""
    own_forward = attention.forward

    def forward(hidden_states: torch.Tensor, position_embeddings: Any = None, attention_mask: Any = None, **rest: Any) -> Any:
        if position_embeddings is None or rest.get("output_attentions"):
            return own_forward(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **rest)
        rows = _forward_last_rows(attention, hidden_states, position_embeddings, last.to(hidden_states.device), cache_among(rest.values()))
        return rows, None

    attention.forward = forward
    try:
        yield
    finally:
        del attention.forward


def _forward_last_rows(
    attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], last: torch.Tensor, cache: Any
) -> torch.Tensor:
    # Llama's own rotary half-turn; imported here, not at the top: steering imports this module, and
    # transformers' modeling code takes seconds to import (workers/__init__.py)
    from transformers.models.llama.modeling_llama import rotate_half

    batch, width, _ = hidden.shape
    head_dim = attention.head_dim
    rows = torch.arange(batch, device=hidden.device)
    query = attention.q_proj(hidden[rows, last].unsqueeze(1)).view(batch, 1, -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(batch, width, -1, head_dim).transpose(1, 2)
    value = attention.v_proj(hidden).view(batch, width, -1, head_dim).transpose(1, 2)
    # (batch, width, head_dim), or (1, width, head_dim) for the positions a forward without position ids assumes
    cos, sin = (table.expand(batch, -1, -1) for table in position_embeddings)
    query = query * cos[rows, last][:, None, None] + rotate_half(query) * sin[rows, last][:, None, None]
    key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
    if cache is not None:  # the shared prefix's keys and values before the text's own, as Llama's attention puts them
        key, value = cache.update(key, value, attention.layer_idx)
    past = key.shape[2] - width  # columns of the prefix: `last` counts from the text's first token
    groups = attention.num_key_value_groups  # HF's repeat_kv: each key head serves `groups` query heads in a row
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # the last token sees every real token: the prefix's columns and the text's 0..last, the padding after it masked out
    seen = (torch.arange(past + width, device=hidden.device) <= past + last.unsqueeze(1)).view(batch, 1, 1, past + width)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=seen, scale=attention.scaling)
    return attention.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
