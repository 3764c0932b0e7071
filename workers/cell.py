"""The fully resolved configuration of one cell, and its content-hashed identity.

A cell id is the hash of the canonical JSON of everything that can change a cell's result (model
and revision, task, method and its resolved settings, budget, seed, evaluation settings, the data
version of every task it reads) plus the results schema version. Scheduling details (GPUs, retries,
where results go, the device, the evaluation batch size) are deliberately not part of it, so the
same cell run on a laptop or on a cluster is recognised as done.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from workers.config import ConfigError, StrictConfig
from workers.methods import batches_changed, method_versions, resolve_config, steps_changed, training_configs
from workers.registry import UnknownNameError
from workers.schema import ID_SCHEMA_VERSION
from workers.tasks import data_version

LADDER_PREFIX = "ladder:"


_SIZE_WORD = re.compile(r"\d+([._]\d+)?[kmbt]\d*|tiny|small|base|medium|large|x+l")  # the part of a model name that gives its size


class ModelSpec(StrictConfig):
    id: str = Field(description="hub id, local directory, or ladder:<size> / ladder:<recipe>/<size>")
    revision: str | None = Field(None, description="hub revision; for ladder models the recipe hash (filled in)")
    family: str | None = Field(None, description="model family for pooled fits; default: inferred from the id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = Field(False, description="run code shipped with a hub model; off unless asked for")

    @field_validator("id")
    @classmethod
    def _one_spelling_per_rung(cls, model_id: str) -> str:
        """`ladder:default/xs` is `ladder:xs`: one spelling, so one cell id and one slug per rung."""
        return model_id.replace(f"{LADDER_PREFIX}default/", LADDER_PREFIX, 1) if model_id.startswith(LADDER_PREFIX) else model_id

    @field_validator("family")
    @classmethod
    def _inferred_family_as_left_out(cls, family: str | None, info: ValidationInfo) -> str | None:
        """A family written as the one inferred from the id is left out: the same cells, one id."""
        model_id = info.data.get("id")
        return None if model_id is not None and family == _inferred_family(model_id) else family

    @property
    def label(self) -> str:
        """A short readable name for slugs and tables: a hub id's last part; a ladder rung with its recipe
        unless that is the default (`ladder:test/xs` is ladder-test-xs, `ladder:xs` ladder-xs)."""
        if self.id.startswith(LADDER_PREFIX):
            return "ladder-" + self.id.removeprefix(LADDER_PREFIX).strip("/").replace("/", "-")
        return self.id.rstrip("/").split("/")[-1]

    @property
    def family_name(self) -> str:
        """The models trained alike at different sizes: the name without its size (`Qwen2.5-0.5B` ->
        `qwen2.5`, `pythia-160m-deduped` -> `pythia-deduped`); a ladder's family is its recipe."""
        return self.family or _inferred_family(self.id)


def _inferred_family(model_id: str) -> str:
    """`ModelSpec.family_name` for a spec that names no family."""
    if model_id.startswith(LADDER_PREFIX):
        recipe = model_id.removeprefix(LADDER_PREFIX).rpartition("/")[0]
        return f"ladder-{recipe}" if recipe else "ladder"
    words = model_id.rstrip("/").split("/")[-1].lower().split("-")
    return "-".join(word for word in words if not _SIZE_WORD.fullmatch(word)) or words[0]


class NeutralTextSource(StrictConfig):
    """Natural text to measure selectivity and `neutral_loss` on, for models pretrained on it (the offline
    world's grammar means nothing to Pythia or Qwen): a hub dataset, or a local directory of `<split>.jsonl`
    files shaped like one, as a hub task reads (`workers.tasks.hub`)."""

    dataset: str = Field(description="hub id (e.g. 'Salesforce/wikitext') or a local directory of <split>.jsonl files "
                         "(a relative path is read from each worker's working directory)")
    config: str | None = Field(None, description="the dataset's configuration (e.g. 'wikitext-103-raw-v1')")
    split: str = "test"
    field: str = Field("text", description="the column holding the text")
    detokenizer: Literal["wikitext"] | None = Field(
        None, description="undo a dataset's tokenisation first: 'wikitext' joins its ' @-@ ' and spaced punctuation, as "
        "lm-evaluation-harness does"
    )


class EvalConfig(StrictConfig):
    test_size: int = Field(200, ge=1, description="test examples per cell (the same questions for every cell)")
    validation_size: int = Field(64, ge=0, description="the shared validation set every method selects on")
    validation_seed: int = Field(0, description="fixed across cells so every method sees the same validation set")
    neutral_size: int = Field(32, ge=0, description="neutral texts for KL / perplexity-ratio selectivity")
    neutral_min_words: int = Field(
        48, ge=1, description="words per neutral text, at least: 48 keeps each within the 64 tokens the ladder was "
        "pretrained on (at 96, a third of the scored tokens sat at positions no rung had trained at)"
    )
    neutral_source: NeutralTextSource | None = Field(
        None, description="where neutral texts come from: the first `neutral_min_words` words of `neutral_size` rows that "
        "long, evenly spaced over the split; none: documents of the offline world's general-text grammar"
    )
    offtask_size: int = Field(0, ge=0, description="test examples per other task of the sweep (0: skip off-task)")
    batch_size: int = Field(64, ge=1)
    selection_metric: Literal["nll", "score"] = Field(
        "nll",
        description="what every method's choices (layer, scale, λ, early-stopping step) maximise on the shared "
        "validation set: the answers' log-likelihood (−NLL), which moves in finer steps than accuracy on a few "
        "dozen questions and so overfits the set less (workers/world/NOTES.md), or the task score itself",
    )


# Settings added after results were first stored, left out of a cell's identity at the value cells
# had before the setting existed: those cells keep their ids, so a rerun that asks for the old
# behaviour by name skips them instead of redoing them.
_ADDED_LATER: dict[str, dict[str, object]] = {"eval": {"selection_metric": "score", "neutral_min_words": 96, "neutral_source": None}}
# The same for a method's training settings, wherever a `train` section sits in its config (a
# composition's parts, a task vector's fine-tune): at these values they are left out of the id.
_TRAIN_ADDED_LATER: dict[str, object] = {"lr_search": []}


def _without_later_train_defaults(config: Any) -> Any:
    """`config` (a method config as JSON) without the `_TRAIN_ADDED_LATER` settings at their old values."""
    if not isinstance(config, dict):
        return config
    out = {key: _without_later_train_defaults(value) for key, value in config.items()}
    if isinstance(out.get("train"), dict):
        out["train"] = {k: v for k, v in out["train"].items() if not (k in _TRAIN_ADDED_LATER and v == _TRAIN_ADDED_LATER[k])}
    return out


def _training_rules_changed(method: str, config: dict[str, Any], budget: int) -> dict[str, int]:
    """The rules of training that changed for this cell, as identity keys: where any training of the method, its
    config resolved (a hand-written cell may give `{rank: 2}` alone), trains another number of steps at `budget`
    than before session 30 (`steps_changed`), or may draw other batches than before session 41 (`batches_changed`):
    those cells alone compute something new."""
    try:
        trainings = [train for _, train in training_configs(resolve_config(method, config))]
    except (ConfigError, UnknownNameError):  # such a cell fails when it runs, on the same error
        return {}
    rules = {"step_rule": steps_changed, "batch_rule": batches_changed}
    return {key: 2 for key, changed in rules.items() if any(changed(budget, train) for train in trainings)}


# Settings that change where or how fast a cell runs, not what it computes (batched equals unbatched;
# the device moves numbers only by rounding): pinned at their defaults in the identity, so a smaller
# evaluation batch after an out-of-memory, or `cuda` instead of `auto`, finds the cells already done
# (and cells stored with the defaults keep their ids).
_PLACEMENT: dict[str, dict[str, object]] = {
    "eval": {"batch_size": EvalConfig.model_fields["batch_size"].default},
    "model": {"device": ModelSpec.model_fields["device"].default},
}


class CellConfig(StrictConfig):
    sweep: str
    model: ModelSpec
    task: str
    method: str
    method_config: dict[str, Any] = Field(default_factory=dict, description="the method's resolved config")
    budget: int = Field(ge=0)
    seed: int
    eval: EvalConfig = EvalConfig()
    offtask: tuple[str, ...] = Field((), description="the sweep's other tasks, scored for selectivity")
    schema_version: int = ID_SCHEMA_VERSION  # in the id: see workers/schema.py

    @property
    def tasks_read(self) -> tuple[str, ...]:
        """The tasks whose data the cell reads: its own, then the sweep's others it scores off-task."""
        return (self.task, *self.offtask)

    @property
    def cell_id(self) -> str:
        identity = self.model_dump(mode="json", exclude={"sweep"})
        for section, pinned in _PLACEMENT.items():
            identity[section].update(pinned)
        for section, defaults in _ADDED_LATER.items():
            for key, default in defaults.items():
                if identity[section][key] == default:
                    del identity[section][key]
        identity["method_config"] = _without_later_train_defaults(identity["method_config"])
        changed_data = {task: data_version(task) for task in self.tasks_read if data_version(task) != 1}
        if changed_data:  # tasks whose examples never changed leave their cells' ids as they were
            identity["task_data"] = changed_data
        identity.update(_training_rules_changed(self.method, self.method_config, self.budget))
        if self.model.dtype != "float32":  # scored from fp32 logits since session 33 (`workers.lm.fp32_head`): not bf16's ties
            identity["half_scoring"] = 2
        changed_methods = method_versions(self.method)
        if changed_methods:  # so do methods whose computation never changed (`version` in methods/protocol.py)
            identity["method_version"] = changed_methods
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def slug(self) -> str:
        return f"{self.model.label}__{self.task}__{self.method}__n{self.budget}__s{self.seed}"
