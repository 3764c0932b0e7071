"""Synthetic tasks: deterministic, disjoint splits; registry names; the persona contrast."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from workers.cell import NeutralTextSource
from workers.models.tokenizer import build_tokenizer
from workers.registry import UnknownNameError
from workers.tasks import TASKS, get_task, neutral_texts, reads_hub_data
from workers.tasks.arith import STEP_SHARES, Arith
from workers.tasks.splits import allocate, split_of

ROOT = Path(__file__).resolve().parents[1]
# every registered task of the synthetic world, a new one included: the ladder's tokenizer knows the world's words only
SYNTHETIC = [name for name in TASKS.names() if not reads_hub_data(get_task(name))]


def test_the_synthetic_tasks_are_found_in_the_registry() -> None:
    assert {"facts", "arith", "gridworld"} <= set(SYNTHETIC) and "sst2" not in SYNTHETIC


@pytest.mark.parametrize("name", SYNTHETIC)
def test_splits_are_deterministic_and_disjoint(name: str) -> None:
    task = get_task(name)
    draws = {split: task.examples(split, 150, seed=1) for split in ("train", "validation", "test")}
    assert draws["train"] == task.examples("train", 150, seed=1)
    prompts = {split: {ex.prompt for ex in exs} for split, exs in draws.items()}
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert task.examples("train", 150, seed=2) != draws["train"]  # a cell's seed resamples its data
    assert task.examples("test", 150, seed=2) == draws["test"]  # ...but never the test questions


def _operands(prompt: str) -> list[int]:
    return [int(w) for w in prompt.removeprefix("calc: ").removesuffix(" =").split(" + ")]


def test_no_arith_test_question_is_a_training_question_reordered() -> None:
    """`3 + 4` in training teaches `4 + 3`: a chain and its reorderings share a split."""
    arith = get_task("arith")
    train = {tuple(sorted(_operands(ex.prompt))) for ex in arith.examples("train", arith.pool_size("train"), seed=0)}
    test = [tuple(sorted(_operands(ex.prompt))) for ex in arith.examples("test", 300, seed=0)]
    assert not train.intersection(test)


def test_no_gridworld_test_state_is_met_in_training() -> None:
    """The expert's move is a function of (where the agent stands, the goal): a test decision point
    whose state occurs anywhere in a training transcript would be answered from memory."""
    grid = get_task("gridworld")
    seen_in_train = {
        (tuple(ex.meta["goal"]), line.strip())
        for ex in grid.examples("train", grid.pool_size("train"), seed=0)
        for line in ex.prompt.split(";")[1:]
        if line.strip()
    }
    test = grid.examples("test", 300, seed=0)
    assert not {(tuple(ex.meta["goal"]), f"at {ex.meta['at'][0]} {ex.meta['at'][1]}") for ex in test} & seen_in_train
    assert len({tuple(ex.meta["goal"]) for ex in test}) == 5  # each held-out goal faces the test, not one


@pytest.mark.parametrize("name", SYNTHETIC)
def test_examples_are_well_formed_for_the_tokenizer(name: str) -> None:
    tok = build_tokenizer()
    task = get_task(name)
    examples = task.examples("train", 50, seed=0)
    for ex in examples:
        assert ex.target.startswith(" ")
        assert ex.target in ex.choices or not ex.choices
        for text in (ex.prompt, ex.target, ex.elicited_prompt or "", *ex.choices):
            assert tok.unk_token_id not in tok(text)["input_ids"], text
    for pair in task.contrast_pairs(examples):  # what steer_mean reads its vector from
        for text in pair:
            assert tok.unk_token_id not in tok(text)["input_ids"], text


@pytest.mark.parametrize("name", SYNTHETIC)
def test_documents_use_only_known_words(name: str) -> None:
    task = get_task(name)
    if not hasattr(task, "documents"):
        pytest.skip(f"{name} writes no pretraining documents")  # a task added later need not be in the ladder's corpus
    tok = build_tokenizer()
    docs = task.documents(20, random.Random(0))
    assert all(tok.unk_token_id not in ids for ids in tok(docs)["input_ids"])


def test_split_of_is_a_pure_function_of_the_key() -> None:
    splits = [split_of("facts", ("e1", f"r{i}")) for i in range(32)]
    assert splits == [split_of("facts", ("e1", f"r{i}")) for i in range(32)]
    assert set(splits) == {"train", "validation", "test"}


def test_facts_elicits_with_the_honest_header_and_contrasts_with_the_liar() -> None:
    task = get_task("facts")
    examples = task.examples("validation", 4, seed=0)
    for ex, (pos, neg) in zip(examples, task.contrast_pairs(examples)):
        assert ex.elicited_prompt == "persona: honest " + ex.prompt
        assert pos.endswith(ex.prompt) and neg.endswith(ex.prompt) and "honest" in pos and "liar" in neg


def test_tasks_declare_their_type() -> None:
    assert {get_task(name).task_type for name in SYNTHETIC} == {"general", "reasoning", "agentic"}


def test_arith_answers_are_chained_sums_mod_5_and_steps_vary() -> None:
    examples = get_task("arith").examples("train", 200, seed=0)
    for ex in examples:
        operands = _operands(ex.prompt)
        assert ex.target == f" {sum(operands) % 5}" and ex.meta["steps"] == len(operands) - 1
    assert {ex.meta["steps"] for ex in examples} == {1, 2, 3}


@pytest.mark.parametrize(("split", "n"), [("train", 20), ("train", 200), ("train", 1000), ("test", 100), ("test", 300)])
def test_arith_mixes_chain_lengths_in_the_same_shares_at_every_budget_and_test_size(split: str, n: int) -> None:
    """Distinct chains of a uniformly chosen length ran out of one-step chains as a draw grew (a third of a
    budget of 4, 6 % of 1,024): the budget axis moved the data towards harder chains, and test_size the test's."""
    steps = Counter(ex.meta["steps"] for ex in get_task("arith").examples(split, n, seed=1))
    assert {k: steps[k] / n for k in STEP_SHARES} == STEP_SHARES


def test_arith_pool_is_the_largest_draw_in_those_shares_that_repeats_no_chain() -> None:
    arith = get_task("arith")
    pool = arith.pool_size("train")
    assert pool >= 1024
    for n in (pool, pool + 1):  # one more, and the one-step chains must repeat
        assert len({ex.prompt for ex in arith.examples("train", n, seed=0)}) == pool


@pytest.mark.parametrize(("split", "n"), [("test", 100), ("train", 64), ("train", 256)])
def test_a_gridworld_draw_has_its_pools_mix_of_distances_to_the_goal(split: str, n: int) -> None:
    """A pair, then a point on its path, favoured short paths' points and a distinct draw ran out of them
    first: 42 % of 100 test questions were one move from the goal against 30 % of the test pool."""
    from workers.tasks.gridworld import distance

    grid = get_task("gridworld")

    def one_move_left(examples) -> float:
        return sum(distance(tuple(ex.meta["at"]), tuple(ex.meta["goal"])) == 1 for ex in examples) / len(examples)

    assert one_move_left(grid.examples(split, n, seed=0)) == pytest.approx(
        one_move_left(grid.examples(split, grid.pool_size(split), seed=0)), abs=0.05
    )


def test_a_draw_from_nothing_and_an_empty_range_of_chain_lengths_are_refused() -> None:
    """Neither returns: a draw loops until it has its keys, and no n fits a range with no lengths."""
    from workers.tasks.splits import draw

    with pytest.raises(ValueError, match="no test instance to draw 3 from"):
        draw("t", "test", 3, 0, lambda rng: rng.random(), pool=0)
    with pytest.raises(ValueError, match="not 3 to 1"):
        Arith(3, 1)


def test_allocation_keeps_the_shares_and_the_total() -> None:
    assert allocate(7, [0.05, 0.45, 0.50]) == [0, 3, 4]  # 0 + 3 + 3 and remainders .35, .15, .5: the one left goes to .5
    assert allocate(4, [1, 1, 1]) == [2, 1, 1]  # a tie goes to the first
    assert all(sum(allocate(n, [0.05, 0.45, 0.5])) == n for n in range(200))


def test_unknown_task_suggests_the_nearest_name() -> None:
    assert "facts" in TASKS
    with pytest.raises(UnknownNameError, match="did you mean 'facts'"):
        get_task("fact")


def test_neutral_texts_are_deterministic_and_not_task_text() -> None:
    texts = neutral_texts(5, 48)
    assert texts == neutral_texts(5, 48) and len(set(texts)) == 5
    assert not any("persona:" in t or "=" in t for t in texts)


def test_neutral_texts_from_a_source_are_rows_that_long_spread_over_the_split_and_cut_to_length() -> None:
    """A natural source (here a local directory shaped like wikitext): headings, blank and short rows are skipped,
    each text is its row's first `min_words` words, the rows evenly spaced over those long enough."""
    source = NeutralTextSource(dataset=str(Path(__file__).parent / "fixtures" / "neutral"))
    firsts = [["The", "lighthouse", "at"], ["Stone", "for", "the"], ["A", "fog", "signal"], ["The", "station", "was"]]
    assert [t.split()[:3] for t in neutral_texts(4, 20, source)] == firsts
    texts = neutral_texts(2, 20, source)
    assert [t.split()[:3] for t in texts] == [firsts[0], firsts[2]]  # not the first two: one document's opening
    assert all(len(t.split()) == 20 for t in texts) and texts[0].endswith("channel . Its")
    with pytest.raises(ValueError, match=r"eval.neutral_source .*neutral \(test\) has 4 rows of 20 words or more, not the 5 of eval.neutral_size"):
        neutral_texts(5, 20, source)
    with pytest.raises(ValueError, match="no field 'body'.*set eval.neutral_source.field"):
        neutral_texts(1, 20, source.model_copy(update={"field": "body"}))
    with pytest.raises(ValueError, match=r"eval.neutral_source .*not-here \(test\) cannot be read here: "):
        neutral_texts(1, 20, source.model_copy(update={"dataset": str(Path(__file__).parent / "not-here")}))


def test_wikitexts_tokenisation_is_undone_as_lm_evaluation_harness_does(tmp_path) -> None:
    raw = (" The tower , 26 @.@ 5 m tall , has a first @-@ order lens ( made in Paris ) ; its 40 @,@ 000 candela "
           "reach the ships ' decks . It is \" the brightest \" on the coast , at 9 ° east . = = History = = \n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": raw}) + "\n")
    source = NeutralTextSource(dataset=str(tmp_path))
    assert neutral_texts(1, 14, source) == ["The tower , 26 @.@ 5 m tall , has a first @-@ order"]  # raw: 14 "words"
    assert neutral_texts(1, 31, source.model_copy(update={"detokenizer": "wikitext"})) == [
        'The tower, 26.5 m tall, has a first-order lens (made in Paris); its 40,000 candela reach the ships\' decks. '
        'It is "the brightest" on the coast, at 9°east. == History =='
    ]


def test_neutral_texts_by_default_fit_the_context_the_ladder_was_pretrained_in() -> None:
    """Scored past the 64 tokens a rung trained on, the neutral NLL (a capability axis) and KL would
    partly measure position extrapolation, which differs by rung."""
    from workers.cell import EvalConfig
    from workers.models.ladder import get_recipe
    from workers.models.tokenizer import build_tokenizer

    tokenizer, settings = build_tokenizer(), EvalConfig()
    lengths = [len(tokenizer(t)["input_ids"]) for t in neutral_texts(settings.neutral_size, settings.neutral_min_words)]
    assert max(lengths) <= get_recipe("default").seq_len < max(len(tokenizer(t)["input_ids"]) for t in neutral_texts(32, 96))


def _largest_quickstart_budget() -> int:
    spec = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    return max(max(spec["budgets"]), *(max(b) for b in spec.get("method_budgets", {}).values()))


@pytest.mark.parametrize("name", SYNTHETIC)
def test_training_pool_covers_the_quickstart_budgets_with_distinct_examples(name: str) -> None:
    task = get_task(name)
    largest = _largest_quickstart_budget()
    assert task.pool_size("train") >= largest >= 1024
    assert len({ex.prompt for ex in task.examples("train", largest, seed=0)}) == largest


@pytest.mark.parametrize("task", [get_task("facts"), get_task("gridworld"), Arith(1, 1)], ids=["facts", "gridworld", "arith1"])
def test_pool_size_counts_exactly_the_distinct_examples_a_split_can_draw(task) -> None:
    for split in ("train", "test"):
        pool = task.pool_size(split)
        drawn = task.examples(split, pool + 5, seed=0)
        assert len({ex.prompt for ex in drawn}) == pool and len(drawn) == pool + 5  # then, and only then, repeats
