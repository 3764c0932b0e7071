"""Frozen, strict config models and errors that say where the bad key is and what was meant.

Every config in steerscale (sweep spec, model, eval, each method's own settings) derives from
`StrictConfig`: unknown keys are rejected, and `validate_config` turns pydantic's error list into
one message per problem, with the dotted path of the key and the nearest valid key.
"""

from __future__ import annotations

import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from workers.registry import did_you_mean

C = TypeVar("C", bound=BaseModel)


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
            lines.append(f"{path}: unknown key{did_you_mean(str(loc[-1]), valid)}; valid keys: {', '.join(valid)}")
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
