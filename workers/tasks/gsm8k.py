"""`gsm8k` (reasoning, real data): grade-school word problems, scored on the generated final answer.

Hub `openai/gsm8k` (config `main`): `question`, and `answer` = worked solution ending in
`#### <number>`. The target is the whole solution (fine-tuning learns to reason and to end with the
marker); the score is exact match of the number right after the last `####` in a greedy generation (or
its last number when no marker has one), read before the generation starts a "Question:" of its own and
compared as a number (18.00 is 18). Validation is carved from the hub's train split.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, prompts_of, target_nll
from workers.tasks.hub import HubSource, SplitPlan, sample

INSTRUCTION = "Solve the problem step by step, then give the final number after '####'.\n"
MAX_NEW_TOKENS = 256
# ".5", but not the 5 of "...5" or "apples.5"; a minus sign (or U+2212) only where a number can start, not the
# hyphen of "7-10" (a range read as 7 and 10)
# commas join digit groups where the last group has three digits or more ("1,234", India's "12,34,567", a typo's
# "1,0000"); before a shorter last group they separate numbers ("1,2,3" read 123, "10,20,30" 102030: lists)
_NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?(?:\d+(?:(?:,\d{2,})*,\d{3,})?(?:\.\d+)?|(?<![\w.])\.\d+)")
_NEXT_PROBLEM = re.compile(r"Question:|\nQ:")  # the prompt's format, or its short form, starting a problem of its own
_MARKED = re.compile(rf"####[ \t]*\$?[ \t]*({_NUMBER.pattern})")  # a number right after the marker: not a "#### Step 1" heading


def prompt(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def final_answer(text: str) -> str | None:
    """The number right after the last '####' that has one (else the last number), read before the text starts a new
    "Question:" (or "Q:" on a line of its own: a model that answered goes on writing the format's next problem,
    numbers and all), written canonically: no commas, no trailing zeros (18.00 -> 18, .5 -> 0.5). The first '####'
    was read: a model writing markdown headings ("#### Step 1: ...", "#### Final answer") was scored on the heading's
    number or the first after it, as lm-eval's strict match is not."""
    text = _NEXT_PROBLEM.split(text, 1)[0]
    return _canonical(_MARKED.findall(text) or _NUMBER.findall(text))


def _canonical(numbers: list[str]) -> str | None:
    """The last of `numbers` without commas or trailing zeros; None where there is none."""
    if not numbers:
        return None
    value = Decimal(numbers[-1].replace(",", "").replace("\u2212", "-"))
    return format(value.normalize(), "f") if value else "0"


class GSM8K:
    name = "gsm8k"
    data_version = 8  # 2: answers decoded plain greedy, not with the checkpoint's shipped decoding settings;
    # 3: one row per stripped question, none of the test split's in train or validation; 4: an answer is read before
    # any "Question:" (or a line's "Q:"), and the hyphen of "7-10" is no minus sign; each budget's examples drawn
    # for that budget alone (`hub.sample`); 5: the number right after the last '####' that has one, not the first
    # '####' (a markdown heading); 6: the target ends with the end-of-text token (`Example.ends_text`): a tuned model
    # stops, where it wrote on to the token limit and its own next problem's '####' was read
    # 7: a comma before a single digit separates numbers ("1,2,3" is three numbers, not 123); 8: so do commas whose
    # last group has fewer than three digits ("10,20,30" is three numbers, not 102030)
    task_type: TaskType = "reasoning"
    plan = SplitPlan(train="train", validation="train", test="test", columns=("question", "answer"))

    def __init__(self, source: HubSource = HubSource("openai/gsm8k", "main")) -> None:
        self.source = source

    def pool_size(self, split: Split) -> int | None:
        return self.plan.pool_size(self.name, self.source, split, "question")

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        rows = sample(self.plan.rows(self.name, self.source, split, "question"), self.name, split, n, seed)
        return [
            Example(
                prompt=prompt(row["question"]),
                target=" " + row["answer"].strip(),
                elicited_prompt=INSTRUCTION + prompt(row["question"]),
                meta={"answer": reference_answer(row)},
                ends_text=True,
            )
            for row in rows
        ]

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """Worked solution vs the same solution with another problem's final answer."""
        pairs = []
        for i, ex in enumerate(examples):
            other = examples[(i + 1) % len(examples)].meta["answer"]
            if other != ex.meta["answer"]:
                wrong = ex.target.rsplit("####", 1)[0] + f"#### {other}"
                pairs.append((ex.prompt + ex.target, ex.prompt + wrong))
        return pairs

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        outputs = lm.generate(prompts_of(examples, elicited=elicited), MAX_NEW_TOKENS)
        correct = [final_answer(out) == ex.meta["answer"] for out, ex in zip(outputs, examples)]
        return Evaluation.of(correct, target_nll(lm, examples, elicited=elicited))


def reference_answer(row: dict) -> str:
    """The number after the reference's last '####'; a reference without one would count every number-less output
    solved, and its last number elsewhere ("3 baskets\n#### many") is no final answer."""
    answer = _canonical(_MARKED.findall(row["answer"]))
    if answer is None:
        raise ValueError(f"gsm8k: the reference answer has no final number after '####' for question {row['question'][:80]!r}; fix or drop that row")
    return answer
