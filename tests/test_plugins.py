"""What a new method or task is checked for as it registers or is planned: the protocol's rules a type hint cannot
enforce, each of which, broken, ran and stored wrong rows in silence (helper-172)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from orchestrator.spec import load_spec
from workers.config import ConfigError
from workers.methods import METHODS, get_method
from workers.methods.lora import Lora
from workers.methods.steer_mean import SteerMean
from workers.registry import Registry
from workers.tasks import TASKS
from workers.tasks.facts import Facts


@pytest.fixture
def registered(monkeypatch):
    """Register a method for one test only (the registry and get_method's cache are process-wide)."""

    def register(method: object) -> None:
        monkeypatch.setitem(METHODS._items, method.name, method)
        get_method.cache_clear()

    yield register
    get_method.cache_clear()


class CaaFixed(SteerMean):
    name = "caa_fixed"  # steering, by a name without "steer" in it


class PlainConfig(BaseModel):  # a pydantic model, not a StrictConfig: an unknown key is dropped
    multiplier: float = 1.0


class Loose(SteerMean):
    name = "steer_loose"
    config_class = PlainConfig


def test_a_method_whose_name_puts_it_on_another_side_than_it_declares_is_refused_at_plan(write_sweep, registered):
    registered(CaaFixed())
    sweep = {"sweep": "s", "models": [{"id": "ladder:test/xs"}], "tasks": ["facts"], "budgets": [4]}
    with pytest.raises(ConfigError) as err:
        load_spec(write_sweep({**sweep, "methods": {"lora": {}, "caa_fixed": {}, "lora+caa_fixed": {}}}))
    message = str(err.value)
    assert "methods.caa_fixed: caa_fixed declares itself steering, but the analysis reads a method's side from its name" in message
    assert "would put it with finetuning" in message and "methods.lora+caa_fixed: caa_fixed declares" in message
    assert "methods.lora:" not in message
    load_spec(write_sweep({**sweep, "methods": {"lora": {}, "steer_mean+lora": {}}}))  # every registered method's name fits its side


def test_a_method_whose_config_drops_unknown_keys_cannot_register():
    with pytest.raises(TypeError, match=r"method 'steer_loose' \(.*test_plugins.Loose\) cannot be registered: its config_class .*PlainConfig.* is no workers.config.StrictConfig"):
        Registry("method", METHODS._check).register("steer_loose", Loose())


@pytest.mark.parametrize(
    ("name", "item", "message"),
    [
        ("lora+x", Lora(), "its name is 'lora'; '\\+' joins a composition's parts"),
        ("steer_x", type("Kindless", (SteerMean,), {"name": "steer_x", "kind": "steer"})(), "its kind 'steer' is none of reference, steering, finetuning$"),
        ("steer_x", type("Composed", (SteerMean,), {"name": "steer_x", "kind": "composition"})(), "its kind 'composition' is none of"),
    ],
)
def test_a_method_breaking_the_protocol_cannot_register(name, item, message):
    with pytest.raises(TypeError, match=message):
        Registry("method", METHODS._check).register(name, item)


def test_a_task_missing_a_member_of_the_protocol_cannot_register():
    class Parity:
        name, task_type, data_version = "parity", "reasoning", 1

        def examples(self, split, n, seed):
            return []

        def evaluate(self, lm, examples, *, elicited=False):
            raise NotImplementedError

    with pytest.raises(TypeError, match=r"task 'parity' \(.*Parity\) cannot be registered: it has no pool_size; it has no contrast_pairs$"):
        Registry("task", TASKS._check).register("parity", Parity())


def test_a_name_registered_twice_names_both_implementations():
    class Copied(Facts):  # a copy of facts.py whose name was left as it was
        pass

    with pytest.raises(ValueError, match=r"task 'facts' is registered twice: by workers.tasks.facts.Facts and by .*test_plugins.*Copied$"):
        TASKS.register("facts", Copied())


def test_a_task_writing_documents_cannot_take_the_corpus_text_name():
    """A task named `text` that writes documents clashed with the ladder corpus's general text only when a ladder was
    built (helper-172); a task writing none may have the name."""

    class Text(Facts):
        name = "text"

    with pytest.raises(TypeError, match=r"task 'text' .* cannot be registered: it writes documents for the ladder's corpus, where 'text' is"):
        Registry("task", TASKS._check).register("text", Text())
    from workers.tasks.sst2 import SST2

    Registry("task", TASKS._check).register("text", type("Reviews", (SST2,), {"name": "text"})())  # real data: no documents
