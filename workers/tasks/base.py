"""What a task is: examples in three disjoint splits, contrast pairs for steering, and a scorer.

A task answers two questions for a cell: which labelled examples a method may learn from (the
budget is drawn from `train`; hyper-parameter choices use `validation`; scores come from `test`),
and how well a (possibly post-trained) model does. Most tasks are multiple choice and share
`score_choices`; a task that must run an episode (agentic) scores itself by acting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from workers.lm import LanguageModel
from workers.world.text import CORPUS_SOURCE

Split = Literal["train", "validation", "test"]
TaskType = Literal["general", "reasoning", "agentic"]


@dataclass(frozen=True)
class Example:
    """One labelled example. `target` is the continuation the model should produce after `prompt`.

    `choices` lists candidate continuations (target among them) for likelihood scoring; it is empty
    when the task scores by running an episode. `elicited_prompt` is the same question with the
    behaviour asked for explicitly (a persona header, an instruction): the base model's score on it
    is the latent ceiling steering can reach without teaching anything new. `meta` carries what a
    task needs to score the example (an environment's start state, say) as plain JSON-able values.
    `ends_text` marks a target that is the model's whole answer, scored by generating it: training and its
    NLL put the tokenizer's end-of-text token after it, so a tuned model learns to stop (as supervised
    fine-tuning does; without it a tuned model wrote to the token limit, and its made-up next problem was read).
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    elicited_prompt: str | None = None
    ends_text: bool = False
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Evaluation:
    """A model's result on a list of examples: task score in [0, 1] and mean target NLL (nats/token).

    `outcomes` are the examples' own results (True: solved), in order, where the score is their
    mean: every cell of a task is scored on the same test examples, so analysis can redraw the
    examples themselves, the same draw for every cell, and its intervals carry the test set's noise.
    """

    score: float
    nll: float
    outcomes: tuple[bool, ...] = ()

    @classmethod
    def of(cls, outcomes: Sequence[bool], nll: float) -> Evaluation:
        """The score is the share of `outcomes` that are True (0 for no examples)."""
        solved = tuple(bool(o) for o in outcomes)
        return cls(score=sum(solved) / max(len(solved), 1), nll=nll, outcomes=solved)


class Task(Protocol):
    """The interface every task module implements (see workers/tasks/__init__.py for the registry)."""

    name: str
    task_type: TaskType
    # Bumped when the examples a task draws change (a new split rule, another answer) or how its
    # answers are scored does: part of the id of every cell that reads the task, so a resumed sweep
    # reruns those cells instead of keeping rows scored on other questions or by another rule.
    data_version: int

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        """`n` examples of `split`, deterministic in (split, n, seed); splits never share a prompt.

        Train and validation draws depend on `seed` (a cell's seed resamples its data); the test
        split does not, so every cell of a task is scored on the same questions.
        """
        ...

    def pool_size(self, split: Split) -> int | None:
        """How many distinct examples `split` holds (None when counting them needs a download).

        A training budget above the train pool would repeat examples, so planning refuses it.
        """
        ...

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        """(positive, negative) texts whose activation difference points toward the behaviour."""
        ...

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        """Score `lm` on `examples` (with their elicited prompts when `elicited`); the NLL is `target_nll`'s."""
        ...


def registration_problems(name: str, task: object) -> list[str]:
    """What keeps `task` from being registered under `name`: a member of `Task` it lacks failed planning with a
    traceback (`pool_size`) or every steering cell at run time (`contrast_pairs`)."""
    members = ("name", "task_type", "data_version", "examples", "pool_size", "contrast_pairs", "evaluate")
    problems = [f"it has no {member}" for member in members if not hasattr(task, member)]
    if not problems and getattr(task, "name") != name:
        problems.append(f"its name is {getattr(task, 'name')!r}")
    if not problems and not (isinstance(task.data_version, int) and task.data_version >= 1):  # type: ignore[attr-defined]
        problems.append(f"its data_version {task.data_version!r} is no int >= 1")  # type: ignore[attr-defined]
    if name == CORPUS_SOURCE and hasattr(task, "documents"):  # else a clash only once a ladder is built, far from here
        problems.append(f"it writes documents for the ladder's corpus, where {CORPUS_SOURCE!r} is the general text's name")
    return problems


def prompts_of(examples: Sequence[Example], *, elicited: bool) -> list[str]:
    """Each example's prompt, or with `elicited` its elicited prompt where it has one."""
    return [(ex.elicited_prompt or ex.prompt) if elicited else ex.prompt for ex in examples]


def target_nll(lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> float:
    """Mean NLL (nats/token) of each example's target after its prompt: every task's `Evaluation.nll`,
    and all that a validation pass selecting on the NLL needs (no choice scoring, no generation)."""
    return lm.target_nll(prompts_of(examples, elicited=elicited), [ex.target for ex in examples], [ex.ends_text for ex in examples])


def score_choices(lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
    """Accuracy of argmax-likelihood over each example's choices, plus the target's NLL."""
    logprobs = lm.choice_logprobs(prompts_of(examples, elicited=elicited), [ex.choices for ex in examples])
    correct = [ex.choices[max(range(len(lp)), key=lp.__getitem__)] == ex.target for ex, lp in zip(examples, logprobs)]
    return Evaluation.of(correct, target_nll(lm, examples, elicited=elicited))


def answer_contrast(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """CAA-style pairs: the prompt followed by the right answer vs by the next wrong choice."""
    pairs = []
    for ex in examples:
        wrong = [c for c in ex.choices if c != ex.target]
        if wrong:
            pairs.append((ex.prompt + ex.target, ex.prompt + wrong[len(pairs) % len(wrong)]))
    return pairs
