"""Post-training methods by name. Each lives in its own module and implements `protocol.Method`.

`get_method("A+B")` builds the composition of two registered methods (see `compose.py`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from workers.config import StrictConfig, validate_config
from workers.methods.base import Base
from workers.methods.compose import Composition
from workers.methods.full_ft import FullFt
from workers.methods.lora import Lora
from workers.methods.prompt import Prompt
from workers.methods.protocol import Adapter, FitContext, FitReport, Method, MethodKind, model_problem, registration_problems, validation_choice
from workers.methods.steer_mean import SteerMean
from workers.methods.steer_trained import SteerTrained
from workers.methods.task_vector import TaskVector
from workers.registry import Registry
from workers.training import TrainConfig, batches_changed, steps_changed, steps_for, training_configs  # what a gradient method's `train` settings mean in steps: the cost model's prior

METHODS: Registry[Method] = Registry("method", registration_problems)
for _method in (Base(), Prompt(), SteerMean(), SteerTrained(), Lora(), FullFt(), TaskVector()):
    METHODS.register(_method.name, _method)


@lru_cache(maxsize=None)
def get_method(name: str) -> Method:
    """A registered method, or the composition `A+B` of two; unknown names get a "did you mean"."""
    first, plus, rest = name.partition("+")
    if plus:
        return Composition(METHODS.get(first), get_method(rest))
    return METHODS.get(name)


def method_versions(name: str) -> dict[str, int]:
    """The versions other than 1 of the method's parts (`A+B`: A's and B's): what a cell's id carries."""
    parts = [METHODS.get(part) for part in name.split("+") if part in METHODS]  # an unknown name's cell is stored failed: version 1
    return {method.name: version for method in parts if (version := getattr(method, "version", 1)) != 1}


def reads_examples(name: str) -> bool:
    """Whether the method (a composition: any of its parts) reads the budget's examples (`reads_examples`, True where absent)."""
    return any(getattr(METHODS.get(part), "reads_examples", True) for part in name.split("+"))


def resolve_config(name: str, raw: dict[str, Any] | None, path: str = "") -> StrictConfig:
    """The method's own config with defaults filled in; unknown keys fail with their path."""
    return validate_config(get_method(name).config_class, raw or {}, path or f"methods.{name}")


__all__ = ["METHODS", "Adapter", "FitContext", "FitReport", "Method", "MethodKind", "TrainConfig", "batches_changed", "get_method", "method_versions", "model_problem", "reads_examples", "resolve_config", "steps_changed", "steps_for", "training_configs", "validation_choice"]
