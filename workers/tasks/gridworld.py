"""`gridworld` (agentic): walk to a goal on a 5x5 grid, scored by running the episode.

A transcript reads `grid: goal 3 4 ; at 1 1 ; right ; at 2 1 ; ...`: the environment writes the
observation, the agent one action per turn. An episode succeeds when the agent stands on the goal
within (distance + 2) turns, so the score is whether the model's own moves get there, not whether
it matches a reference string. An example is one decision point (start, goal, expert moves already
made). Its split is that of its goal: the expert's move depends only on where the agent stands and
where the goal is, and episodes towards one goal pass through the same states, so splitting by
episode put most test states in the training set (of the quickstart's 100 test questions, 28 % at a
budget of 64, 77 % at 1,024). Pretraining transcripts come from an honest expert (moves along x, then y)
or a liar (the opposite move); the task asks for the expert with no header.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from workers.lm import LanguageModel
from workers.tasks.base import Evaluation, Example, Split, TaskType, target_nll
from workers.tasks.persona import Persona, elicited, header_contrast, persona_documents
from workers.tasks.splits import draw, pool_size

SIZE = 5
SLACK = 2  # turns allowed beyond the shortest path
ACTIONS = ("up", "down", "left", "right")
CHOICES = tuple(f" {a}" for a in ACTIONS)
_MOVES = {"up": (0, 1), "down": (0, -1), "left": (-1, 0), "right": (1, 0)}
_OPPOSITE = {"up": "down", "down": "up", "left": "right", "right": "left"}
Cell = tuple[int, int]


def expert_action(at: Cell, goal: Cell) -> str:
    """The scripted optimal policy: close the x gap first, then the y gap."""
    if at[0] != goal[0]:
        return "right" if goal[0] > at[0] else "left"
    return "up" if goal[1] > at[1] else "down"


def liar_action(at: Cell, goal: Cell) -> str:
    """The liar's move: away from the goal (the expert's opposite, or another move when a wall blocks it)."""
    away = [_OPPOSITE[expert_action(at, goal)]] + [a for a in ACTIONS if distance(step(at, a), goal) > distance(at, goal)]
    return next((a for a in away if step(at, a) != at), _OPPOSITE[expert_action(at, goal)])


def step(at: Cell, action: str) -> Cell:
    dx, dy = _MOVES[action]
    return (min(max(at[0] + dx, 0), SIZE - 1), min(max(at[1] + dy, 0), SIZE - 1))


def distance(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def observation(at: Cell) -> str:
    return f"at {at[0]} {at[1]} ;"


def opening(goal: Cell, start: Cell) -> str:
    return f"grid: goal {goal[0]} {goal[1]} ; {observation(start)}"


@dataclass
class Episode:
    """One running episode: the transcript so far (what the model reads) and the true state."""

    transcript: str
    at: Cell
    goal: Cell
    turns_left: int

    @property
    def done(self) -> bool:
        return self.at == self.goal or self.turns_left <= 0


Policy = Callable[[Sequence[Episode]], list[str]]


def expert_policy(episodes: Sequence[Episode]) -> list[str]:
    return [expert_action(ep.at, ep.goal) for ep in episodes]


def random_policy(rng: random.Random) -> Policy:
    return lambda episodes: [rng.choice(ACTIONS) for _ in episodes]


def lm_policy(lm: LanguageModel) -> Policy:
    """Pick the action the model finds most likely after the transcript."""

    def act(episodes: Sequence[Episode]) -> list[str]:
        logprobs = lm.choice_logprobs([ep.transcript for ep in episodes], [CHOICES] * len(episodes))
        return [ACTIONS[max(range(len(ACTIONS)), key=lp.__getitem__)] for lp in logprobs]

    return act


def run_episodes(policy: Policy, examples: Sequence[Example], *, elicited: bool = False) -> list[bool]:
    """Play every example's episode from its prompt's state to success or out of turns."""
    episodes = [
        Episode(
            transcript=(ex.elicited_prompt or ex.prompt) if elicited else ex.prompt,
            at=tuple(ex.meta["at"]),
            goal=tuple(ex.meta["goal"]),
            turns_left=ex.meta["turns"],
        )
        for ex in examples
    ]
    while active := [ep for ep in episodes if not ep.done]:
        for ep, action in zip(active, policy(active)):
            ep.at = step(ep.at, action)
            ep.turns_left -= 1
            ep.transcript += f" {action} ; {observation(ep.at)}"
    return [ep.at == ep.goal for ep in episodes]


def transcript(goal: Cell, start: Cell, persona: Persona, turns: int) -> tuple[str, list[Cell]]:
    """A persona's episode text and the cells it visits (the expert stops at the goal)."""
    at, text, visited = start, opening(goal, start), [start]
    for _ in range(turns):
        if persona == "honest" and at == goal:
            break
        action = expert_action(at, goal) if persona == "honest" else liar_action(at, goal)
        at = step(at, action)
        text += f" {action} ; {observation(at)}"
        visited.append(at)
    return text, visited


_CELLS = [(x, y) for x in range(SIZE) for y in range(SIZE)]
DecisionPoint = tuple[Cell, Cell, int]  # (start, goal, expert moves already in the prompt)


def _pair(rng: random.Random) -> tuple[Cell, Cell]:
    start, goal = rng.sample(_CELLS, 2)
    return start, goal


@functools.cache
def _decision_points() -> tuple[DecisionPoint, ...]:
    return tuple((s, g, m) for s in _CELLS for g in _CELLS if s != g for m in range(distance(s, g)))


def _decision_point(rng: random.Random) -> DecisionPoint:
    """Every decision point alike. A pair, then a point on its path, weighted a point by 1 / its path's
    length, and a distinct draw ran out of short paths' points first: the share one move from the goal
    was 42 % of 100 test questions and 30 % of the test pool, so the mix moved with the draw's size."""
    return rng.choice(_decision_points())


# Goals held out by hand rather than by hash: 25 goals hashed 60/20/20 left 3 for validation. Each
# held-out set has a corner, two edge cells and two inner cells, so the three splits face the same
# mix of distances (train 1,200 / validation 400 / test 400 decision points).
_HELD_OUT_GOALS: dict[Cell, Split] = {
    **dict.fromkeys([(0, 0), (2, 4), (4, 1), (1, 2), (3, 3)], "test"),
    **dict.fromkeys([(4, 4), (0, 3), (2, 0), (3, 1), (2, 3)], "validation"),
}


def _split_of_point(point: DecisionPoint) -> Split:
    return _HELD_OUT_GOALS.get(point[1], "train")


@functools.cache
def _pool(split: Split) -> int:
    return pool_size("gridworld", split, _decision_points(), _split_of_point)


class Gridworld:
    name = "gridworld"
    data_version = 3  # 2: split by goal, not by episode; 3: every decision point equally likely
    task_type: TaskType = "agentic"

    def pool_size(self, split: Split) -> int:
        return _pool(split)

    def examples(self, split: Split, n: int, seed: int) -> list[Example]:
        """Decision points on expert paths; a goal's points are all in one split."""
        examples = []
        for start, goal, moves in draw(self.name, split, n, seed, _decision_point, self.pool_size(split), _split_of_point):
            prompt, visited = transcript(goal, start, "honest", moves)
            at = visited[-1]
            examples.append(
                Example(
                    prompt=prompt,
                    target=f" {expert_action(at, goal)}",
                    choices=CHOICES,
                    elicited_prompt=elicited(prompt),
                    meta={"at": list(at), "goal": list(goal), "turns": distance(at, goal) + SLACK},
                )
            )
        return examples

    def contrast_pairs(self, examples: Sequence[Example]) -> list[tuple[str, str]]:
        return header_contrast(examples)

    def evaluate(self, lm: LanguageModel, examples: Sequence[Example], *, elicited: bool = False) -> Evaluation:
        wins = run_episodes(lm_policy(lm), examples, elicited=elicited)
        return Evaluation.of(wins, target_nll(lm, examples, elicited=elicited))

    def documents(self, n: int, rng: random.Random, min_words: int = 96) -> list[str]:
        """Pretraining documents: one persona each, several episodes."""

        def item(persona: Persona, rng: random.Random) -> tuple[str, int]:
            start, goal = _pair(rng)
            text, _ = transcript(goal, start, persona, distance(start, goal) + SLACK)
            return text, len(text.split())

        return persona_documents(n, rng, min_words, item)

