"""Frozen, strict config models and errors that say where the bad key is and what was meant.

Every config in steerscale (sweep spec, model, eval, each method's own settings) derives from
`StrictConfig`: unknown keys are rejected, and `validate_config` turns pydantic's error list into
one message per problem, with the dotted path of the key and the nearest valid key.
"""

from __future__ import annotations

import datetime
import types
import typing
from typing import Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from workers.registry import did_you_mean

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")


def _distinct(values: tuple[T, ...]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(values))


# A list whose repeats mean nothing (candidate scales, layers to steer): kept once each, in the order given,
# so that `[0, 0, 1]` and `[0, 1]` are one config and one cell id, as they are one computation.
Distinct = AfterValidator(_distinct)


class StrictConfig(BaseModel):
    # allow_inf_nan: `lr: .nan` would read as "greater than 0" failing, `.inf` GPUs as a traceback
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # Keys written here that belong elsewhere -> where they go: said in place of "did you mean", which
    # would offer the nearest spelling here (`resources.gpus_per_cell` -> 'cpus_per_cell').
    misplaced_keys: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`rank: true` or `budgets: [true, 4]` is a slip, not 1: pydantic's lax mode takes a boolean for
        an int (or float), and YAML reads yes/no/on/off as booleans too. Refused in any field that holds
        numbers and no booleans; every other value passes as before (lax: "3" still reads as 3)."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_bool(value) and _numbers_only(field.annotation):
            held = "is" if isinstance(value, bool) else "holds"
            raise ValueError(f"{_as_yaml(value)} {held} a boolean where a number is expected "
                             "(YAML reads true/false, yes/no and on/off as booleans)")  # fmt: skip
        return value

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
            if name in data and data[name] is None and isinstance(field.default, BaseModel):
                del merged[name]  # a section (`eval:`, `train:`) written with nothing under it: its defaults, as if left out
            elif isinstance(field.default, BaseModel) and isinstance(data.get(name), dict):
                merged[name] = _deep_merge(field.default.model_dump(exclude_unset=True), data[name])
        return merged


def _holds_bool(value: Any) -> bool:
    """Whether `value` is a boolean or a list / tuple / mapping holding one (at any depth)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, dict):
        return any(map(_holds_bool, value.values()))
    return isinstance(value, (list, tuple)) and any(map(_holds_bool, value))


def _leaf_types(annotation: Any) -> set[Any]:
    """The scalar types an annotation holds, through Optional / Union / Annotated / list / tuple / dict values."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return {annotation}
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _leaf_types(args[0])
    if origin is typing.Literal:
        return {type(arg) for arg in args}
    if origin is dict:
        args = args[1:]  # a mapping's keys are names, not values
    return {leaf for arg in args if arg is not Ellipsis for leaf in _leaf_types(arg)}


def _numbers_only(annotation: Any) -> bool:
    """Whether a field of this annotation holds ints or floats and nothing a boolean could be (bool, Any, a sub-config)."""
    leaves = _leaf_types(annotation)
    if any(leaf is bool or leaf is Any or (isinstance(leaf, type) and issubclass(leaf, BaseModel)) for leaf in leaves):
        return False
    return bool(leaves & {int, float})


def _as_yaml(value: Any) -> str:
    """`value` as it was written in YAML (true, not Python's True)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_as_yaml, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_as_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


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


def _models_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The config classes a key at `loc` (the path of an offending key, without the key itself) may belong to."""
    candidates: list[type[BaseModel]] = [cls]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for model in candidates:
            field = model.model_fields.get(str(part))
            nxt.extend(_model_classes(field.annotation) if field else [model])  # a dict key: stay
        candidates = nxt or candidates
    return candidates


def _fields_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (the path of an offending key, without the key itself)."""
    return sorted({name for model in _models_at(cls, loc) for name in model.model_fields})


def _misplaced_hint(cls: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """Where the unknown key at `loc` belongs, when the config class it was written in says (`misplaced_keys`)."""
    hints = [getattr(model, "misplaced_keys", {}).get(str(loc[-1])) for model in _models_at(cls, loc[:-1])]
    return next(filter(None, hints), None)


def _colon_hint(key: str, valid: list[str]) -> str | None:
    """`{max_steps:40}` is one key to YAML, `max_steps:40`: a colon needs a space after it to end a key."""
    name, colon, value = key.partition(":")
    return f"YAML read '{key}' as one key: write '{name}: {value}', a space after the colon" if colon and name.strip() in valid else None


def _field_paths(cls: type[BaseModel], depth: int = 0) -> list[tuple[str, ...]]:
    """Every key path the config class takes, a list's items as N (`models.N.gpus_per_cell`, `eval.test_size`)."""
    paths = []
    for name, field in cls.model_fields.items():
        paths.append((name,))
        annotation = field.annotation
        while typing.get_origin(annotation) is typing.Annotated or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and not _is_union(annotation)):
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        item = ("N",) if typing.get_origin(annotation) in (list, tuple) else ()
        for sub in _model_classes(annotation) if depth < 4 else []:
            paths += [(name, *item, *path) for path in _field_paths(sub, depth + 1)]
    return paths


def _elsewhere(cls: type[BaseModel], loc: tuple[Any, ...], prefix: str) -> str | None:
    """Where a key of this name goes when it is one of the config's, elsewhere (`test_size` at the top is
    eval.test_size; `lr` under a method goes in its train section)."""
    here = tuple("N" if isinstance(part, int) else str(part) for part in loc[:-1])
    found = sorted({path for path in _field_paths(cls) if path[-1] == str(loc[-1]) and path[:-1] != here})
    if not found:
        return None
    return " or ".join(".".join(p for p in (prefix, *path) if p) for path in found)


def _is_union(annotation: Any) -> bool:
    """A union of two or more types besides None: pydantic's error paths name the member it tried."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    return len([arg for arg in typing.get_args(annotation) if arg is not type(None)]) > 1


def _inner(annotation: Any, part: Any) -> Any:
    """The annotation of what `part` (a field name, list index or mapping key) selects inside `annotation`."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else Any
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and not _is_union(annotation):  # Optional[X]: X
        return _inner(next(arg for arg in args if arg is not type(None)), part)
    if origin in (list, tuple, set, frozenset) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return Any


def _without_union_tags(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """`loc` without the segments pydantic adds for a union's members (`target_modules.str`,
    `target_modules.tuple[str, ...]`): they name a type, not a key anyone could write; and whether there were any."""
    kept, annotation, tagged = [], cls, False
    for part in loc:
        if _is_union(annotation):
            tagged, annotation = True, Any  # the member's own structure is not followed further
            continue
        kept.append(part)
        annotation = _inner(annotation, part)
    return tuple(kept), tagged


def _yaml_read_as(value: Any) -> str | None:
    """What YAML made of an unquoted value where text was expected (`sweep: 2025-01-15` is a date), or None."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, datetime.date):  # datetimes too
        return "a date"
    return None


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
    untagged = [_without_union_tags(cls, tuple(e["loc"])) for e in errors]
    locs = [loc for loc, _ in untagged]
    # One line per problem, but one for all of a union's members failing at one key ("a valid string, or a valid
    # tuple"): (loc, "union" or the error's index) -> (the problems, what follows them on the line)
    lines: dict[tuple[tuple[Any, ...], object], tuple[list[str], str]] = {}
    tagged_locs = [loc for loc, tagged in untagged if tagged]
    for i, (e, (loc, tagged)) in enumerate(zip(errors, untagged)):
        if e["type"] == "too_short" and any(other[: len(loc)] == loc and len(other) > len(loc) for other in locs):
            continue  # the list came out short because an item failed: that item's error says why
        if tagged and any(other[: len(loc)] == loc and len(other) > len(loc) for other in tagged_locs):
            continue  # a union member that failed at an item (`[q_proj, 5]`: item 1) says more than one refusing the whole
        if e["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc[:-1])
            where = _elsewhere(cls, loc, prefix)
            hint = _misplaced_hint(cls, loc) or (f"it goes at {where}" if where else None) or _colon_hint(str(loc[-1]), valid)
            keys = f"; valid keys: {', '.join(valid)}" if valid else "; it takes no settings (give it {})"
            lines[(loc, i)] = ([f"unknown key{f' ({hint})' if hint else did_you_mean(str(loc[-1]), valid)}"], keys)
            continue
        read_as = _yaml_read_as(e.get("input")) if e["type"] == "string_type" and not tagged else None
        given = _as_yaml(e["input"]) if read_as else ""
        # the value as written is not to be had here (0755 arrives as 493): say to quote it, not what to write
        quote = f" (YAML read it as {read_as}, {given}: quote it as written to keep it text)" if read_as else ""
        if e["type"] in ("dict_type", "model_type") and isinstance(e.get("input"), str) and ":" in e["input"]:
            name, _, value = e["input"].partition(":")  # `train:` then `  max_steps:40`: one string to YAML, not a mapping
            quote = f" (YAML read '{e['input']}' as text: write '{name}: {value}', a space after the colon)"
        if e["type"] in ("list_type", "tuple_type") and not tagged and isinstance(e.get("input"), (int, float, str)) and not isinstance(e["input"], bool):
            quote = f" (a list of one is written [{_as_yaml(e['input'])}])"  # `budgets: 32`, a one-value grid
        described = _description_at(cls, loc)
        after = f" ({described[0]}: {described[1]})" if described else ""
        found, _ = lines.setdefault((loc, "union" if tagged else i), ([], after))
        found.append(e["msg"].removeprefix("Value error, ") + quote)  # pydantic's prefix to our own messages
    shown = []
    for (loc, _), (found, after) in lines.items():
        path = ".".join(str(p) for p in (prefix, *loc) if p != "") or "<root>"
        said = found[0] + "".join(f", or {more[:1].lower()}{more[1:]}" for more in found[1:])
        shown.append(f"{path}: {said}{after}")
    return "\n".join(shown)


def validate_config(cls: type[C], data: Any, path: str = "") -> C:
    """`cls.model_validate(data)`, raising ConfigError whose lines carry `path`-prefixed key paths."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(cls, err, path)) from None
