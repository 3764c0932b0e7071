"""`base`: no post-training at all — the reference every gain is measured from."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager

from workers.config import StrictConfig
from workers.methods.protocol import FitContext, FitReport, MethodKind


class BaseConfig(StrictConfig):
    """`base` takes no settings."""


@dataclass
class Untouched:
    report: FitReport = field(default_factory=FitReport)

    def applied(self) -> ContextManager[None]:
        return nullcontext()


class Base:
    name = "base"
    kind: MethodKind = "reference"
    config_class = BaseConfig
    reads_examples = False  # its cells are the same at every budget: a sweep plans it at budget 0 alone

    def fit(self, ctx: FitContext, config: BaseConfig) -> Untouched:
        return Untouched()
