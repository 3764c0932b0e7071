"""`steer_trained`: one steering vector per chosen layer, learned by gradient on the task loss.

A rank-0 adapter: the model is frozen and only d_model numbers per layer are trained, through the
same training loop as LoRA and full fine-tuning, so the three differ only in what they may change.
The vectors start at zero, so step 0 of the shared-validation early stopping is "do nothing".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Iterator

import torch
from pydantic import Field

from workers.config import Distinct, StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport, MethodKind, forward_flops
from workers.methods.steer_mean import DepthFraction, layer_indices
from workers.steering import Positions, decoder_layers, matmul_params_through, residual_width, steer
from workers.training import TrainConfig, train


class SteerTrainedConfig(StrictConfig):
    layers: Annotated[tuple[DepthFraction, ...], Distinct] = Field(
        (0.5,), min_length=1, description="layers to steer, as fractions of depth; one vector is trained per layer"
    )
    positions: Positions = Field("after_prompt", description="steer from the prompt's last token on, or every position")
    train: TrainConfig = TrainConfig(lr=1e-2)


@dataclass
class TrainedVectors:
    lm: LanguageModel
    vectors: dict[int, torch.Tensor]
    positions: Positions
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with steer(self.lm.model, self.vectors, self.positions):
            yield


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """No weight of `model` asks for gradients inside; the previous flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class SteerTrained:
    name = "steer_trained"
    kind: MethodKind = "steering"
    config_class = SteerTrainedConfig

    def fit(self, ctx: FitContext, config: SteerTrainedConfig) -> TrainedVectors:
        model = ctx.lm.model
        layers = layer_indices(config.layers, len(decoder_layers(model)))
        d_model = residual_width(model)
        vectors = {i: torch.nn.Parameter(torch.zeros(d_model, device=ctx.lm.device)) for i in layers}
        with frozen(model), steer(model, vectors, config.positions):
            result = train(ctx.lm, list(vectors.values()), ctx.train, config.train, ctx.seed, ctx.validator())
        # gradients flow back only as far as the earliest steered layer's output: the blocks up to it need none.
        # Those blocks' forward, as it ran: 2·N_before a token; where they are all of them, everything but the head
        # (the last block's MLP ran at the scored positions alone, `workers/last_block.py`: 2·N_before·T billed a
        # backward below zero on a one-block model)
        if min(layers) == len(decoder_layers(model)) - 1:
            before = result.sequence_flops - result.sequence_head_flops
        else:
            before = forward_flops(matmul_params_through(model, min(layers)), result.sequence_tokens)
        backward = result.sequence_flops - before
        report = FitReport(
            trainable_params=d_model * len(layers),
            train_tokens=result.tokens,
            # F + (F − the blocks up to it) for training (see protocol.py), plus the validations' F
            post_train_flops=result.sequence_flops + backward + result.validation_flops,
            layer=layers[0] if len(layers) == 1 else None,
            selection=ctx.selection if result.validation_scores else "fixed",
            val_labels=len(ctx.validation) if result.validation_scores else 0,
            hparams={
                **config.model_dump(mode="json"),
                "layer_indices": layers,
                **result.summary(),
                "vector_norms": [float(v.detach().norm()) for v in vectors.values()],
            },
        )
        return TrainedVectors(ctx.lm, {i: v.detach().clone() for i, v in vectors.items()}, config.positions, report)
