"""`sst2` (general, real data): binary sentiment of movie-review sentences (GLUE SST-2).

Hub `stanfordnlp/sst2` has hidden test labels, so our test and validation splits are carved from its
validation split (four fifths and one fifth, by a hash of the sentence), and train is its train split. Scored by likelihood of " negative" vs " positive";
the elicited prompt states the task as an instruction.
"""

from __future__ import annotations

from typing import Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, answer_contrast, score_choices
from workers.tasks.hub import HubSource, SplitPlan, sample

LABELS = (" negative", " positive")
INSTRUCTION = "Classify the sentiment of the movie review as positive or negative.\n"


def prompt(sentence: str) -> str:
    return f"Review: {sentence.strip()}\nSentiment:"


class SST2:
    name = "sst2"
    data_version = 4  # 2: one row per stripped sentence, none of the test split's in train or validation;
    # 3: each budget's examples drawn for that budget alone (`hub.sample`); 4: validation carved from the hub's validation
    # sentences with test, not from train (see `plan`)
    task_type: TaskType = "general"
    # The hub's train split is 67k phrases cut from ~6.9k sentences' parse trees: validation carved from it by a hash
    # of each phrase put a phrase's parent or child on the other side ("a dull , lifeless mess" in train, "it 's a dull ,
    # lifeless mess" in validation), so choosing on it rewarded memorising. The hub's validation split (872 whole
    # sentences, none in train) gives validation a fifth (~174) and test the rest (~698).
    plan = SplitPlan(train="train", validation="validation", test="validation", columns=("sentence", "label"))

    def __init__(self, source: HubSource = HubSource("stanfordnlp/sst2")) -> None:
        self.source = source

    def pool_size(self, split: Split) -> int | None:
        return self.plan.pool_size(self.name, self.source, split, "sentence")

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        rows = sample(self.plan.rows(self.name, self.source, split, "sentence"), self.name, split, n, seed)
        return [
            Example(
                prompt=prompt(row["sentence"]),
                target=LABELS[label_of(row)],
                choices=LABELS,
                elicited_prompt=INSTRUCTION + prompt(row["sentence"]),
            )
            for row in rows
        ]

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        return answer_contrast(examples)

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        return score_choices(lm, examples, elicited=elicited)


def label_of(row: dict) -> int:
    """0 (negative) or 1 (positive); anything else is refused: -1, how the hub marks hidden test labels,
    would otherwise index LABELS from the end and read as positive. 0.0 and 1.0 (a JSONL written by pandas from a
    column with a gap) are 0 and 1: they passed the check and then failed to index LABELS."""
    label = row["label"]
    if label not in (0, 1):
        raise ValueError(f"sst2: label must be 0 (negative) or 1 (positive), got {label!r} for {row['sentence'][:80]!r}; splits with hidden labels cannot be used")
    return int(label)
