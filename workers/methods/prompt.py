"""`prompt`: the budget's examples as few-shot demonstrations in front of every prompt.

No weight changes: the adapter puts the demonstrations before each prompt the model sees (through
`LanguageModel.prefixed`), so every task scores it without knowing; scoring runs the shared
demonstrations once per batch, not once per question (`LanguageModel.scoring_logits`). At most as
many demonstrations as fit the context are used, in the budget's (seeded) order, leaving room for
twice the longest of its task's training and validation questions and of the off-task tasks'
training questions (standing in for the test questions it will be shown); how many is chosen on the shared validation set like every other method's settings (0, "do nothing",
included), since more demonstrations are not always better — a small model pretrained on short
documents gets worse once they run past its documents' length. The neutral texts
(`metrics.neutral_shift`) are documents, not questions: one longer than the room left pushes the
oldest demonstration tokens out, as a sliding window would, and is scored whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pydantic import Field

from workers.config import StrictConfig
from workers.lm import LanguageModel
from workers.methods.protocol import FitContext, FitReport, MethodKind


class PromptConfig(StrictConfig):
    separator: str = Field("\n\n", description="text after each demonstration (e.g. ' ; ' for the synthetic world)")
    max_shots: int | None = Field(None, ge=0, description="at most this many demonstrations; None = as many as fit")
    max_context_tokens: int = Field(
        2048, ge=1, description="cap on prompt length in tokens; the model's own position limit applies when smaller"
    )
    choose_shots: bool = Field(
        True,
        description="choose how many demonstrations on the shared validation set among 0, 1, 2, 4, … and all that "
        "fit (ties go to fewer); false: all that fit",
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
    return min(cap, lm.max_length) if lm.max_length else cap


class Prompt:
    name = "prompt"
    kind: MethodKind = "reference"
    config_class = PromptConfig
    version = 2  # 2: the room after the demonstrations fits the off-task evaluation's questions too

    def validation_choice(self, config: PromptConfig) -> str | None:
        """How many demonstrations, unless `choose_shots` is off (then all that fit)."""
        if not config.choose_shots:
            return None
        return "prompt chooses how many demonstrations among 0, 1, 2, 4, … and all that fit (set choose_shots: false to use all that fit)"

    def fit(self, ctx: FitContext, config: PromptConfig) -> Demonstrations:
        lm = ctx.lm
        limit = context_limit(lm, config.max_context_tokens)
        # a whole generated answer ends with the end-of-text token, as the NLL it is chosen on reads it (`Example.ends_text`):
        # demonstrations without it taught the model to write on, and charged every shot for that
        shown = [*ctx.train, *ctx.validation, *ctx.offtask]
        ends = lm.end_of_text_string if any(ex.ends_text for ex in shown) else ""
        # every kind of question shown under the demonstrations, the off-task evaluation's too: a longer
        # off-task prompt would otherwise be cut into the first demonstration (`LanguageModel.clipped`)
        queries = [ex.prompt + ex.target for ex in shown]  # the end-of-text token is one short: the reserve is twice the longest
        reserve = 2 * max((lm.token_count(q, prompt=True) for q in queries), default=0)
        demos = [ex.prompt + ex.target + (ends if ex.ends_text else "") + config.separator for ex in ctx.train[: config.max_shots]]
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
        fitting = shots
        validate = ctx.validator() if config.choose_shots else None
        if config.choose_shots and validate is None:  # the choice would silently become "all that fit"
            raise ValueError(
                "prompt chooses how many demonstrations on the shared validation set, but this cell has none "
                "(eval.validation_size = 0); set choose_shots: false to use all that fit"
            )
        candidates = shot_counts(fitting) if validate is not None else [fitting]
        values: dict[int, float] = {}
        before = lm.flops_run
        if len(candidates) > 1:
            assert validate is not None
            for k in candidates:
                with lm.prefixed("".join(demos[:k])):
                    values[k] = validate()
        shots = max(candidates, key=lambda k: (values.get(k, 0.0), -k))
        prefix = "".join(demos[:shots])
        prefix_tokens = lm.token_count(prefix, prompt=False) if shots else 0
        report = FitReport(
            train_tokens=prefix_tokens,  # what the model reads of the budget
            post_train_flops=lm.flops_run - before,  # the choice's passes
            selection=ctx.selection if values else "fixed",
            val_labels=len(ctx.validation) if values else 0,
            hparams={
                **config.model_dump(mode="json"), "shots": shots, "shots_fit": fitting,
                "shot_values": {str(k): v for k, v in values.items()}, "prefix_tokens": prefix_tokens, "context_limit": limit,
            },  # fmt: skip
        )
        return Demonstrations(lm, prefix, report)


def shot_counts(fitting: int) -> list[int]:
    """The numbers of demonstrations tried: 0, then powers of two below `fitting`, then `fitting`."""
    counts = [0] + [2**i for i in range(fitting.bit_length()) if 2**i < fitting]
    return counts + [fitting] if fitting else counts
