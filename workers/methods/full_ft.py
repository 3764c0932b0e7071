"""`full_ft`: every weight trained on the budget's examples.

Not a special case: `fit` trains in place and then swaps the original weights back, keeping the
trained ones aside; `applied()` swaps the trained tensors in and back out in `finally`. Swapping
`param.data` moves no memory, so applying costs nothing and restores the base bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport, MethodKind
from workers.training import TrainConfig, train


class FullFtConfig(StrictConfig):
    train: TrainConfig = TrainConfig(lr=1e-4)


def _swap(params: list[nn.Parameter], tensors: list[torch.Tensor]) -> None:
    """Exchange each parameter's data with the matching tensor (in both directions)."""
    for i, param in enumerate(params):
        param.data, tensors[i] = tensors[i], param.data


@dataclass
class TrainedWeights:
    lm: LanguageModel
    weights: list[torch.Tensor]  # trained data, one per parameter in `lm.model.parameters()` order
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        params = list(self.lm.model.parameters())
        _swap(params, self.weights)
        try:
            yield
        finally:
            _swap(params, self.weights)


class FullFt:
    name = "full_ft"
    kind: MethodKind = "finetuning"
    config_class = FullFtConfig

    def fit(self, ctx: FitContext, config: FullFtConfig) -> TrainedWeights:
        params = list(ctx.lm.model.parameters())
        original = [p.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            result = train(ctx.lm, params, ctx.train, config.train, ctx.seed, ctx.validator())
        finally:
            trained = original  # after the swap below: the trained data; the model holds the original again
            _swap(params, trained)
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        report = FitReport(
            # a first part's adapters (lora+full_ft), trained here too, are counted by that part
            trainable_params=sum(p.numel() for p in params) - ctx.lm.added_params,
            train_tokens=result.tokens,
            # 6·N·T for training (see protocol.py), plus 2·N·T per validation token
            post_train_flops=3 * result.sequence_flops + result.validation_flops,  # see protocol.py
            selection=ctx.selection if result.validation_scores else "fixed",
            val_labels=len(ctx.validation) if result.validation_scores else 0,
            hparams={
                **config.model_dump(mode="json"),
                **result.summary(),
            },
        )
        return TrainedWeights(ctx.lm, trained, report)
