"""One supervised training loop for every method that learns by gradient (LoRA, full FT, vectors).

Kept deliberately plain (AdamW, cosine decay, continuation-only loss) so that a method differs from
another only in *which* parameters it hands to `train`, never in how it is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from pydantic import Field

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.tasks.base import Example


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the cell fails with this instead of storing garbage."""


class TrainConfig(StrictConfig):
    """Optimisation settings shared by gradient-based methods (each method embeds its own copy)."""

    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(4, ge=1)
    min_steps: int = Field(20, ge=0, description="lower bound on optimizer steps, so tiny budgets still train")
    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)


@dataclass
class TrainResult:
    losses: list[float]
    tokens: int  # continuation tokens the optimizer saw (what the loss was computed on)
    sequence_tokens: int  # all tokens that went through the model (what the FLOPs are computed on)

    @property
    def steps(self) -> int:
        return len(self.losses)


def steps_for(n_examples: int, config: TrainConfig) -> int:
    return min(config.max_steps, max(config.min_steps, config.epochs * math.ceil(n_examples / config.batch_size)))


def train(
    lm: LanguageModel, params: Sequence[torch.nn.Parameter], examples: Sequence[Example], config: TrainConfig, seed: int
) -> TrainResult:
    """Minimise the continuation NLL of `examples` over `params`; raise on a non-finite loss."""
    if not examples:
        return TrainResult(losses=[], tokens=0, sequence_tokens=0)
    steps = steps_for(len(examples), config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    was_training = lm.model.training
    lm.model.train()
    losses: list[float] = []
    tokens = sequence_tokens = 0
    try:
        order: list[int] = []
        for step in range(steps):
            if len(order) < min(config.batch_size, len(examples)):
                order += torch.randperm(len(examples), generator=generator).tolist()
            take, order = order[: config.batch_size], order[config.batch_size :]
            batch = next(lm.batches([examples[i].prompt for i in take], [examples[i].target for i in take], batch_size=len(take)))
            loss = lm.loss(batch)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            tokens += batch.target_tokens
            sequence_tokens += int(batch.attention_mask.sum())
    finally:
        optimizer.zero_grad(set_to_none=True)
        lm.model.train(was_training)
    return TrainResult(losses=losses, tokens=tokens, sequence_tokens=sequence_tokens)
