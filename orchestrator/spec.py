"""The sweep YAML as a validated, frozen spec; `key.sub=value` command-line overrides.

Validation happens twice on purpose: the spec's own shape here, and each method's settings by that
method's config class (`workers.methods.resolve_config`), so a typo in `methods.lora.rnak` is
reported with its full path and the nearest valid key before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from workers.cell import EvalConfig, ModelSpec
from workers.config import ConfigError, StrictConfig, validate_config
from workers.methods import resolve_config
from workers.registry import UnknownNameError
from workers.tasks import get_task


class ModelEntry(ModelSpec):
    """A model of the sweep: what to load, plus how many GPUs each of its cells reserves."""

    gpus_per_cell: float = Field(0.0, ge=0, description="fractional packs small models on one GPU; >1 shards")


class Resources(StrictConfig):
    cpus_per_cell: float = Field(1.0, gt=0, description="also the torch thread count inside the cell")
    max_retries: int = Field(1, ge=0, description="re-runs of a cell whose worker process died")
    model_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="base models a worker keeps loaded between cells (least recently used evicted); "
        "default: half of the worker's share of its GPUs' memory, or of RAM on CPU-only workers",
    )


class SweepSpec(StrictConfig):
    sweep: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    results_dir: str = Field(description="local directory or URI (file://, s3://, gs://); default results/<sweep>")
    models: list[ModelEntry] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    methods: dict[str, dict[str, Any]] = Field(min_length=1, description="method name -> that method's settings")
    budgets: list[int] = Field(min_length=1, description="post-training examples per cell")
    method_budgets: dict[str, list[int]] = Field(
        default_factory=dict, description="per-method budgets, e.g. base: [0] since it learns nothing"
    )
    seeds: list[int] = Field([0], min_length=1)
    eval: EvalConfig = EvalConfig()
    resources: Resources = Resources()

    @field_validator("budgets")
    @classmethod
    def _non_negative(cls, budgets: list[int]) -> list[int]:
        if any(b < 0 for b in budgets):
            raise ValueError("budgets must be >= 0")
        return budgets

    def budgets_for(self, method: str) -> list[int]:
        return self.method_budgets.get(method, self.budgets)


def check_names(spec: SweepSpec) -> None:
    """Every task and method name known and every method's settings valid, all reported at once."""
    problems = []
    for i, task in enumerate(spec.tasks):
        try:
            get_task(task)
        except UnknownNameError as err:
            problems.append(f"tasks.{i}: {err}")
    for name, settings in spec.methods.items():
        try:
            resolve_config(name, settings, f"methods.{name}")
        except UnknownNameError as err:
            problems.append(f"methods.{name}: {err}")
        except ConfigError as err:
            problems.append(str(err))
    problems += [
        f"method_budgets.{name}: not one of the sweep's methods ({', '.join(spec.methods)})"
        for name in spec.method_budgets
        if name not in spec.methods
    ]
    if problems:
        raise ConfigError("\n".join(problems))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` paths in a nested dict (values parsed as YAML: 3, 1e-3, [1, 2], true)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{override}' is not of the form key.sub=value")
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    """Read a sweep YAML (safe_load only), apply overrides, validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such sweep config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    if "sweep" in data:
        data.setdefault("results_dir", f"results/{data['sweep']}")
    try:
        spec = validate_config(SweepSpec, data)
        check_names(spec)
    except ConfigError as err:
        raise ConfigError(f"{path}:\n{err}") from None
    return spec


__all__ = ["ConfigError", "ModelEntry", "Resources", "SweepSpec", "apply_overrides", "check_names", "load_spec"]
