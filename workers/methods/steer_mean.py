"""`steer_mean`: a contrastive mean-difference vector (Contrastive Activation Addition).

The vector is mean(h⁺) − mean(h⁻) of the residual stream at the last token of the task's
(positive, negative) pairs. Its length is set relative to the layer's mean activation norm, because
raw norms differ by orders of magnitude across sizes and layers (see shared/notes/offline-world.md);
layer and relative scale are chosen on the shared validation set, scale 0 ("do nothing") included.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Iterator, Sequence

import torch
from pydantic import Field

from workers.config import Distinct, StrictConfig
from workers.lm import SHARED_PREFIX_MIN_TOKENS, LanguageModel
from workers.methods.protocol import FitContext, FitReport, MethodKind
from workers.steering import Positions, decoder_layers, last_token_flops, last_token_states, residual_width, shared_prefix, steer


# A layer is named by its place in the stack, so one config serves every rung of a ladder; an
# index such as 4 would mean a different depth on each model (and is refused, not clamped).
DepthFraction = Annotated[float, Field(ge=0.0, le=1.0)]


class SteerMeanConfig(StrictConfig):
    layers: Annotated[tuple[DepthFraction, ...], Distinct] = Field(
        (0.25, 0.5, 0.75), min_length=1, description="candidate layers, as fractions of depth (0 = first block, 1 = last)"
    )
    scales: Annotated[tuple[float, ...], Distinct] = Field(
        (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
        min_length=1,
        description="candidate |v| / mean residual norm at the layer; 0 = do nothing",
    )
    positions: Positions = Field("after_prompt", description="steer from the prompt's last token on, or every position")


@dataclass
class SteeringVector:
    lm: LanguageModel
    layer: int
    vector: torch.Tensor
    positions: Positions
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with steer(self.lm.model, {self.layer: self.vector}, self.positions):
            yield


def layer_indices(fractions: tuple[float, ...], depth: int) -> list[int]:
    """The block nearest each fraction of the depth; one halfway between two blocks goes to the block nearer the end
    of the stack its fraction is on (the middle's, down). Python's `round` sent it to the even block: 0.5 was block 2
    of 6 (40 %) but block 6 of 12 (55 %), one setting at depths that differ with model size (helper-126). Rungs of 1
    to 3 blocks, the default ladder's, map as `round` mapped them for every fraction, so their cells keep their ids;
    no hub model's row has been stored by this project. The position is rounded to 9 places first: 0.7 of 46 blocks is
    31.499999999999996, a tie the rule must see."""

    def nearest(fraction: float) -> int:
        position = round(fraction * (depth - 1), 9)
        return math.ceil(position - 0.5) if fraction <= 0.5 else math.floor(position + 0.5)

    return sorted({min(depth - 1, max(0, nearest(f))) for f in fractions})


@dataclass(frozen=True)
class ContrastTexts:
    """The texts `mean_difference` runs: each distinct text of the pairs once, encoded, shortest first."""

    weights: torch.Tensor  # (texts, 2): count as positive − count as negative, count on either side
    ids: list[list[int]]
    pairs: int
    # leading tokens every text begins with (a start token, a header, a `prompt` part's demonstrations), short of
    # the shortest text's last: no text is read inside them
    shared: int


def contrast_texts(lm: LanguageModel, pairs: list[tuple[str, str]]) -> ContrastTexts:
    """Encode the pairs' distinct texts (one tokenizer call), sorted by length: a batch of neighbours pads little."""
    weight: dict[str, list[int]] = {}  # text -> [count as positive - count as negative, count on either side]
    for pair in pairs:
        for text, sign in zip(pair, (1, -1)):
            w = weight.setdefault(text, [0, 0])
            w[0] += sign
            w[1] += 1
    texts = list(weight)
    ids = [lm.clipped(row) for row in lm.encode(texts, prompt=True)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    ids = [ids[i] for i in order]
    shared = min(len(os.path.commonprefix(ids)), len(ids[0]) - 1) if ids else 0  # the shortest text keeps its last token
    return ContrastTexts(torch.tensor([weight[texts[i]] for i in order], dtype=torch.float32), ids, len(pairs), shared)


def mean_difference(
    lm: LanguageModel, pairs: list[tuple[str, str]], layers: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Difference of means and mean residual norm over the pairs, per layer: (len(layers), d) / (len(layers),).

    `layers` defaults to all. Each distinct text runs once, weighted by how often it occurs on
    each side (small training pools repeat examples; the means are the same). Positives and
    negatives share forwards, sorted by length so that a batch holds texts of about one length
    (little padding); a forward holds `lm.batch_size` pairs — twice the LM's scoring batch in texts,
    as it computes no logits, most of a scoring forward's memory at a real vocabulary — and stops
    after the deepest layer read.
    """
    return run_contrast_texts(lm, contrast_texts(lm, pairs), layers)


def run_contrast_texts(lm: LanguageModel, planned: ContrastTexts, layers: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forwards of `contrast_texts`, 2 × `lm.batch_size` texts at a time (`LanguageModel.in_batches`: halved
    on running out of accelerator memory), summed into `mean_difference`'s means. The tokens every text begins
    with run once, first (`shared_prefix`), and each batch continues from their keys and values."""
    diff_sum: torch.Tensor | float = 0.0  # batch by batch: no batch's result kept apart
    norm_sum: torch.Tensor | float = 0.0
    long_enough = planned.shared >= SHARED_PREFIX_MIN_TOKENS  # fewer: the cached forwards' masked attention costs more than it saves
    prefix = shared_prefix(lm.model, torch.tensor([planned.ids[0][: planned.shared]], device=lm.device), layers) if long_enough else None
    lm.forward_tokens += planned.shared if long_enough else 0  # run, even where its cache turned out not to be shareable
    skip = 0 if prefix is None else prefix.length

    def run(rows: slice) -> list[None]:
        nonlocal diff_sum, norm_sum
        input_ids, attention = lm.pad([ids[skip:] for ids in planned.ids[rows]])
        states = last_token_states(lm.model, input_ids.to(lm.device), attention.to(lm.device), layers, prefix)  # (L, B, d)
        w = planned.weights[rows].to(states.device)
        # added after the forward: a batch that ran out of memory adds nothing
        diff_sum = diff_sum + torch.einsum("lbd,b->ld", states, w[:, 0])
        norm_sum = norm_sum + states.norm(dim=-1) @ w[:, 1]
        lm.forward_tokens += int(attention.sum())
        return []

    lm.in_batches(len(planned.ids), run, width=2)
    return diff_sum / planned.pairs, norm_sum / (2 * planned.pairs)


def candidate_trials(layers: list[int], scales: Sequence[float]) -> list[tuple[int, float]]:
    """The (layer, scale) candidates worth a validation pass, in order: a zero vector leaves the model as
    it is at every layer, so scale 0 is one candidate (at the first layer), and a repeated scale is one."""
    trials: list[tuple[int, float]] = []
    for layer in layers:
        trials += [(layer, scale) for scale in dict.fromkeys(scales) if scale != 0 or not any(s == 0 for _, s in trials)]
    return trials


class SteerMean:
    name = "steer_mean"
    kind: MethodKind = "steering"
    config_class = SteerMeanConfig
    batch_note = "steer_mean's contrast forwards count pairs of texts"  # what eval.batch_size counts in its own passes

    def validation_choice(self, config: SteerMeanConfig) -> str | None:
        """A choice among layers or scales (layer fractions meet in one layer only on a model too shallow to study)."""
        layers, scales = list(dict.fromkeys(config.layers)), list(dict.fromkeys(config.scales))
        if len(layers) == 1 and len(scales) == 1:
            return None
        return f"steer_mean chooses a layer among the fractions {layers} and a scale among {scales} (give one of each to fix them)"

    def fit(self, ctx: FitContext, config: SteerMeanConfig) -> SteeringVector:
        pairs = ctx.task.contrast_pairs(ctx.train)
        candidates = layer_indices(config.layers, len(decoder_layers(ctx.lm.model)))
        if not pairs:  # nothing to contrast (e.g. budget too small): the honest answer is "do nothing"
            zero = torch.zeros(residual_width(ctx.lm.model), device=ctx.lm.device)
            report = FitReport(layer=candidates[0], alpha=0.0, selection="no_pairs", hparams={"pairs": 0})
            return SteeringVector(ctx.lm, candidates[0], zero, config.positions, report)
        trials = candidate_trials(candidates, config.scales)
        validate = ctx.validator() if len(trials) > 1 else None  # one candidate: nothing to choose, no validation pass
        if len(trials) > 1 and validate is None:  # every candidate would tie at "do nothing"
            raise ValueError(
                f"steer_mean chooses a layer among {candidates} and a scale among {list(config.scales)} on the shared "
                "validation set, but this cell has none (eval.validation_size = 0); give one layer and one scale"
            )
        flops_before = ctx.lm.flops_run
        planned = contrast_texts(ctx.lm, pairs)
        diff, mean_norm = run_contrast_texts(ctx.lm, planned, candidates)
        # billed as each distinct text run whole (through the deepest candidate), shared prefix or not: as LoRA
        # bills PEFT's computation, the extraction's bill does not hang on whether the model's cache could be
        # shared (the validation passes' does: scoring bills a batch's shared columns once where they run once)
        extraction_forward = sum(map(len, planned.ids))
        # the data's tokens, repeats included (the extraction forwards each distinct text once); a `prompt` part's
        # demonstrations in front of every text are its own budget, counted once in its own train_tokens
        with ctx.lm.unprefixed():
            extraction_tokens = sum(map(len, ctx.lm.encode([text for pair in pairs for text in pair], prompt=True)))
        norms = dict(zip(candidates, mean_norm.tolist()))
        units = {layer: (d / d.norm().clamp(min=1e-12)).to(ctx.lm.device) for layer, d in zip(candidates, diff)}
        scores: dict[tuple[int, float], float] = {}
        if validate is not None:
            for layer, scale in trials:
                with steer(ctx.lm.model, {layer: units[layer] * scale * norms[layer]}, config.positions):
                    scores[layer, scale] = validate()
        # ties go to the smaller scale, then to the earlier candidate
        layer, scale = max(trials, key=lambda trial: (scores.get(trial, 0.0), -abs(trial[1])))
        vector = units[layer] * scale * norms[layer]
        report = FitReport(
            trainable_params=0,  # nothing is trained; the d_model numbers are computed, not learned
            train_tokens=extraction_tokens,
            # extraction (a forward over both sides of every pair, up to the deepest candidate layer)
            # + selection (a full validation pass per candidate)
            post_train_flops=last_token_flops(ctx.lm.model, max(candidates), extraction_forward, len(planned.ids))  # one row read a text
            + ctx.lm.flops_run - flops_before,  # the extraction adds nothing there: it stops before the head
            layer=layer,
            alpha=scale,
            selection=ctx.selection if scores else "fixed",
            val_labels=len(ctx.validation) if scores else 0,
            hparams={
                **config.model_dump(mode="json"),
                "layer": layer,
                "scale": scale,
                "pairs": len(pairs),
                "extraction_forward_tokens": extraction_forward,
                "vector_norm": float(vector.norm()),
                "mean_norm": norms[layer],
                "scores": {f"{trial_layer}:{trial_scale}": value for (trial_layer, trial_scale), value in scores.items()},
            },
        )
        return SteeringVector(ctx.lm, layer, vector, config.positions, report)
