"""What a worker process keeps between cells: loaded models and their baseline evaluations.

Ray reuses worker processes across tasks, so a module-level cache turns "load the model, score the
base model" from a per-cell cost into a per-model cost. Methods restore the model exactly after
every cell (see methods/protocol.py), which is what makes sharing a loaded model safe.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from workers.cell import ModelSpec
from workers.lm import LanguageModel
from workers.metrics import NeutralReference
from workers.models.loading import load_language_model
from workers.tasks.base import Evaluation


@dataclass(frozen=True)
class Baseline:
    """The untouched model's numbers that every cell of a (model, task, eval settings) compares against."""

    test: Evaluation
    elicited: Evaluation | None
    neutral: NeutralReference
    offtask: dict[str, Evaluation]


class WorkerCache:
    def __init__(self, max_models: int = 1) -> None:
        self.max_models = max_models
        self.loads = 0
        self._models: OrderedDict[tuple[str, bool], LanguageModel] = OrderedDict()  # (spec, sharded)
        self._baselines: dict[tuple[str, str], Baseline] = {}

    def model(self, spec: ModelSpec, batch_size: int, *, shard: bool = False) -> LanguageModel:
        key = (spec.model_dump_json(), shard)
        if key not in self._models:
            while len(self._models) >= self.max_models:  # least recently used goes first
                (evicted, _), _ = self._models.popitem(last=False)
                self._baselines = {k: v for k, v in self._baselines.items() if k[0] != evicted}
            self._models[key] = load_language_model(spec, batch_size, shard=shard)
            self.loads += 1
        self._models.move_to_end(key)
        lm = self._models[key]
        lm.batch_size = batch_size
        return lm

    def baseline(self, spec: ModelSpec, context: str, compute: Callable[[], Baseline]) -> Baseline:
        """The cached baseline for `spec` under `context` (task + eval settings), computed once."""
        key = (spec.model_dump_json(), context)  # placement-independent: sharded or not, same numbers
        if key not in self._baselines:
            self._baselines[key] = compute()
        return self._baselines[key]


PROCESS_CACHE = WorkerCache()
