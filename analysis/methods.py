"""Which side of the study a method is on, from its name alone.

The crossover question compares steering with fine-tuning, so every method name must land in one
group without a registry import (analysis never imports workers): names containing "steer" are
steering, `base` and `prompt` are references, compositions `A+B` are their own group, and the rest
(lora, full_ft, ...) are fine-tuning. Each method in `workers.methods` declares its `kind` as well,
and tests/test_methods.py holds the declaration and this rule equal.
"""

from __future__ import annotations

from typing import Literal

MethodKind = Literal["reference", "steering", "finetuning", "composition"]
REFERENCE_METHODS = ("base", "prompt")
PROMPT_METHODS = ("prompt",)  # the budget's examples go in front of every text the model reads (alone or in a composition)


def method_kind(method: str) -> MethodKind:
    if "+" in method:
        return "composition"
    if method in REFERENCE_METHODS:
        return "reference"
    if "steer" in method:
        return "steering"
    return "finetuning"


def components(method: str) -> tuple[str, ...]:
    """The parts of a composition `A+B`, in the order they were applied."""
    return tuple(method.split("+"))
