"""What a worker keeps between cells: loaded models, bounded by bytes, and their baseline evaluations.

A long-lived worker runs many cells; keeping base models loaded turns "load the model, score the
base model" from a per-cell cost into a per-model cost. Models stay until the bytes they take would
exceed `max_bytes`; then the least recently used go first, *before* the newcomer loads (its size is
known from its config), so memory never holds more than the budget plus what the cell itself needs.
Methods restore the model exactly after every cell (see methods/protocol.py), which is what makes
sharing a loaded model safe; a cell that failed is not trusted to have done so (`discard`).

Test only: $STEERSCALE_TEST_LOAD_FAULTS, a JSON object {"<model id>": "MemoryError" |
"OutOfMemoryError"}, makes loading those models raise that error, as a model too big for its device
would; the fault tests use it because nothing a cell config can say raises Python's MemoryError on
a CPU box, nor torch's (CUDA) OutOfMemoryError. Leave it unset in real use.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import transformers

from workers.cell import LADDER_PREFIX, ModelSpec
from workers.lm import LanguageModel
from workers.memory import release_memory
from workers.methods import get_method, model_problem, resolve_config
from workers.metrics import NeutralReference
from workers.models.loading import DTYPES, count_parameters, load_language_model, parse_ladder_id
from workers.tasks.base import Evaluation


LOAD_FAULTS_ENV = "STEERSCALE_TEST_LOAD_FAULTS"
_LOAD_FAULTS: dict[str, type[Exception]] = {"MemoryError": MemoryError, "OutOfMemoryError": torch.OutOfMemoryError}


@dataclass(frozen=True)
class Baseline:
    """The untouched model's numbers that every cell of a (model, task, eval settings) compares against."""

    test: Evaluation
    elicited: Evaluation | None
    neutral: NeutralReference  # not the task's: one object shared by the baselines of every task (`WorkerCache.neutral`)
    offtask: dict[str, Evaluation]


def model_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, tied weights once: what a loaded model occupies."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _meta_model(spec: ModelSpec) -> torch.nn.Module:
    """`spec`'s architecture built on the meta device from its config: shapes without reading weights.
    A ladder rung's config comes from its recipe, so nothing is built (a driver on a cluster can size it)."""
    if spec.id.startswith(LADDER_PREFIX):
        from workers.models import ladder

        recipe, size = parse_ladder_id(spec.id)
        config = ladder.model_config(size, recipe)
    else:
        config = transformers.AutoConfig.from_pretrained(spec.id, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)


def estimated_params(spec: ModelSpec) -> int:
    """`spec`'s parameter count as its rows' `params_total` will record it, from its config alone."""
    return count_parameters(_meta_model(spec))[0]


def method_problems(spec: ModelSpec, methods: Mapping[str, dict]) -> list[str]:
    """Why each of `methods` (name -> config) cannot run on `spec` as configured, from its architecture
    alone (`model_problem`: e.g. a LoRA target the model lacks), one line each; [] when all can. The
    architecture is built (from the model's config, on the meta device) only if a method asks for it."""
    architecture = functools.cache(lambda: _meta_model(spec))
    problems = []
    for name, raw in methods.items():
        problem = model_problem(get_method(name), resolve_config(name, raw), architecture)
        if problem is not None:
            problems.append(f"methods.{name} on {spec.id}: {problem}")
    return problems


def estimated_bytes(spec: ModelSpec) -> int:
    """What loading `spec` will occupy, from its config alone: the model built on the meta device.

    Weights loaded in `spec.dtype` take its item size; buffers (rotary tables, masks) keep the size
    they are built with. Exact for the ladder and for plain hub checkpoints (checked in tests).
    """
    model = _meta_model(spec)
    buffers = {id(b): b for b in model.buffers()}
    return count_parameters(model)[0] * DTYPES[spec.dtype].itemsize + sum(b.numel() * b.element_size() for b in buffers.values())


def _raise_injected_fault(spec: ModelSpec) -> None:
    """Test only (see the module docstring): raise the out-of-memory error $STEERSCALE_TEST_LOAD_FAULTS names."""
    fault = json.loads(os.environ.get(LOAD_FAULTS_ENV) or "{}").get(spec.id)
    if fault is not None:
        raise _LOAD_FAULTS[fault](f"{LOAD_FAULTS_ENV} made loading {spec.id} run out of memory")


class WorkerCache:
    """Loaded models, least recently used evicted past `max_bytes`, and each model's baselines.

    `max_bytes=0` keeps only the model in use. A model bigger than the whole budget still loads
    (its cell needs it), with every other model evicted first. Without `host_bytes` everything kept
    counts against `max_bytes` (a CPU worker: all of it is host memory). With it (a GPU worker), the
    models on an accelerator count against `max_bytes` and what stays in host memory — the neutral
    references, models placed on the CPU — against `host_bytes`: a large vocabulary's reference
    (gigabytes of host RAM) no longer evicts GPU models that fit, nor do GPU models crowd out RAM.
    """

    def __init__(self, max_bytes: int = 0, host_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.host_bytes = host_bytes
        self.loads = 0
        self._models: OrderedDict[tuple[str, bool], LanguageModel] = OrderedDict()  # (spec, sharded), MRU last
        self._bytes: dict[tuple[str, bool], int] = {}
        self._baselines: dict[tuple[str, str], Baseline] = {}
        self._neutral: dict[tuple[str, str], NeutralReference] = {}
        self._weights: dict[str, str] = {}  # spec -> provenance of the weights its baselines and neutral references scored

    @property
    def resident_bytes(self) -> int:
        """Loaded models plus their neutral references (host memory, counted too: at a 150k vocabulary
        a reference is gigabytes, and eight workers' worth is what gets a node's workers killed)."""
        return sum(self._bytes.values()) + sum(ref.nbytes for ref in self._neutral.values())

    def _in_host_memory(self, key: tuple[str, bool]) -> bool:
        return self._models[key].device.type == "cpu"

    def _kept_bytes(self, host: bool) -> int:
        """What counts against the host budget (`host`) or the accelerators' one; everything without `host_bytes`."""
        if self.host_bytes is None:
            return self.resident_bytes
        models = sum(size for key, size in self._bytes.items() if self._in_host_memory(key) == host)
        return models + (sum(ref.nbytes for ref in self._neutral.values()) if host else 0)

    def _frees(self, key: tuple[str, bool], host: bool) -> bool:
        """Whether evicting a loaded model gives back memory of that kind (its neutral references are host memory)."""
        if self.host_bytes is None or self._in_host_memory(key) == host:
            return True
        return host and any(spec == key[0] for spec, _ in self._neutral)

    def others_bytes(self, spec: ModelSpec, device: torch.device) -> int:
        """Bytes of the loaded models other than `spec` on `device`'s kind: resident while `spec`'s
        cell runs, and so in its memory peak, but not the cell's own."""
        name = spec.model_dump_json()
        return sum(self._bytes[k] for k, lm in self._models.items() if k[0] != name and lm.device.type == device.type)

    def held(self) -> list[str]:
        """The loaded models' specs (JSON), least recently used first."""
        return [spec for spec, _ in self._models]

    def model(self, spec: ModelSpec, batch_size: int, *, shard: bool = False) -> LanguageModel:
        key = (spec.model_dump_json(), shard)
        if key not in self._models:
            self._forget_unloaded(besides=key[0])
            self._make_room(estimated_bytes(spec), keep=key[0], host=self.host_bytes is None or spec.device == "cpu")
            _raise_injected_fault(spec)
            lm = load_language_model(spec, batch_size, shard=shard)
            weights = json.dumps(lm.provenance, sort_keys=True)
            if self._weights.setdefault(key[0], weights) != weights:  # a reload brought other weights (a hub branch moved)
                self._weights[key[0]] = weights
                self._forget_scored(key[0])  # what was kept across the reload was scored on the old ones
            self._models[key], self._bytes[key] = lm, model_bytes(lm.model)
            self.loads += 1
        self._models.move_to_end(key)
        lm = self._models[key]
        lm.batch_size, lm.halved_to, lm.train_parts = batch_size, None, 1
        return lm

    def _make_room(self, needed: int, keep: str, host: bool) -> None:
        """Evict the least recently used models other than `keep` (spec JSON) until `needed` more bytes of
        host memory (`host`) or of the accelerators' fit their budget."""
        budget = self.host_bytes if host and self.host_bytes is not None else self.max_bytes
        while self._kept_bytes(host) + needed > budget:
            others = [k for k in self._models if k[0] != keep and self._frees(k, host)]
            if not others:
                return
            del self._models[others[0]], self._bytes[others[0]]
            self._forget_unloaded(besides=keep)  # its baselines and neutral reference go with it
            release_memory()  # before the newcomer loads into the room made

    def evict_others(self, spec: ModelSpec) -> bool:
        """Drop every loaded model but `spec`'s (a cell that ran out of memory beside them runs again alone);
        whether there were any."""
        others = [k for k in self._models if k[0] != spec.model_dump_json()]
        for key in others:
            del self._models[key], self._bytes[key]
        if others:
            self._forget_unloaded(besides=spec.model_dump_json())
            release_memory()
        return bool(others)

    def discard(self, spec: ModelSpec) -> None:
        """Forget `spec`'s loaded copies (sharded or not), e.g. after a cell that may have left it modified."""
        for key in [k for k in self._models if k[0] == spec.model_dump_json()]:
            del self._models[key], self._bytes[key]  # its baselines stay: they were scored before the cell ran
        # memory is released by the caller: a failed cell's traceback still holds the model here (run_cell)

    def _forget_unloaded(self, besides: str) -> None:
        """Drop the baselines and neutral references of models no longer loaded (evicted, or discarded
        after a failed cell and not reloaded since), except `besides`'s, about to load: kept only for
        a reload, they would stay for the worker's lifetime otherwise."""
        loaded = {k[0] for k in self._models} | {besides}
        for spec in {k[0] for k in (*self._baselines, *self._neutral)} - loaded:
            self._forget_scored(spec)
        self._weights = {spec: weights for spec, weights in self._weights.items() if spec in loaded}

    def _forget_scored(self, spec: str) -> None:
        """Drop the baselines and neutral references of one model (spec JSON)."""
        self._baselines = {k: v for k, v in self._baselines.items() if k[0] != spec}
        self._neutral = {k: v for k, v in self._neutral.items() if k[0] != spec}

    def baseline(self, spec: ModelSpec, context: str, compute: Callable[[], Baseline]) -> Baseline:
        """The cached baseline for `spec` under `context` (task + eval settings), computed once."""
        key = (spec.model_dump_json(), context)  # placement-independent: sharded or not, same numbers
        if key not in self._baselines:
            self._baselines[key] = compute()
        return self._baselines[key]

    def neutral(self, spec: ModelSpec, settings: str, compute: Callable[[], NeutralReference]) -> NeutralReference:
        """The cached neutral-text reference for `spec` on the texts `settings` names (a digest of them), computed once.

        Keyed apart from the baselines because the neutral texts do not depend on the task: the
        reference (full-vocabulary fp32 log-probs, the largest thing a baseline holds) is kept once per
        model, not once per task."""
        key = (spec.model_dump_json(), settings)
        if key not in self._neutral:
            self._neutral[key] = compute()
            self._make_room(0, keep=key[0], host=True)  # a new reference of a loaded model counts too: others make way for it
        return self._neutral[key]


PROCESS_CACHE = WorkerCache()
