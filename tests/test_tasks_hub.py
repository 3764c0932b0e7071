"""Real-dataset adapters, run on local fixture files shaped like the hub datasets (no download)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest

from workers.run_cell import evaluation_examples, training_examples
from workers.tasks import TASKS
from workers.tasks.base import Example
from workers.tasks.function_calling import FunctionCalling, canonical_calls
from workers.tasks.gsm8k import GSM8K, final_answer
from workers.tasks.hub import HubSource
from workers.tasks.sst2 import SST2, label_of

FIXTURES = Path(__file__).parent / "fixtures"


def adapters() -> dict[str, object]:
    return {
        "sst2": SST2(HubSource(str(FIXTURES / "sst2"))),
        "gsm8k": GSM8K(HubSource(str(FIXTURES / "gsm8k"))),
        "function_calling": FunctionCalling(HubSource(str(FIXTURES / "xlam"))),
    }


class ScriptedLM:
    """A dummy backend: generates a fixed reply per prompt and prefers one choice per prompt."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [self.replies.get(p, "") for p in prompts]

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return [[0.0 if c == self.replies.get(p) else -1.0 for c in cs] for p, cs in zip(prompts, choices)]

    def target_nll(self, prompts: Sequence[str], targets: Sequence[str], ends_text: Sequence[bool] | None = None) -> float:
        return 0.5

    max_length = None

    def token_count(self, text: str, *, prompt: bool) -> int:
        return len(text.split())


def test_adapters_are_registered_under_hub_names_with_their_types() -> None:
    assert {TASKS.get(n).task_type for n in ("sst2", "gsm8k", "function_calling")} == {"general", "reasoning", "agentic"}
    assert TASKS.get("gsm8k").source == HubSource("openai/gsm8k", "main")


@pytest.mark.parametrize("name", ["sst2", "gsm8k", "function_calling"])
def test_fixtures_become_examples_in_disjoint_deterministic_splits(name: str) -> None:
    task = adapters()[name]
    splits = {s: task.examples(s, 100, seed=0) for s in ("train", "validation", "test")}
    assert all(splits.values()) and all(isinstance(ex, Example) for exs in splits.values() for ex in exs)
    prompts = {s: {ex.prompt for ex in exs} for s, exs in splits.items()}
    assert not (prompts["train"] & prompts["validation"] or prompts["train"] & prompts["test"] or prompts["validation"] & prompts["test"])
    assert task.examples("test", 100, seed=5) == splits["test"]
    assert [ex.prompt for ex in task.examples("train", 3, seed=1)] != [ex.prompt for ex in task.examples("train", 3, seed=2)]
    for ex in splits["train"]:
        assert ex.target.startswith(" ") and ex.elicited_prompt and ex.elicited_prompt.endswith(ex.prompt)
        assert ex.ends_text == (name != "sst2")  # a generated answer ends the text: a tuned model learns to stop
    assert task.contrast_pairs(splits["train"])


def test_sst2_targets_follow_labels_and_validation_shares_no_phrase_source_with_train() -> None:
    """Validation and test are carved from the hub's validation sentences. Validation carved from the hub's train
    split (phrases cut from the same sentences' parse trees) held a parent or child phrase of a training phrase: the
    settings chosen on it rewarded memorising (helper-135)."""
    rows = [json.loads(line) for line in (FIXTURES / "sst2" / "validation.jsonl").read_text().splitlines()]
    by_prompt = {f"Review: {r['sentence'].strip()}\nSentiment:": r["label"] for r in rows}
    examples = adapters()["sst2"].examples("test", 100, seed=0)
    validation = adapters()["sst2"].examples("validation", 100, seed=0)
    assert examples and validation and len(examples) > len(validation)  # four fifths and one fifth, by hash
    assert sorted(ex.prompt for ex in examples + validation) == sorted(by_prompt)
    assert all(ex.target == (" positive" if by_prompt[ex.prompt] else " negative") for ex in examples + validation)
    right = ScriptedLM({ex.prompt: ex.target for ex in examples})
    assert adapters()["sst2"].evaluate(right, examples).score == 1.0


def test_gsm8k_scores_the_generated_final_number() -> None:
    task = adapters()["gsm8k"]
    examples = task.examples("test", 100, seed=0)
    right = ScriptedLM({ex.prompt: f"some steps\n#### {ex.meta['answer']}" for ex in examples})
    wrong = ScriptedLM({ex.prompt: f"#### {int(ex.meta['answer']) + 1}" for ex in examples})
    assert task.evaluate(right, examples).score == 1.0
    assert task.evaluate(wrong, examples).score == 0.0
    assert final_answer("so 3 + 4 = 7 then 1,200 apples") == "1200"
    assert final_answer("#### 12.0 and then 5") == "12"
    assert final_answer("no number") is None
    assert final_answer("The answer is 18.\n\nQuestion: Tom has 3 apples and buys 4 more") == "18"  # not its own next problem's
    assert final_answer("#### 18\n\nQuestion: Ann has #### 25") == "18"
    assert final_answer("#### 18.00") == final_answer("#### 18") == "18" and final_answer("#### 1,800") == "1800"
    assert final_answer("#### .5") == "0.5" != final_answer("#### 5") and final_answer("#### -0.0") == "0"
    assert final_answer("He had...5 apples") == final_answer("so 3 apples.5") == "5"
    # a next problem without the newline, or in the short format; a range's hyphen; a typeset minus (helper-104)
    assert final_answer(" The answer is 18. Question: Tom has 3 apples") == final_answer("The answer is 18.\n\nQ: Sam has 4") == "18"
    assert final_answer("between 7-10 cookies") == "10" and final_answer("#### \u22125") == final_answer("#### -5") == "-5"
    assert final_answer("x = -3") == "-3" and final_answer("(-2.5)") == "-2.5"
    # markdown headings: the first '####' was read, scoring the heading's number or the first after it (helper-128)
    assert final_answer("#### Step 1: total\n57 + 13 = 70\n#### Step 2: give one away\n70 - 1 = 69\n#### 69") == "69"
    assert final_answer("#### Final answer\nShe has 57 + 13 - 1 = 69 apples.") == "69"
    assert final_answer("#### $1,234.50 in all") == "1234.5" and final_answer("#### 7\n#### 8 (corrected)") == "8"
    # a comma before a single digit separates numbers: a list "1,2,3" read as 123 (session 42's notes); other groupings
    # stay one number, a trailing comma is punctuation (helper-149)
    assert final_answer("the numbers are 1,2,3") == "3" and final_answer("it costs 1,000, then more") == "1000"
    assert final_answer("#### 12,34,567") == "1234567" and final_answer("#### 1,0000") == "10000" and final_answer("-1,234.5") == "-1234.5"
    # a last group of two digits is a list's too: "10,20,30" was read as 102030 (session 44's notes)
    assert final_answer("the multiples are 10,20,30") == "30" and final_answer("#### 1,00,000") == "100000"


def test_function_calls_are_compared_as_parsed_calls_not_strings() -> None:
    task = adapters()["function_calling"]
    examples = task.examples("test", 100, seed=0)
    reordered = {}
    for ex in examples:
        calls = json.loads(ex.target)
        reordered[ex.prompt] = "Sure: " + json.dumps(list(reversed(calls)), indent=1) + " done"
    assert task.evaluate(ScriptedLM(reordered), examples).score == 1.0
    assert task.evaluate(ScriptedLM({}), examples).score == 0.0
    assert canonical_calls('[{"name": "f", "arguments": {"a": 1}}]') == canonical_calls('[{"arguments": {"a": 1}, "name": "f"}]')
    assert canonical_calls('[{"name": "f"}]') is None and canonical_calls("[oops") is None
    roll = '{"name": "roll", "arguments": {}}'
    assert canonical_calls(f"[{roll}]") != canonical_calls(f"[{roll}, {roll}]") != canonical_calls(f"[{roll}, {roll}, {roll}]")
    assert canonical_calls('[{"name": "pay", "arguments": {"amount": 20}}]') == canonical_calls('[{"name": "pay", "arguments": {"amount": 20.0}}]')
    assert canonical_calls('[{"name": "pay", "arguments": {"amount": 20.5}}]') != canonical_calls('[{"name": "pay", "arguments": {"amount": 20}}]')
    assert canonical_calls("[1, 2]") is None


def _function_calling_rows(directory: Path, rows: list[dict]) -> object:
    from workers.tasks.function_calling import FunctionCalling

    directory.mkdir()  # a directory per source: rows are cached per source
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return FunctionCalling(HubSource(str(directory)))


def test_function_calling_refuses_list_columns_and_a_reference_it_cannot_score(tmp_path) -> None:
    """An export storing `tools` and `answers` as lists crashed with a TypeError; read through Arrow, each
    call would gain the other rows' argument keys as null. A reference that does not parse as calls used
    to become "no calls", which an empty generation then matched."""
    rows = [{"query": f"q{i}", "tools": json.dumps([{"name": "roll", "parameters": {}}]),
             "answers": json.dumps([{"name": "roll", "arguments": {"n": i} if i % 2 else {"sides": 6}}])} for i in range(40)]  # fmt: skip
    task = _function_calling_rows(tmp_path / "strings", rows)
    examples = task.examples("test", 5, seed=0)
    assert examples and task.evaluate(ScriptedLM({ex.prompt: ex.target for ex in examples}), examples).score == 1.0
    assert all("null" not in ex.target for ex in examples)
    listed = _function_calling_rows(tmp_path / "lists", [{**r, "tools": json.loads(r["tools"]), "answers": json.loads(r["answers"])} for r in rows])
    with pytest.raises(ValueError, match="reads `tools` and `answers` as JSON strings"):
        listed.examples("test", 5, seed=0)
    broken = _function_calling_rows(tmp_path / "broken", [{**r, "answers": json.dumps([{"name": "roll"}])} for r in rows])
    with pytest.raises(ValueError, match="a reference answer is not a list of"):
        broken.examples("test", 5, seed=0)


def test_function_calling_writes_tools_and_calls_in_their_own_characters(tmp_path) -> None:
    """json.dumps' ASCII escapes made fine-tuning learn to write "S\\u00e3o Paulo" (and its NLL count the escapes' tokens)."""
    rows = [{"query": f"weather in São Paulo, day {i}", "tools": json.dumps([{"name": "météo", "parameters": {}}]),
             "answers": json.dumps([{"name": "météo", "arguments": {"city": "São Paulo", "day": i}}])} for i in range(40)]  # fmt: skip
    task = _function_calling_rows(tmp_path / "accents", rows)
    examples = task.examples("test", 5, seed=0)
    assert all("São Paulo" in ex.target and "météo" in ex.prompt and "\\u" not in ex.target + ex.prompt for ex in examples)
    assert task.evaluate(ScriptedLM({ex.prompt: ex.target for ex in examples}), examples).score == 1.0


def test_a_dataset_that_cannot_be_had_stops_a_local_run_before_any_cell(tmp_path, monkeypatch) -> None:
    """The driver reads each hub task's splits, and each natural neutral text's, once, up front (`cli._prepare_data`):
    offline with no cache, every cell failed with the same error, once per cell; the synthetic tasks are not looked at."""
    from orchestrator.cli import _prepare_data
    from workers.cell import EvalConfig, NeutralTextSource
    from workers.config import ConfigError

    def cells(*tasks: str, neutral: str | None = None, size: int = 3, field: str = "text") -> list[SimpleNamespace]:
        source = NeutralTextSource(dataset=neutral, field=field) if neutral else None  # what the driver reads of a planned cell:
        return [SimpleNamespace(config=SimpleNamespace(tasks_read=tasks, eval=EvalConfig(neutral_source=source, neutral_size=size,
                                                                                          neutral_min_words=20)))]  # fmt: skip

    tasks = {**adapters(), "facts": TASKS.get("facts"), "gsm8k": GSM8K(HubSource(str(tmp_path / "not-here")))}
    monkeypatch.setattr(TASKS, "get", tasks.__getitem__)
    _prepare_data(cells("sst2", "function_calling", "facts", neutral=str(FIXTURES / "neutral")))
    with pytest.raises(ConfigError, match=r"task gsm8k: its dataset cannot be read here: .*not-here"):
        _prepare_data(cells("sst2", "gsm8k"))
    renamed = tmp_path / "gsm8k"  # a column under another name: every cell failed with a bare KeyError: 'answer'
    renamed.mkdir()
    for split in ("train", "test"):
        (renamed / f"{split}.jsonl").write_text((FIXTURES / "gsm8k" / f"{split}.jsonl").read_text().replace('"answer"', '"solution"'))
    tasks["gsm8k"] = GSM8K(HubSource(str(renamed)))
    with pytest.raises(ConfigError, match=rf"task gsm8k: its dataset cannot be read here: {renamed}/train.jsonl has no column "
                                          r"'answer' \(its columns: question, solution\); the task reads question, answer$"):  # fmt: skip
        _prepare_data(cells("sst2", "gsm8k"))
    with pytest.raises(ConfigError, match=r"eval.neutral_source .*not-here \(test\) cannot be read here: .*not-here"):
        _prepare_data(cells("sst2", neutral=str(tmp_path / "not-here")))
    # the rows it would cut: a field they lack, or too few long enough, fail here too, not in every cell after its model loads
    with pytest.raises(ConfigError, match=r"eval.neutral_source .*neutral \(test\): its rows have no field 'body'"):
        _prepare_data(cells("sst2", neutral=str(FIXTURES / "neutral"), field="body"))
    with pytest.raises(ConfigError, match=r"has 4 rows of 20 words or more, not the 32 of eval.neutral_size"):
        _prepare_data(cells("sst2", neutral=str(FIXTURES / "neutral"), size=32))
    _prepare_data(cells("sst2", neutral=str(tmp_path / "not-here"), size=0))  # no neutral texts: nothing to read


def test_each_budget_draws_its_own_examples_as_the_synthetic_tasks_do() -> None:
    """One stream per (split, seed) nested a budget's examples in the next only while `random.sample` kept one
    algorithm (on sst2's 53k rows, 4,096 in 8,192 not): now every budget is its own draw, repeatable."""
    from workers.tasks.hub import sample

    rows = [{"i": i} for i in range(60_000)]
    draws = {n: {r["i"] for r in sample(rows, "sst2", "train", n, seed=0)} for n in (1024, 2048, 4096, 8192)}
    assert all(not draws[n] <= draws[2 * n] for n in (1024, 2048, 4096))  # independent, not nested by chance
    assert draws[1024] == {r["i"] for r in sample(rows, "sst2", "train", 1024, seed=0)}  # and the same again
    assert sample(rows, "sst2", "test", 50, seed=0) == sample(rows, "sst2", "test", 50, seed=3)  # the test draw ignores the seed


def test_a_test_size_above_the_split_fails_the_cell_instead_of_scoring_fewer() -> None:
    """A hub test split of 872 rows asked for 1,000 was scored in silence on 872."""
    task = adapters()["sst2"]
    available = len(task.examples("test", 10_000, seed=0))
    assert len(evaluation_examples(task, "test", available, 0, "eval.test_size")) == available
    with pytest.raises(ValueError, match=f"has {available} distinct test examples, fewer than eval.test_size = {available + 1}: lower it"):
        evaluation_examples(task, "test", available + 1, 0, "eval.test_size")
    gridworld = TASKS.get("gridworld")  # a synthetic draw would repeat questions instead (a cell.json run by hand): refused alike
    pool = gridworld.pool_size("validation")
    assert len({ex.prompt for ex in evaluation_examples(gridworld, "validation", pool, 0, "eval.validation_size")}) == pool
    with pytest.raises(ValueError, match=f"has {pool} distinct validation examples, fewer than eval.validation_size = {pool + 1}"):
        evaluation_examples(gridworld, "validation", pool + 1, 0, "eval.validation_size")


def test_a_budget_above_the_split_fails_the_cell_instead_of_training_on_fewer() -> None:
    """A hub id's pool is unknown at planning; the cell must not store a row claiming more examples than it had."""
    task = adapters()["sst2"]
    available = len(task.examples("train", 10_000, seed=0))
    assert len(training_examples(task, available, seed=0)) == available
    with pytest.raises(ValueError, match=f"has {available} distinct training examples, fewer than the cell's budget of {available + 1}"):
        training_examples(task, available + 1, seed=0)
    facts = TASKS.get("facts")  # a synthetic pool would repeat examples instead: refused the same way
    with pytest.raises(ValueError, match="fewer than the cell's budget"):
        training_examples(facts, facts.pool_size("train") + 1, seed=0)


def test_a_budget_past_a_known_pool_is_refused_without_drawing_it(monkeypatch) -> None:
    """A budget of 10^7 on facts' pool of 1,158 drew ten million examples (75 s) before counting them short."""
    facts = TASKS.get("facts")
    pool = facts.pool_size("train")
    monkeypatch.setattr(type(facts), "examples", lambda *args: pytest.fail("drew the examples of a budget past the pool"))
    with pytest.raises(ValueError, match=f"has {pool} distinct training examples, fewer than the cell's budget of 10000000"):
        training_examples(facts, 10**7, seed=0)


def test_a_hub_tasks_rows_are_pinned_by_a_digest_that_moves_with_its_data(tmp_path, monkeypatch) -> None:
    """A hub id loads its `main`, which can move between a sweep's cells: each row records a digest of
    the task's rows, which changes when one label does and not when nothing does."""
    import shutil

    from workers.tasks import hub_data_digest
    from workers.tasks.hub import SplitPlan, load_rows, rows_digest

    def new_worker() -> None:  # a new worker process starts with none of the rows read before
        load_rows.cache_clear(), rows_digest.cache_clear(), SplitPlan.rows.cache_clear()

    copy = tmp_path / "sst2"
    shutil.copytree(FIXTURES / "sst2", copy)
    monkeypatch.setitem(TASKS._items, "sst2", SST2(HubSource(str(copy))))
    first = hub_data_digest("sst2")
    assert hub_data_digest("facts") is None  # the synthetic world's data is pinned by its code and data_version
    lines = (copy / "validation.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    lines[0] = json.dumps({**row, "label": 1 - row["label"]})
    (copy / "validation.jsonl").write_text("\n".join(lines) + "\n")
    new_worker()  # reading the moved data
    second = hub_data_digest("sst2")
    assert first and second and len(first) == 64 and second != first
    monkeypatch.setitem(TASKS._items, "sst2", SST2(HubSource(str(copy))))
    new_worker()
    assert hub_data_digest("sst2") == second


def test_a_reference_without_a_final_number_or_a_hidden_label_is_refused_by_name(tmp_path) -> None:
    """gsm8k: a reference with no number after '####' read as None, and every output with no number then
    matched it ("I don't know" scored 1.0). sst2: label -1 (the hub's hidden test labels) indexed LABELS
    from the end and became " positive"."""
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    for split in ("train", "test"):
        rows = [{"question": f"How many apples in basket {i}?", "answer": f"Count them.\n#### {i}" if i else "3 baskets, too many.\n#### many"} for i in range(6)]
        (gsm / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"gsm8k: the reference answer has no final number after '####' for question 'How many apples in basket 0\?'"):
        GSM8K(HubSource(str(gsm))).examples("test", 6, seed=0)
    sst = tmp_path / "sst2"
    sst.mkdir()
    for split, label in (("train", 0), ("validation", -1)):
        rows = [{"sentence": f"film {split} {i}", "label": label if i == 0 else i % 2} for i in range(6)]
        (sst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="sst2: label must be 0 .negative. or 1 .positive., got -1 for 'film validation 0'"):
        SST2(HubSource(str(sst))).examples("test", 6, seed=0)
    # 1.0 (pandas writes an int column with a gap as floats) passed the check, then failed to index the labels
    assert [(label_of({"label": x, "sentence": "s"}), type(label_of({"label": x, "sentence": "s"}))) for x in (0.0, 1.0)] == [(0, int), (1, int)]
    with pytest.raises(ValueError, match="got 0.5 for 's'"):
        label_of({"label": 0.5, "sentence": "s"})


def test_no_prompt_is_in_two_splits_and_a_repeated_row_counts_once(tmp_path) -> None:
    """Splits were carved on the raw text while prompts strip it: "film 0 is fine" and "film 0 is fine " could land
    in train and validation as one prompt; a sentence in the hub's validation file (our test) could also be in
    the hub's train file (our train); and a repeated row counted twice towards a budget."""
    sst = tmp_path / "sst2"
    sst.mkdir()
    train = [{"sentence": f"film number {i} is fine" + " " * (k % 2), "label": i % 2} for i in range(60) for k in range(2)]
    train += [{"sentence": f"held out review {i}", "label": 0} for i in range(5)]  # also in the test file
    test = [{"sentence": f"held out review {i} ", "label": 0} for i in range(5)] + [{"sentence": f"other review {i}", "label": 1} for i in range(5)]
    for name, rows in (("train", train), ("validation", test)):
        (sst / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = SST2(HubSource(str(sst)))
    prompts = {split: [ex.prompt for ex in task.examples(split, 1000, seed=0)] for split in ("train", "validation", "test")}
    assert all(len(p) == len(set(p)) for p in prompts.values())
    assert len(prompts["train"]) + len(prompts["validation"]) == 60 == task.pool_size("train") + task.pool_size("validation")
    assert not set(prompts["train"]) & set(prompts["validation"]) and not (set(prompts["train"]) | set(prompts["validation"])) & set(prompts["test"])
    assert len(prompts["test"]) == 10


def test_the_calls_are_read_past_a_bracket_in_prose_and_generation_has_room_for_the_longest_reference() -> None:
    assert canonical_calls('Calls: [see below]\n[{"name": "f", "arguments": {}}]') == ('{"arguments": {}, "name": "f"}',)
    assert canonical_calls("[see below] and [nothing else]") is None
    long_call = [{"name": "search", "arguments": {"query": " ".join(["word"] * 300)}}]
    example = Example(prompt="p", target=" " + json.dumps(long_call), meta={"calls": list(canonical_calls(json.dumps(long_call)))})

    short = Example(prompt="q", target=' [{"name": "f", "arguments": {}}]', meta={"calls": list(canonical_calls('[{"name": "f", "arguments": {}}]'))})
    budgets = []

    class Budgeted(ScriptedLM):
        def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
            budgets.append((len(prompts), max_new_tokens))
            target = {"p": example.target, "q": short.target}
            return [" ".join(target[p].split()[:max_new_tokens]) for p in prompts]  # cut at the budget, as a model's is

    assert FunctionCalling(HubSource("unused")).evaluate(Budgeted({}), [example, short, short]).score == 1.0
    assert budgets == [(2, 128), (1, 384)]  # the long reference lengthens only its own generation


def test_splits_from_three_hub_splits_keep_no_text_in_two_of_ours(tmp_path) -> None:
    """A dataset shipping train, validation and test: train dropped the test split's texts but kept the validation
    split's, so a text the hub's train and validation share was trained on and validated on."""
    from workers.tasks.hub import SplitPlan

    source = tmp_path / "three"
    source.mkdir()
    texts = {"train": ["a", "b", "shared by all", "train and validation"], "validation": ["c", "shared by all", "train and validation",
             "validation and test"], "test": ["d", "shared by all", "validation and test"]}  # fmt: skip
    for split, rows in texts.items():
        (source / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": text}) + "\n" for text in rows))
    plan = SplitPlan(train="train", validation="validation", test="test")
    ours = {split: [row["sentence"] for row in plan.rows("three", HubSource(str(source)), split, "sentence")]
            for split in ("train", "validation", "test")}  # fmt: skip
    assert ours == {"train": ["a", "b"], "validation": ["c", "train and validation"], "test": texts["test"]}
