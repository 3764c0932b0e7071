"""`task_vector`: weight arithmetic θ_base + λ·Δθ with Δθ from a fine-tune (Ilharco et al. 2023).

The weight-space twin of an activation addition: fine-tune (full or LoRA, its own settings nested
under its name), keep the difference Δθ = θ_tuned − θ_base (for LoRA the merged scale·B·A of every
adapted weight), and choose λ on the shared validation set from a grid that may reach past the
fine-tune (λ > 1) or remove the task (λ < 0); λ = 0 is the untouched model, λ = 1 the fine-tune.
Like `full_ft`, `applied()` swaps freshly computed tensors into `param.data` and swaps the base
tensors themselves back in `finally`, so outside it the model is the base model bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Callable, ContextManager, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from workers.config import Distinct, StrictConfig
from workers.lm import LanguageModel
from workers.methods.full_ft import FullFt, FullFtConfig, TrainedWeights
from workers.methods.lora import Lora, LoraAdapter, LoraConfig, lora_injected
from workers.methods.protocol import FitContext, FitReport, MethodKind, PeftUse, model_problem, peft_use

Deltas = dict[str, torch.Tensor]  # parameter name (as in `model.named_parameters()`) -> Δθ of that parameter


def full_ft_deltas(lm: LanguageModel, tuned: TrainedWeights) -> Deltas:
    """θ_tuned − θ_base for every parameter; the fine-tune's own copy becomes Δθ (no second copy)."""
    with torch.no_grad():
        return {name: trained.sub_(param.data) for (name, param), trained in zip(lm.model.named_parameters(), tuned.weights)}


def lora_deltas(lm: LanguageModel, tuned: LoraAdapter) -> Deltas:
    """PEFT's merged update scale·B·A of each adapted weight, keyed by the base weight's name, in that
    weight's dtype: PEFT keeps adapters in fp32 on a bf16/fp16 model, and θ + λ·Δθ must stay in θ's dtype."""
    from peft.tuners.lora import LoraLayer  # imported late, as in lora_injected

    names = {id(param): name for name, param in lm.model.named_parameters()}
    deltas: Deltas = {}
    with lora_injected(lm, tuned.config, tuned.state) as peft_model, torch.no_grad():
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer):
                weight = layer.get_base_layer().weight
                deltas[names[id(weight)]] = layer.get_delta_weight(peft_model.active_adapter).to(weight.dtype, copy=True)
    return deltas


@dataclass(frozen=True)
class Source:
    """A fine-tuning method Δθ can come from, and how to read Δθ off its adapter."""

    method: FullFt | Lora
    deltas: Callable[[LanguageModel, Any], Deltas]


SOURCES: dict[str, Source] = {"full_ft": Source(FullFt(), full_ft_deltas), "lora": Source(Lora(), lora_deltas)}


class TaskVectorConfig(StrictConfig):
    finetune: Literal["full_ft", "lora"] = Field("full_ft", description="the fine-tune Δθ comes from")
    full_ft: FullFtConfig | None = Field(None, description="its settings when finetune is full_ft (full_ft's defaults if left out)")
    lora: LoraConfig | None = Field(None, description="its settings when finetune is lora (lora's defaults if left out)")
    lambdas: Annotated[tuple[float, ...], Distinct] = Field(
        (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0),
        min_length=1,
        description="candidate λ in θ_base + λ·Δθ, chosen on the shared validation set: 0 = do nothing, "
        "1 = the fine-tune, > 1 extrapolates, < 0 removes the task; one value = fixed, no selection",
    )

    @model_validator(mode="before")
    @classmethod
    def _settings_of_the_chosen_finetune(cls, data: Any) -> Any:
        """Fill the chosen fine-tune's settings with its defaults; settings for the other one are an error
        (they would change nothing but the cell id)."""
        if not isinstance(data, dict):
            return data
        chosen = data.get("finetune", "full_ft")
        if chosen not in SOURCES:  # the field's own error names the choices ('ful_ft' was reported as settings given)
            return data
        for other in SOURCES:
            if other != chosen and data.get(other) is not None:
                raise ValueError(f"'{other}' settings given but finetune is '{chosen}': remove the '{other}' settings, "
                                 f"or give '{chosen}' settings instead")  # fmt: skip
        return {**data, chosen: data.get(chosen) or {}}

    def source_config(self) -> FullFtConfig | LoraConfig:
        config = {"full_ft": self.full_ft, "lora": self.lora}[self.finetune]
        assert config is not None  # filled in by the validator
        return config


@contextmanager
def added(lm: LanguageModel, deltas: Deltas, scale: float) -> Iterator[None]:
    """The model with θ + scale·Δθ for the duration; the base tensors themselves are put back after."""
    params = dict(lm.model.named_parameters())
    targets = [params[name] for name in deltas]
    with torch.no_grad():  # every new tensor exists before the first swap: a failure here leaves the model untouched
        held = [torch.add(param.data, delta, alpha=scale) for param, delta in zip(targets, deltas.values())]
    for i, param in enumerate(targets):
        param.data, held[i] = held[i], param.data
    try:
        yield
    finally:
        for i, param in enumerate(targets):
            param.data, held[i] = held[i], param.data


@dataclass
class WeightArithmetic:
    lm: LanguageModel
    deltas: Deltas
    scale: float  # the chosen λ
    report: FitReport

    def applied(self) -> ContextManager[None]:
        return added(self.lm, self.deltas, self.scale)


def delta_norm(deltas: Deltas) -> float:
    """‖Δθ‖, the L2 norm over every delta together (accumulated in float64)."""
    return math.hypot(*(float(torch.linalg.vector_norm(d, dtype=torch.float64)) for d in deltas.values()))


class TaskVector:
    name = "task_vector"
    kind: MethodKind = "finetuning"
    config_class = TaskVectorConfig

    def peft_use(self, config: TaskVectorConfig) -> PeftUse:
        """The fine-tune's layers while fitting (Δθ is read off them too); applied, Δθ is plain weights."""
        source = peft_use(SOURCES[config.finetune].method, config.source_config())
        return PeftUse(fitting=source.fitting or source.applied)

    def model_problem(self, config: TaskVectorConfig, architecture: Callable[[], nn.Module]) -> str | None:
        return model_problem(SOURCES[config.finetune].method, config.source_config(), architecture)

    def validation_choice(self, config: TaskVectorConfig) -> str | None:
        candidates = list(dict.fromkeys(config.lambdas))
        return f"task_vector chooses λ among {candidates}" if len(candidates) > 1 else None

    def fit(self, ctx: FitContext, config: TaskVectorConfig) -> WeightArithmetic:
        candidates = list(dict.fromkeys(config.lambdas))
        validate = ctx.validator()
        if len(candidates) > 1 and validate is None:  # checked before the fine-tune, which would be wasted
            raise ValueError(
                f"task_vector chooses λ among {candidates} on the shared validation set, "
                "but this cell has none (eval.validation_size = 0); give a single λ"
            )
        source = SOURCES[config.finetune]
        tuned = source.method.fit(ctx, config.source_config())  # type: ignore[arg-type]
        deltas = source.deltas(ctx.lm, tuned)
        scores: dict[float, float] = {}
        before = ctx.lm.forward_tokens, ctx.lm.flops_run
        if len(candidates) > 1:
            assert validate is not None
            for scale in candidates:
                with added(ctx.lm, deltas, scale):
                    scores[scale] = validate()
        # ties go to the smaller |λ| (0, "do nothing", first), then to adding over removing
        scale = max(candidates, key=lambda s: (scores.get(s, 0.0), -abs(s), s))
        selection_tokens, selection_flops = ctx.lm.forward_tokens - before[0], ctx.lm.flops_run - before[1]
        inner = tuned.report
        report = FitReport(
            trainable_params=inner.trainable_params,
            train_tokens=inner.train_tokens,
            # the fine-tune's own cost (see protocol.py) + the λ validations' forwards
            post_train_flops=inner.post_train_flops + selection_flops,
            alpha=scale,
            selection=ctx.selection if scores or inner.selection == ctx.selection else "fixed",
            val_labels=len(ctx.validation) if scores else inner.val_labels,
            hparams={
                "finetune": config.finetune,
                config.finetune: inner.hparams,  # its settings and training record
                "lambdas": list(config.lambdas),
                "lambda": scale,
                "lambda_scores": {str(s): v for s, v in scores.items()},
                "lambda_tokens": selection_tokens,
                "delta_norm": delta_norm(deltas),
                "delta_params": sum(d.numel() for d in deltas.values()),
            },
        )
        return WeightArithmetic(ctx.lm, deltas, scale, report)
