"""A name -> implementation registry that answers a wrong name with the nearest right one."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, options: list[str] | tuple[str, ...] | set[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class UnknownNameError(KeyError):
    """A registry lookup with a name nobody registered."""

    def __str__(self) -> str:  # KeyError would otherwise print the message with quotes around it
        return str(self.args[0])


def origin(item: object) -> str:
    """Where an implementation's class is defined, for messages about it: `workers.methods.lora.Lora`."""
    return f"{type(item).__module__}.{type(item).__qualname__}"


class Registry(Generic[T]):
    """Maps names to implementations; `kind` names what is registered in error messages. `check` lists what
    is wrong with an item (its protocol's rules that a type hint cannot enforce): a new plugin that breaks one
    fails as it registers, not with wrong rows later."""

    def __init__(self, kind: str, check: Callable[[str, T], list[str]] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice: by {origin(self._items[name])} and by {origin(item)}")
        if self._check and (problems := self._check(name, item)):
            raise TypeError(f"{self.kind} '{name}' ({origin(item)}) cannot be registered: {'; '.join(problems)}")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
