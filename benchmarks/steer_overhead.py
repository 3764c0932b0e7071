"""Comparison 3: what steering costs at inference, steered vs unsteered scoring and generation.

The hook adds one vector (masked to the positions after the prompt) per steered layer, so its
cost should vanish next to the layer's matmuls. Runs alternate steered/unsteered and the overhead
is the median of the paired ratios, which cancels most of the load other jobs put on the machine;
the same from process CPU time is shown next to it (see benchmarks/common.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.common import Check, Result, Row, fmt_time, paired_ratio, time_alternating
from workers.cell import ModelSpec
from workers.models.loading import load_language_model
from workers.steering import decoder_layers, steer
from workers.tasks import get_task


@dataclass(frozen=True)
class Settings:
    model: str
    task: str
    examples: int
    generate_prompts: int
    new_tokens: int
    batch_size: int
    warmup: int
    repeats: int


QUICK = Settings("ladder:test/s", "facts", examples=64, generate_prompts=16, new_tokens=8, batch_size=64, warmup=2, repeats=41)
FULL = Settings("ladder:default/xl", "facts", examples=256, generate_prompts=64, new_tokens=16, batch_size=64, warmup=2, repeats=101)


def run(quick: bool) -> Result:
    s = QUICK if quick else FULL
    lm = load_language_model(ModelSpec(id=s.model), s.batch_size)
    task = get_task(s.task)
    test = task.examples("test", s.examples, 0)
    prompts = [ex.prompt for ex in test[: s.generate_prompts]]
    layer = len(decoder_layers(lm.model)) // 2
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4.0
    result = Result("3. Steering overhead at inference: steered vs unsteered", settings={**asdict(s), "layer": layer, "positions": "after_prompt"})

    def score(v: torch.Tensor | None) -> object:
        if v is None:
            return task.evaluate(lm, test)
        with steer(lm.model, {layer: v}, "after_prompt"):
            return task.evaluate(lm, test)

    def generate(v: torch.Tensor | None) -> list[str]:
        if v is None:
            return lm.generate(prompts, s.new_tokens)
        with steer(lm.model, {layer: v}, "after_prompt"):
            return lm.generate(prompts, s.new_tokens)

    zero = torch.zeros_like(vector)
    plain = score(None)
    plain_text = generate(None)
    same_scores, same_text, changed = score(zero) == plain, generate(zero) == plain_text, score(vector) != plain
    moved = sum(a != b for a, b in zip(generate(vector), plain_text))
    result.checks += [
        Check("zero vector: scoring identical to unsteered", str(same_scores), same_scores),
        Check("zero vector: generations identical to unsteered", str(same_text), same_text),
        Check("the real vector changes the scores (the hook is live)", str(changed), changed),
        Check("the real vector changes generations (the hook is live while generating)", f"{moved} of {len(prompts)} differ", moved > 0),
    ]
    for name, fn in (("scoring (choice log-probs + target NLL)", score), (f"greedy generation, {s.new_tokens} new tokens", generate)):
        times = time_alternating({"plain": lambda: fn(None), "steered": lambda: fn(vector)}, warmup=s.warmup, repeats=s.repeats)
        wall, cpu = (paired_ratio(times["steered"], times["plain"], cpu=c) for c in (False, True))
        result.rows.append(Row(
            f"{name}: steered vs plain time", fmt_time(times["steered"]), f"plain {fmt_time(times['plain'])}",
            f"overhead {100 * (wall - 1):+.1f} % (median paired; CPU time {100 * (cpu - 1):+.1f} %)", "≤ 3 %",
        ))  # fmt: skip
    return result
