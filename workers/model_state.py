"""Whether a method left the model as it found it: the contract (methods/protocol.py) that lets one loaded model
serve many cells, checked after every cell rather than trusted.

A method that zeroed one weight and never put it back turned every later cell of its worker into a cell of a
changed model, a `base` row among them "gaining" 0.375 over the base score it stored beside it, and every row
said ok (helper-172). What is compared: per parameter and persistent buffer a float64 sum and norm, its name,
shape, dtype, device and requires_grad; the modules' hooks and train/eval mode; and what the wrapper puts before
every prompt. Non-persistent buffers are not a model's state (nothing loads or saves them) and some models change
them themselves: Phi-3's long-context RoPE swaps its inv_freq whenever a text crosses 4,096 tokens (helper-173).

The state as loaded is taken once per loaded model (`state_as_loaded`), so a cell pays for one pass over its
weights, at the end (~9 s per 10^9 parameters on one CPU thread; a fraction of a second on a GPU), outside its
measured seconds and memory peak.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from workers.lm import LanguageModel

CHUNK = 1 << 24  # elements summed in float64 at a time: a whole 128k × 4096 embedding in float64 would be 4 GB more


@dataclass(frozen=True)
class ModelState:
    tensors: dict[str, tuple[str, float, float]]  # name -> (its shape, dtype, device and requires_grad in words, sum, norm)
    hooks: int
    training: bool
    prefix: str
    added_params: int


_AS_LOADED: weakref.WeakKeyDictionary[nn.Module, ModelState] = weakref.WeakKeyDictionary()


def state_as_loaded(lm: LanguageModel) -> ModelState:
    """`lm`'s state when first asked (a model fresh from its load), kept as long as the model is: after a cell that
    passed `check_unchanged` the model is that state again, so it need not be taken again before the next cell."""
    if lm.model not in _AS_LOADED:
        _AS_LOADED[lm.model] = model_state(lm)
    return _AS_LOADED[lm.model]


def model_state(lm: LanguageModel) -> ModelState:
    model = lm.model
    named = [(f"parameter {n}", t) for n, t in model.named_parameters()]
    named += [(f"buffer {prefix}{'.' if prefix else ''}{n}", t) for prefix, module in model.named_modules()
              for n, t in module._buffers.items() if t is not None and n not in module._non_persistent_buffers_set]  # fmt: skip
    with torch.no_grad():
        tensors = {
            name: (f"{tuple(t.shape)} {t.dtype} {t.device} requires_grad={t.requires_grad}", *_sums(t))
            for name, t in named
        }
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks) for m in model.modules())
    return ModelState(tensors, hooks, model.training, lm.prefix, lm.added_params)


def _sums(t: torch.Tensor) -> tuple[float, float]:
    """The tensor's sum and norm in float64, a chunk at a time (complex: over its real and imaginary parts)."""
    flat = (torch.view_as_real(t) if t.is_complex() else t).detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    squares = torch.zeros((), dtype=torch.float64, device=t.device)
    for chunk in flat.split(CHUNK):
        values = chunk.double()
        total += values.sum()
        squares += values.square().sum()
    return float(total), math.sqrt(float(squares))


class ModelLeftChangedError(RuntimeError):
    """A method broke the protocol: the model after its cell is not the one it was given."""


def check_unchanged(before: ModelState, lm: LanguageModel, method: str) -> None:
    """Raise `ModelLeftChangedError` naming what `method`'s cell left changed in `lm` since `before`."""
    if found := changes(before, model_state(lm)):
        raise ModelLeftChangedError(
            f"method {method} left the model changed after its cell ({'; '.join(found)}): a method must restore what it "
            "changes (workers/methods/protocol.py); the worker loads the model afresh for its next cell"
        )


def changes(before: ModelState, after: ModelState, limit: int = 3) -> list[str]:
    """What differs, in words; empty where nothing does."""
    found = []  # the model-wide changes first: a leaked LoRA's dozens of added tensors must not crowd out its hooks
    if before.hooks != after.hooks:
        found.append(f"{after.hooks - before.hooks:+d} hooks on its modules")
    if before.training != after.training:
        found.append(f"it was left in {'train' if after.training else 'eval'} mode")
    if before.prefix != after.prefix:
        found.append(f"the text put before every prompt changed ({before.prefix[:40]!r} -> {after.prefix[:40]!r})")
    if before.added_params != after.added_params:
        found.append(f"the parameters counted as added changed ({before.added_params} -> {after.added_params})")
    tensors = [f"{name} is gone" for name in before.tensors.keys() - after.tensors.keys()]
    tensors += [f"{name} was added" for name in after.tensors.keys() - before.tensors.keys()]
    for name in before.tensors.keys() & after.tensors.keys():
        (was, *was_sums), (now, *now_sums) = before.tensors[name], after.tensors[name]
        if was != now:
            tensors.append(f"{name} was {was}, is {now}")
        elif not all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(was_sums, now_sums)):
            tensors.append(f"{name}'s values changed (sum {was_sums[0]:.9g} -> {now_sums[0]:.9g})")
    found += sorted(tensors)
    return found[:limit] + ([f"and {len(found) - limit} more"] if len(found) > limit else [])
