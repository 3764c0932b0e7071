"""Key/value caches of tokens that every row of a forward begins with, run once and shared by the rows.

Scoring shares a batch's leading columns (`LanguageModel.scoring_logits`), steer_mean's extraction the
tokens every contrast text begins with (`workers.steering.shared_prefix`). transformers has changed
both the cache object and the argument that carries it across the versions this project supports.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Iterable

import torch


@functools.cache
def cache_argument(model_class: type) -> str:
    """The forward's key/value-cache argument: `cache` since transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def shareable_cache(cache: object) -> object | None:
    """`cache` as a DynamicCache (a layer's keys grow by concatenation), or None for a cache of another kind.

    transformers < 4.47 hands back the legacy tuple of (key, value) pairs unless a Cache object
    was passed in; `DynamicCache.from_legacy_cache` (removed in 5.x, where no tuples come back)
    wraps it without copying. A static or hybrid cache (Gemma 2 before transformers 4.53) writes into
    tensors allocated for a maximum length, and since 4.56 a DynamicCache may hold layers of other kinds
    (convolution and linear-attention states updated in place: LFM2, Qwen3-Next; DeepSeek's indexer keys):
    none of them a cache whose rows `SharedPrefix` can share.
    """
    from transformers import DynamicCache  # here, not at the top: importing transformers takes seconds (workers/__init__.py)

    if isinstance(cache, tuple):
        cache = DynamicCache.from_legacy_cache(cache) if hasattr(DynamicCache, "from_legacy_cache") else None
    if not isinstance(cache, DynamicCache):
        return None
    return cache if all(type(layer).__name__ in _KEYS_AND_VALUES_ONLY for layer in getattr(cache, "layers", ())) else None


# A DynamicCache's layer kinds (transformers 4.56+) that hold keys and values alone, grown by concatenation
# (DummyLayer: a layer that keeps nothing).
_KEYS_AND_VALUES_ONLY = frozenset({"DynamicLayer", "DynamicSlidingWindowLayer", "DummyLayer"})


def cache_among(arguments: Iterable[Any]) -> Any:
    """The key/value cache among a module call's arguments, or None. Found by its type, not its name: a decoder
    block gets it as `cache`, `past_key_values`, `past_key_value` or `layer_past` (GPT-NeoX), or by position
    (GPT-2), as the model and the transformers version have it."""
    from transformers.cache_utils import Cache  # here, not at the top: see shareable_cache

    return next((argument for argument in arguments if isinstance(argument, Cache)), None)


def layer_tensors(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A DynamicCache's keys and values at layer `index`, or None where it holds none: one object a layer
    (`layers`) since transformers 4.56, two lists (`key_cache`, `value_cache`) before."""
    if hasattr(cache, "layers"):
        layer = cache.layers[index] if index < len(cache.layers) else None
        keys = getattr(layer, "keys", None)
        return None if keys is None or keys.numel() == 0 else (keys, layer.values)
    if index >= len(cache.key_cache) or cache.key_cache[index].numel() == 0:
        return None
    return cache.key_cache[index], cache.value_cache[index]


def _set_layer_tensors(cache: Any, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    if hasattr(cache, "layers"):
        cache.layers[index].keys, cache.layers[index].values = keys, values
    else:
        cache.key_cache[index], cache.value_cache[index] = keys, values


@dataclass(frozen=True)
class SharedPrefix:
    """The keys and values of `length` tokens every row begins with, as a batch of one, kept across forwards."""

    cache: Any  # a DynamicCache (`shareable_cache`)
    length: int
    depth: int  # the deepest decoder layer whose keys and values it holds (the run stopped there)

    def for_rows(self, rows: int) -> Any:
        """A cache for a forward of `rows` rows, which appends its own keys to it: the prefix's keys and values
        repeated over the rows as views (no copy; each layer's attention concatenates the rows' own to them)."""
        cache = copy.copy(self.cache)  # the layer list and objects new, their tensors the prefix's (not copied)
        if hasattr(cache, "layers"):
            cache.layers = [copy.copy(layer) for layer in cache.layers]
        else:
            cache.key_cache, cache.value_cache = list(cache.key_cache), list(cache.value_cache)
        for index in range(len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)):
            if (tensors := layer_tensors(cache, index)) is not None:
                _set_layer_tensors(cache, index, *(t.expand(rows, *t.shape[1:]) for t in tensors))
        return cache


def release_layer(cache: Any, index: int) -> None:
    """Let go of layer `index`'s keys and values (the prefix's and the rows'): a forward that reads no layer's
    cache twice (no generation) calls this as each layer finishes, so that one layer's are held at a time, not
    every layer's to the end of the forward (for 64 rows behind 2,000 shared tokens, tens of gigabytes on a 7B
    model). An empty tensor of the same rank, newly allocated: a slice would keep the storage."""
    if (tensors := layer_tensors(cache, index)) is not None:
        keys, values = tensors
        _set_layer_tensors(cache, index, *(t.new_empty((*t.shape[:2], 0, t.shape[3])) for t in (keys, values)))
