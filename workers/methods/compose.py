"""`A+B`: fit A, keep it applied, fit B on the result; evaluate with both applied.

A composition is built from the registry on demand (`get_method("steer_mean+lora")`), so any two
methods compose without a module per pair. Its config nests the parts' own configs:

    {"first": {<A's config>}, "second": {<B's config>}}

each defaulting to the part's defaults, and validated with the part's own strict class (so a wrong
key reports a path like `methods.steer_mean+lora.second.rank`). `A+B+C` reads as `A+(B+C)`.

B sees the same training examples as A, through A: in `prompt+X`, X trains with the demonstrations in
front of each example, its own among them wherever they fit (at small budgets, all of them), so X
can learn to copy from its context; its validation-chosen checkpoint is what guards against that.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from pydantic import Field, create_model, model_validator
from torch import nn

from workers.config import StrictConfig
from workers.methods.protocol import Adapter, FitContext, FitReport, Method, MethodKind, PeftUse, declared_validation_choice, model_problem, peft_use


@dataclass
class Stacked:
    first: Adapter
    second: Adapter
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with self.first.applied(), self.second.applied():
            yield


def combined_report(first: tuple[str, FitReport], second: tuple[str, FitReport]) -> FitReport:
    """Costs add up; the layer and scale (`alpha`: a steering scale, a task vector's λ) come from whichever
    part has one (the first if both)."""
    (a_name, a), (b_name, b) = first, second
    steering = a if a.layer is not None or a.alpha is not None else b
    return FitReport(
        trainable_params=a.trainable_params + b.trainable_params,
        train_tokens=a.train_tokens + b.train_tokens,
        post_train_flops=a.post_train_flops + b.post_train_flops,
        layer=steering.layer,
        alpha=steering.alpha,
        selection=f"{a.selection}+{b.selection}",
        val_labels=max(a.val_labels, b.val_labels),  # both parts select on the same shared validation set
        hparams={"first": {"method": a_name, **a.hparams}, "second": {"method": b_name, **b.hparams}},
    )


class Composition:
    def __init__(self, first: Method, second: Method) -> None:
        self.first, self.second = first, second
        self.name = f"{first.name}+{second.name}"
        self.kind: MethodKind = "composition"
        self.config_class: type[StrictConfig] = create_model(
            "CompositionConfig",
            __base__=StrictConfig,
            __doc__=f"Settings of `{self.name}`: `first` for {first.name}, `second` for {second.name}.",
            first=(first.config_class, Field(default_factory=first.config_class)),
            second=(second.config_class, Field(default_factory=second.config_class)),
            # a function of the config alone: pydantic would hand a bound method the validation info instead
            __validators__={"peft_layers_do_not_nest": model_validator(mode="after")(lambda config: self._refuse_nested_peft(config))},
        )

    def peft_use(self, config: StrictConfig) -> PeftUse:
        """A's layers are in the model while B fits; both parts' while applied."""
        first, second = peft_use(self.first, config.first), peft_use(self.second, config.second)  # type: ignore[attr-defined]
        return PeftUse(fitting=first.fitting or first.applied or second.fitting, applied=first.applied or second.applied)

    def validation_choice(self, config: StrictConfig) -> str | None:
        """The parts' own choices; `protocol.validation_choice` adds the learning rates, with their paths here."""
        parts = [declared_validation_choice(self.first, config.first), declared_validation_choice(self.second, config.second)]  # type: ignore[attr-defined]
        return "; ".join(p for p in parts if p) or None

    def model_problem(self, config: StrictConfig, architecture: Callable[[], nn.Module]) -> str | None:
        parts = [model_problem(self.first, config.first, architecture), model_problem(self.second, config.second, architecture)]  # type: ignore[attr-defined]
        return "; ".join(p for p in parts if p) or None

    def _refuse_nested_peft(self, config: StrictConfig) -> StrictConfig:
        """Refused when the config is resolved (so `steerscale plan` says so), not half-way through a cell:
        B would inject PEFT layers while A's are in the model, which PEFT cannot undo for B alone."""
        first, second = peft_use(self.first, config.first), peft_use(self.second, config.second)  # type: ignore[attr-defined]
        if first.applied and (second.fitting or second.applied):
            raise ValueError(
                f"'{self.name}' cannot run: {self.first.name} keeps its PEFT LoRA layers in the model while applied, "
                f"and {self.second.name} injects LoRA layers of its own on top, which PEFT cannot remove without "
                f"removing {self.first.name}'s too; put a weight-space part first instead "
                "(e.g. task_vector with finetune: lora, which applies as plain weights)"
            )
        return config

    def fit(self, ctx: FitContext, config: StrictConfig) -> Stacked:
        first = self.first.fit(ctx, config.first)  # type: ignore[attr-defined]
        with first.applied():
            second = self.second.fit(ctx, config.second)  # type: ignore[attr-defined]
        report = combined_report((self.first.name, first.report), (self.second.name, second.report))
        return Stacked(first, second, report)
