"""`lora`: low-rank adapters trained with PEFT on the budget's examples.

PEFT injects its layers into the model in place, so the adapter is applied by injecting a fresh
LoRA with the trained weights and removed by `unload()`, which puts the original Linear modules
back: outside `applied()` the model is bit-for-bit the base model again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import Field

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport, forward_flops
from workers.training import TrainConfig, train


class LoraConfig(StrictConfig):
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator: the update is (alpha / rank) · B A")
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train: TrainConfig = TrainConfig()


def _peft_config(config: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules), lora_dropout=0.0
    )


@contextmanager
def lora_injected(lm: LanguageModel, config: LoraConfig, state: dict[str, torch.Tensor] | None) -> Iterator:
    """LoRA layers in `lm.model` (fresh, or loaded from `state`) for the duration; base restored after."""
    requires_grad = {name: p.requires_grad for name, p in lm.model.named_parameters()}
    peft_model = get_peft_model(lm.model, _peft_config(config))
    try:
        if state is not None:
            set_peft_model_state_dict(peft_model, state)
        yield peft_model
    finally:
        peft_model.unload()
        for name, param in lm.model.named_parameters():
            param.requires_grad_(requires_grad.get(name, True))


@dataclass
class LoraAdapter:
    lm: LanguageModel
    config: LoraConfig
    state: dict[str, torch.Tensor]
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with lora_injected(self.lm, self.config, self.state):
            yield


class Lora:
    name = "lora"
    config_class = LoraConfig

    def fit(self, ctx: FitContext, config: LoraConfig) -> LoraAdapter:
        base_params = sum(p.numel() for p in ctx.lm.model.parameters())
        torch.manual_seed(ctx.seed)  # LoRA's A matrices are initialised randomly
        with lora_injected(ctx.lm, config, None) as peft_model:
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            n_trainable = sum(p.numel() for p in trainable)
            result = train(ctx.lm, trainable, ctx.train, config.train, ctx.seed)
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        report = FitReport(
            trainable_params=n_trainable,
            train_tokens=result.tokens,
            # forward 2·N·T, backward through the frozen base for activation gradients only ≈ 2·N·T,
            # plus weight gradients of the adapters themselves ≈ 2·P_lora·T (their forward is in N·T
            # terms negligible but counted): ≈ 4·N·T + 6·P_lora·T.
            post_train_flops=2 * forward_flops(base_params, result.sequence_tokens)
            + 3 * forward_flops(n_trainable, result.sequence_tokens),
            selection="fixed",
            hparams={**config.model_dump(mode="json"), "steps": result.steps, "final_loss": result.losses[-1] if result.losses else None},
        )
        return LoraAdapter(ctx.lm, config, state, report)
