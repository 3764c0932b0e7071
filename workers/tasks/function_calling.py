"""`function_calling` (agentic, real data): pick a tool and its arguments, scored by checking the call.

Hub `Salesforce/xlam-function-calling-60k`: `query`, `tools` and `answers`, the latter two JSON
strings (tools: name, description, parameters; answers: a list of {name, arguments}). The model
sees the tools and the query and must emit the calls as JSON; the score parses the generation
and requires the same calls, each as often (names and argument values; 20 and 20.0 are one value),
not the same string. The hub has one split, so validation and test are carved from it by hash.
"""

from __future__ import annotations

import json
from typing import Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, prompts_of, target_nll
from workers.tasks.hub import HubSource, SplitPlan, sample

INSTRUCTION = "Answer with a JSON list of function calls, each {\"name\": ..., \"arguments\": {...}}.\n"
MAX_NEW_TOKENS = 128  # at least, and the step of `generation_budget` where a reference is longer


def _decoded(value: object) -> list | dict:
    """A JSON column's value, which the hub stores as a string. An export holding the parsed lists is
    refused by name: read through Arrow, each call's arguments gain every other row's keys as null,
    and a right call would score wrong."""
    if not isinstance(value, str):
        raise ValueError(f"function_calling reads `tools` and `answers` as JSON strings, as the hub stores them; got a "
                         f"{type(value).__name__} (a list column gives every call the other rows' argument keys, as null)")  # fmt: skip
    return json.loads(value)


def prompt(tools: str, query: str) -> str:
    return f"Tools: {json.dumps(_decoded(tools), sort_keys=True, ensure_ascii=False)}\nQuery: {query.strip()}\nCalls:"


def _same_number_once(value: object) -> object:
    """`value` with every float that is a whole number written as an int: 20.0 and 20 are one argument."""
    if isinstance(value, dict):
        return {k: _same_number_once(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_number_once(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() else value


def canonical_calls(text: str) -> tuple[str, ...] | None:
    """The calls in `text` (the first JSON list in it that parses as calls: a bracket in prose before
    it is passed over) as canonical strings, sorted, repeats kept (two calls of `roll()` are not one);
    None if there is none."""
    start = text.find("[")
    while start >= 0:
        try:
            calls, _ = json.JSONDecoder().raw_decode(text[start:])
            return tuple(sorted(json.dumps(_same_number_once({"name": c["name"], "arguments": c["arguments"]}), sort_keys=True) for c in calls))
        except (ValueError, KeyError, TypeError, AttributeError):
            start = text.find("[", start + 1)
    return None


def generation_budget(lm: LanguageModel, target: str) -> int:
    """New tokens an example may generate: a generation cut short of its closing bracket cannot parse, so
    room for its reference and some, in steps of MAX_NEW_TOKENS (few distinct budgets: few generate calls),
    and at most half the model's context (the prompt keeps the rest)."""
    needed = lm.token_count(target, prompt=False) + 16
    budget = MAX_NEW_TOKENS * -(-needed // MAX_NEW_TOKENS)
    return budget if lm.max_length is None else max(1, min(budget, lm.max_length // 2))


class FunctionCalling:
    name = "function_calling"
    data_version = 5  # 2: answers decoded plain greedy, not with the checkpoint's shipped decoding settings;
    # 3: one row per stripped query, carved by it; each generation long enough for its own reference; the first list of calls found;
    # 4: tools and calls written with their own characters, not ASCII escapes (what fine-tuning learns to write); each budget's examples drawn
    # for that budget alone (`hub.sample`); 5: the target ends with the end-of-text token (`Example.ends_text`): a tuned
    # model stops after its calls instead of writing to the generation's limit
    task_type: TaskType = "agentic"
    plan = SplitPlan(train="train", validation="train", test="train", columns=("query", "tools", "answers"))

    def __init__(self, source: HubSource = HubSource("Salesforce/xlam-function-calling-60k")) -> None:
        self.source = source

    def pool_size(self, split: Split) -> int | None:
        return self.plan.pool_size(self.name, self.source, split, "query")

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        rows = sample(self.plan.rows(self.name, self.source, split, "query"), self.name, split, n, seed)
        examples = []
        for row in rows:
            calls = _decoded(row["answers"])
            expected = canonical_calls(json.dumps(calls))
            if expected is None:  # scored as "no calls", an empty generation would count as right
                raise ValueError(f"function_calling: a reference answer is not a list of {{name, arguments}} calls: {json.dumps(calls)[:300]}")
            text = prompt(row["tools"], row["query"])
            examples.append(
                Example(
                    prompt=text,
                    target=" " + json.dumps(calls, sort_keys=True, ensure_ascii=False),  # "São Paulo", not "S\\u00e3o Paulo"
                    elicited_prompt=INSTRUCTION + text,
                    meta={"calls": list(expected)},
                    ends_text=True,
                )
            )
        return examples

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """The right calls vs another query's calls, after the same prompt."""
        pairs = []
        for i, ex in enumerate(examples):
            other = examples[(i + 1) % len(examples)]
            if other.target != ex.target:
                pairs.append((ex.prompt + ex.target, ex.prompt + other.target))
        return pairs

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        prompts = prompts_of(examples, elicited=elicited)
        outputs = [""] * len(examples)
        by_budget: dict[int, list[int]] = {}
        for i, example in enumerate(examples):
            by_budget.setdefault(generation_budget(lm, example.target), []).append(i)
        for budget, indices in sorted(by_budget.items()):  # one generate per budget: a long reference lengthens only its own
            for i, output in zip(indices, lm.generate([prompts[i] for i in indices], budget)):
                outputs[i] = output
        correct = [canonical_calls(out) == tuple(ex.meta["calls"]) for out, ex in zip(outputs, examples)]
        return Evaluation.of(correct, target_nll(lm, examples, elicited=elicited))
