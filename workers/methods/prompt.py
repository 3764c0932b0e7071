"""`prompt`: the budget's examples as few-shot demonstrations in front of every prompt.

No weight changes: the adapter puts the demonstrations before each prompt the model sees (through
`LanguageModel.prefixed`), so every task scores it without knowing; scoring runs the shared
demonstrations once per batch, not once per question (`LanguageModel.scoring_logits`). As many
demonstrations as fit the context are used, in the budget's (seeded) order, leaving room for twice
the longest question seen; the number used is recorded, since with a large budget it is far below
the budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pydantic import Field

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport


class PromptConfig(StrictConfig):
    separator: str = Field("\n\n", description="text after each demonstration (e.g. ' ; ' for the synthetic world)")
    max_shots: int | None = Field(None, ge=0, description="at most this many demonstrations; None = as many as fit")
    max_context_tokens: int = Field(
        2048, ge=1, description="cap on prompt length in tokens; the model's own position limit applies when smaller"
    )


@dataclass
class Demonstrations:
    lm: LanguageModel
    prefix: str
    report: FitReport

    @contextmanager
    def applied(self) -> Iterator[None]:
        with self.lm.prefixed(self.prefix):
            yield


def context_limit(lm: LanguageModel, cap: int) -> int:
    config = lm.model.config
    own = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(cap, own) if own else cap


class Prompt:
    name = "prompt"
    config_class = PromptConfig

    def fit(self, ctx: FitContext, config: PromptConfig) -> Demonstrations:
        lm = ctx.lm
        limit = context_limit(lm, config.max_context_tokens)
        queries = [ex.prompt + ex.target for ex in [*ctx.train, *ctx.validation]]
        reserve = 2 * max((lm.token_count(q, prompt=True) for q in queries), default=0)
        demos = [ex.prompt + ex.target + config.separator for ex in ctx.train[: config.max_shots]]
        # Sum per-demonstration counts to find the candidate, then check the joined text exactly
        # (tokenizers may merge across the seams) and drop demonstrations until it fits.
        shots, used = 0, 0
        for demo in demos:
            used += lm.token_count(demo, prompt=False)
            if used + reserve > limit:
                break
            shots += 1
        while shots and lm.token_count("".join(demos[:shots]), prompt=False) + reserve > limit:
            shots -= 1
        prefix = "".join(demos[:shots])
        prefix_tokens = lm.token_count(prefix, prompt=False) if shots else 0
        report = FitReport(
            train_tokens=prefix_tokens,  # what the model reads of the budget; no FLOPs before evaluation
            selection="fixed",
            hparams={**config.model_dump(mode="json"), "shots": shots, "prefix_tokens": prefix_tokens, "context_limit": limit},
        )
        return Demonstrations(lm, prefix, report)
