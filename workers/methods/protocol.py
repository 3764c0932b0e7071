"""The post-training method protocol: fit on a budget of examples, return an adapter to apply.

A method never leaves the model changed: `fit` may train in place but restores the model before
it returns, and the adapter re-applies the result only inside `adapter.applied()`, a context
manager that undoes itself in `finally`. That is what lets one loaded base model serve many cells,
lets compositions stack (`with a.applied(): with b.applied(): ...`), and makes full fine-tuning
just another method rather than a special case in the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ContextManager, Generic, Protocol, TypeVar

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.tasks.base import Example, Task

ConfigT = TypeVar("ConfigT", bound=StrictConfig)
ConfigT_contra = TypeVar("ConfigT_contra", bound=StrictConfig, contravariant=True)


@dataclass
class FitContext:
    """What a method may use: the model, the task, its budget, and the shared validation set.

    `validation` is one fixed, recorded set shared by every method of the sweep (the fair-selection
    protocol "shared_validation"): hyper-parameters chosen on it do not count against the budget,
    and every method may choose "do nothing" (scale 0, no steps) on it.
    """

    lm: LanguageModel
    task: Task
    train: list[Example]
    validation: list[Example]
    seed: int


@dataclass
class FitReport:
    """What the fit did and chose, in the units of the results schema."""

    trainable_params: int = 0
    train_tokens: int = 0
    post_train_flops: float = 0.0
    layer: int | None = None
    alpha: float | None = None
    selection: str = "none"  # how hyper-parameters were chosen
    val_labels: int = 0  # validation labels that choice used
    hparams: dict[str, Any] = field(default_factory=dict)


class Adapter(Protocol):
    report: FitReport

    def applied(self) -> ContextManager[None]:
        """Apply the post-training to the model it was fitted on; undo it on exit, even on error."""
        ...


class Method(Protocol, Generic[ConfigT_contra]):
    name: str
    config_class: type[StrictConfig]

    def fit(self, ctx: FitContext, config: ConfigT_contra) -> Adapter: ...


def forward_flops(params: int, tokens: int) -> float:
    """Forward pass cost ≈ 2 · N · tokens (one multiply-add per parameter per token)."""
    return 2.0 * params * tokens
