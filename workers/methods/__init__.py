"""Post-training methods by name. Each lives in its own module and implements `protocol.Method`."""

from __future__ import annotations

from typing import Any

from workers.config import StrictConfig, validate_config
from workers.methods.base import Base
from workers.methods.lora import Lora
from workers.methods.protocol import Adapter, FitContext, FitReport, Method
from workers.methods.steer_mean import SteerMean
from workers.registry import Registry

METHODS: Registry[Method] = Registry("method")
for _method in (Base(), SteerMean(), Lora()):
    METHODS.register(_method.name, _method)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def resolve_config(name: str, raw: dict[str, Any] | None, path: str = "") -> StrictConfig:
    """The method's own config with defaults filled in; unknown keys fail with their path."""
    return validate_config(get_method(name).config_class, raw or {}, path or f"methods.{name}")


__all__ = ["METHODS", "Adapter", "FitContext", "FitReport", "Method", "get_method", "resolve_config"]
