"""The agentic scorer runs episodes: the scripted expert always wins, random play and the liar do not."""

from __future__ import annotations

import random
from typing import Sequence

from workers.tasks import get_task
from workers.tasks.gridworld import Episode, expert_policy, liar_action, random_policy, run_episodes, step


def test_scripted_optimal_policy_scores_one_and_random_scores_less() -> None:
    examples = get_task("gridworld").examples("test", 200, seed=0)
    assert sum(run_episodes(expert_policy, examples)) == len(examples)
    random_wins = run_episodes(random_policy(random.Random(0)), examples)
    assert sum(random_wins) < 0.6 * len(examples)


def test_liar_never_reaches_the_goal() -> None:
    def liar(episodes: Sequence[Episode]) -> list[str]:
        return [liar_action(ep.at, ep.goal) for ep in episodes]

    assert not any(run_episodes(liar, get_task("gridworld").examples("validation", 100, seed=0)))


def test_episode_transcript_grows_with_the_policy_moves() -> None:
    ex = get_task("gridworld").examples("train", 1, seed=3)[0]
    seen: list[str] = []

    def recording(episodes: Sequence[Episode]) -> list[str]:
        seen.append(episodes[0].transcript)
        return expert_policy(episodes)

    assert run_episodes(recording, [ex]) == [True]
    assert seen[0] == ex.prompt and all(later.startswith(ex.prompt) for later in seen)
    assert seen[1].endswith(f"{ex.target.strip()} ; at {' '.join(map(str, step(tuple(ex.meta['at']), ex.target.strip())))} ;")


def test_examples_ask_for_the_expert_move_at_their_state() -> None:
    for ex in get_task("gridworld").examples("train", 50, seed=0):
        assert ex.prompt.endswith(f"at {ex.meta['at'][0]} {ex.meta['at'][1]} ;")
        assert expert_policy([Episode(ex.prompt, tuple(ex.meta["at"]), tuple(ex.meta["goal"]), 1)]) == [ex.target.strip()]
