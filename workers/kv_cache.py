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


@functools.cache
def cache_argument(model_class: type) -> str:
    """The forward's key/value-cache argument: `cache` since transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def shareable_cache(cache: object) -> object | None:
    """`cache` as an object whose rows can be repeated, or None for a cache type that cannot be.

    transformers < 4.47 hands back the legacy tuple of (key, value) pairs unless a Cache object
    was passed in; `DynamicCache.from_legacy_cache` (removed in 5.x, where no tuples come back)
    wraps it without copying.
    """
    if isinstance(cache, tuple):
        from transformers import DynamicCache  # here, not at the top: importing transformers takes seconds (workers/__init__.py)

        cache = DynamicCache.from_legacy_cache(cache) if hasattr(DynamicCache, "from_legacy_cache") else None
    return cache if hasattr(cache, "batch_repeat_interleave") else None


def cache_among(arguments: Iterable[Any]) -> Any:
    """The key/value cache among a module call's arguments, or None. Found by its type, not its name: a decoder
    block gets it as `cache`, `past_key_values`, `past_key_value` or `layer_past` (GPT-NeoX), or by position
    (GPT-2), as the model and the transformers version have it."""
    from transformers.cache_utils import Cache  # here, not at the top: see shareable_cache

    return next((argument for argument in arguments if isinstance(argument, Cache)), None)


@dataclass(frozen=True)
class SharedPrefix:
    """The keys and values of `length` tokens every row begins with, as a batch of one, kept across forwards."""

    cache: Any  # a transformers Cache (`shareable_cache`)
    length: int

    def for_rows(self, rows: int) -> Any:
        """A fresh cache for a forward of `rows` rows: a forward appends its own keys to the cache it gets."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache
