"""Frozen, strict config models and errors that say where the bad key is and what was meant.

Every config in steerscale (sweep spec, model, eval, each method's own settings) derives from
`StrictConfig`: unknown keys are rejected, and `validate_config` turns pydantic's error list into
one message per problem, with the dotted path of the key and the nearest valid key.
"""

from __future__ import annotations

import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from workers.registry import did_you_mean

C = TypeVar("C", bound=BaseModel)


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _over_field_defaults(cls, data: Any) -> Any:
        """A sub-config given in part keeps the rest of its field's default.

        `full_ft`'s default training has lr 1e-4; `{"train": {"max_steps": 1000}}` must keep that lr,
        not fall back to TrainConfig's generic 1e-3 because pydantic builds the sub-config afresh.
        """
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(field.default, BaseModel) and isinstance(data.get(name), dict):
                merged[name] = _deep_merge(field.default.model_dump(exclude_unset=True), data[name])
        return merged


def _deep_merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `base`, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in given.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both_maps else value
    return merged


class ConfigError(ValueError):
    """A config that does not validate; the message lists every problem with its path."""


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes reachable through Optional / list / dict / Union annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is dict:
        args = args[1:]  # only the value type holds further fields
    return [cls for arg in args for cls in _model_classes(arg)]


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (the path of an offending key, without the key itself)."""
    candidates: list[type[BaseModel]] = [cls]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for model in candidates:
            field = model.model_fields.get(str(part))
            nxt.extend(_model_classes(field.annotation) if field else [model])  # a dict key: stay
        candidates = nxt or candidates
    return sorted({name for model in candidates for name in model.model_fields})


def _description_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, str] | None:
    """(name, description) of the innermost field that `loc` (a value's path) lies in, when it has one."""
    candidates, found = [cls], None
    for part in loc:
        if isinstance(part, int):
            continue
        fields = [model.model_fields[str(part)] for model in candidates if str(part) in model.model_fields]
        if not fields:
            return found
        found = (str(part), fields[0].description) if fields[0].description else None
        candidates = [c for field in fields for c in _model_classes(field.annotation)] or candidates
    return found


def format_errors(cls: type[BaseModel], err: ValidationError, prefix: str = "") -> str:
    errors = err.errors()
    locs = [tuple(e["loc"]) for e in errors]
    lines = []
    for e, loc in zip(errors, locs):
        if e["type"] == "too_short" and any(other[: len(loc)] == loc and len(other) > len(loc) for other in locs):
            continue  # the list came out short because an item failed: that item's error says why
        path = ".".join(str(p) for p in (prefix, *loc) if p != "")
        if e["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc[:-1])
            keys = f"valid keys: {', '.join(valid)}" if valid else "it takes no settings (give it {})"
            lines.append(f"{path}: unknown key{did_you_mean(str(loc[-1]), valid)}; {keys}")
        else:
            about = _description_at(cls, loc)
            lines.append(f"{path or '<root>'}: {e['msg']}" + (f" ({about[0]}: {about[1]})" if about else ""))
    return "\n".join(lines)


def validate_config(cls: type[C], data: Any, path: str = "") -> C:
    """`cls.model_validate(data)`, raising ConfigError whose lines carry `path`-prefixed key paths."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(cls, err, path)) from None
