"""Whether a method left the model as it found it: the contract (methods/protocol.py) that lets one loaded model
serve many cells, checked after every cell rather than trusted.

A method that zeroed one weight and never put it back turned every later cell of its worker into a cell of a
changed model, a `base` row among them "gaining" 0.375 over the base score it stored beside it, and every row
said ok (helper-172). What is compared is cheap next to a cell: per tensor a float64 sum and norm (one pass over
the weights), its name, shape, dtype, device and requires_grad; the modules' hooks and train/eval mode; and what
the wrapper puts before every prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.lm import LanguageModel


@dataclass(frozen=True)
class ModelState:
    tensors: dict[str, tuple[str, float, float]]  # name -> (its shape, dtype, device and requires_grad in words, sum, norm)
    hooks: int
    training: bool
    prefix: str
    added_params: int


def model_state(lm: LanguageModel) -> ModelState:
    model = lm.model
    named = [(f"parameter {n}", t) for n, t in model.named_parameters()] + [(f"buffer {n}", t) for n, t in model.named_buffers()]
    with torch.no_grad():
        tensors = {
            name: (f"{tuple(t.shape)} {t.dtype} {t.device} requires_grad={t.requires_grad}", *_sums(t))
            for name, t in named
        }
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks) for m in model.modules())
    return ModelState(tensors, hooks, model.training, lm.prefix, lm.added_params)


def _sums(t: torch.Tensor) -> tuple[float, float]:
    if not (t.is_floating_point() or t.is_complex()):
        t = t.double()  # integer buffers (position ids): sum and norm need a float
    return float(t.sum(dtype=torch.float64)), float(torch.linalg.vector_norm(t, dtype=torch.float64))


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
    found = [f"{name} is gone" for name in before.tensors.keys() - after.tensors.keys()]
    found += [f"{name} was added" for name in after.tensors.keys() - before.tensors.keys()]
    for name in before.tensors.keys() & after.tensors.keys():
        (was, *was_sums), (now, *now_sums) = before.tensors[name], after.tensors[name]
        if was != now:
            found.append(f"{name} was {was}, is {now}")
        elif not all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(was_sums, now_sums)):
            found.append(f"{name}'s values changed (sum {was_sums[0]:.9g} -> {now_sums[0]:.9g})")
    found.sort()
    if before.hooks != after.hooks:
        found.append(f"{after.hooks - before.hooks:+d} hooks on its modules")
    if before.training != after.training:
        found.append(f"it was left in {'train' if after.training else 'eval'} mode")
    if before.prefix != after.prefix:
        found.append(f"the text put before every prompt changed ({before.prefix[:40]!r} -> {after.prefix[:40]!r})")
    if before.added_params != after.added_params:
        found.append(f"the parameters counted as added changed ({before.added_params} -> {after.added_params})")
    return found[:limit] + ([f"and {len(found) - limit} more"] if len(found) > limit else [])
