"""`steer_mean`: a contrastive mean-difference vector (Contrastive Activation Addition).

The vector is mean(h⁺) − mean(h⁻) of the residual stream at the last token of the task's
(positive, negative) pairs. Its length is set relative to the layer's mean activation norm, because
raw norms differ by orders of magnitude across sizes and layers (see shared/notes/offline-world.md);
layer and relative scale are chosen on the shared validation set, scale 0 ("do nothing") included.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from pydantic import Field

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport, forward_flops
from workers.steering import decoder_layers, last_token_states, steer


class SteerMeanConfig(StrictConfig):
    layers: tuple[float, ...] = Field(
        (0.25, 0.5, 0.75), description="candidate layers, as fractions of depth (0 = first block, 1 = last)"
    )
    scales: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 1.0, 2.0, 4.0), description="candidate |v| / mean residual norm at the layer; 0 = do nothing"
    )


@dataclass
class SteeringVector:
    lm: LanguageModel
    layer: int
    vector: torch.Tensor
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with steer(self.lm.model, {self.layer: self.vector}):
            yield


def layer_indices(fractions: tuple[float, ...], depth: int) -> list[int]:
    return sorted({min(depth - 1, max(0, round(f * (depth - 1)))) for f in fractions})


def mean_difference(lm: LanguageModel, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer difference of means and mean residual norm over the pairs: each (layers, d) / (layers,)."""
    sums: dict[bool, torch.Tensor | None] = {True: None, False: None}
    norm_sum = None
    for positive in (True, False):
        texts = [p if positive else n for p, n in pairs]
        for batch in lm.batches(texts, [""] * len(texts)):
            states = last_token_states(lm.model, batch.input_ids, batch.attention_mask)  # (L, B, d)
            total = states.sum(1)
            sums[positive] = total if sums[positive] is None else sums[positive] + total
            norms = states.norm(dim=-1).sum(1)
            norm_sum = norms if norm_sum is None else norm_sum + norms
            lm.forward_tokens += int(batch.attention_mask.sum())
    diff = (sums[True] - sums[False]) / len(pairs)
    return diff, norm_sum / (2 * len(pairs))


class SteerMean:
    name = "steer_mean"
    config_class = SteerMeanConfig

    def fit(self, ctx: FitContext, config: SteerMeanConfig) -> SteeringVector:
        params = sum(p.numel() for p in ctx.lm.model.parameters())
        pairs = ctx.task.contrast_pairs(ctx.train)
        depth = len(decoder_layers(ctx.lm.model))
        candidates = layer_indices(config.layers, depth)
        d_model = ctx.lm.model.config.hidden_size
        if not pairs:  # nothing to contrast (e.g. budget too small): the honest answer is "do nothing"
            zero = torch.zeros(d_model, device=ctx.lm.device)
            return SteeringVector(ctx.lm, candidates[0], zero, FitReport(layer=candidates[0], alpha=0.0, selection="no_pairs"))
        tokens_before = ctx.lm.forward_tokens
        diff, mean_norm = mean_difference(ctx.lm, pairs)
        extraction_tokens = ctx.lm.forward_tokens - tokens_before
        best: tuple[float, float, int, torch.Tensor] | None = None  # (score, -|scale|, layer, vector)
        for layer in candidates:
            unit = diff[layer] / diff[layer].norm().clamp(min=1e-12)
            for scale in config.scales:
                vector = unit * scale * mean_norm[layer]
                with steer(ctx.lm.model, {layer: vector}):
                    score = ctx.task.evaluate(ctx.lm, ctx.validation).score
                key = (score, -abs(scale), layer, vector)  # ties go to the smaller scale
                if best is None or key[:2] > best[:2]:
                    best = key
                    chosen = (layer, scale)
        assert best is not None
        report = FitReport(
            trainable_params=0,  # nothing is trained; the d_model numbers are computed, not learned
            train_tokens=extraction_tokens,
            # extraction (a forward over both sides of every pair) + selection (a validation pass per candidate)
            post_train_flops=forward_flops(params, ctx.lm.forward_tokens - tokens_before),
            layer=chosen[0],
            alpha=chosen[1],
            selection="shared_validation",
            val_labels=len(ctx.validation),
            hparams={"layer": chosen[0], "scale": chosen[1], "pairs": len(pairs), "vector_norm": float(best[3].norm())},
        )
        return SteeringVector(ctx.lm, chosen[0], best[3], report)
