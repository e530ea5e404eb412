"""Strict structuring of decoded JSON into attrs classes that stops early.

It replaces cattrs for request bodies: cattrs' detailed validation builds
and formats an error for every bad item, so one 1 MiB list of wrong items
held the trio thread for seconds and grew the process by hundreds of MB
(issue 11, finding 2). Here the walk ends at the ``max_problems``-th
problem, so its cost is the valid part walked plus what is reported.

Rules, by the type a field declares:

1. ``str``, ``bool`` and ``int`` are exact: ``true`` is not an integer and
   ``1`` is not a boolean.
2. A ``Literal`` accepts exactly its values.
3. ``X | None`` accepts null, else what ``X`` accepts. Any other union needs a
   hook (the caller knows how to tell its members apart).
4. ``list[X]`` needs a JSON array, an attrs class a JSON object; unknown keys
   are ignored and a field without a default is required.

Problems read ``<description> @ <path>``, the path in JSONPath form
(``$.messages[0].role``): the wording ``cattrs.transform_error`` gave, so
clients see the same messages as before. Descriptions are fixed phrases,
never an exception's text.
"""

from __future__ import annotations

import contextlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import attrs

T = TypeVar("T")

# What a hook returns for a value it reported (see Problems.report).
INVALID: Any = object()

_SCALAR_NAMES = {str: "a string", bool: "a boolean", int: "an integer"}


class ShapeError(Exception):
    """The value does not have the declared shape; ``problems`` are client-safe."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Enough(Exception):
    """Enough problems found: stop walking."""


@attrs.define
class Problems:
    limit: int
    found: list[str] = attrs.field(factory=list)

    def report(self, description: str, path: str) -> Any:
        """Record a problem; returns :data:`INVALID` for the caller to return."""
        self.found.append(f"{description} @ {path}")
        if len(self.found) >= self.limit:
            raise _Enough
        return INVALID


Hook = Callable[[Any, str, Problems], Any]


@attrs.frozen
class Structurer:
    """``hooks`` maps a declared type to a function that structures it."""

    hooks: Mapping[Any, Hook] = attrs.field(factory=dict)
    _fields: dict[type, tuple[attrs.Attribute[Any], ...]] = attrs.field(
        factory=dict, init=False, eq=False
    )

    def structure(self, value: Any, cls: type[T], *, max_problems: int = 5) -> T:
        """``value`` as a ``cls``, or :class:`ShapeError` naming at most
        ``max_problems`` problems (the first ones in document order)."""
        problems = Problems(max_problems)
        result: T = INVALID
        with contextlib.suppress(_Enough):  # the last problem the caller wants
            result = self.at(value, cls, "$", problems)
        if problems.found:
            raise ShapeError(tuple(problems.found))
        return result

    def at(self, value: Any, type_: Any, path: str, problems: Problems) -> Any:
        """``value`` as a ``type_`` found at ``path`` (for hooks that recurse)."""
        hook = self.hooks.get(type_)
        if hook is not None:
            return hook(value, path, problems)
        if type_ in _SCALAR_NAMES:
            if type(value) is not type_:  # bool is an int in Python
                return problems.report(f"expected {_SCALAR_NAMES[type_]}", path)
            return value
        origin = typing.get_origin(type_)
        if origin is Literal:
            choices = typing.get_args(type_)
            # Compared by type too: 1 == True, but neither is a "1".
            if not any(type(value) is type(choice) and value == choice for choice in choices):
                return problems.report(
                    "expected one of " + ", ".join(repr(choice) for choice in choices), path
                )
            return value
        if origin is typing.Union or origin is types.UnionType:
            members = [member for member in typing.get_args(type_) if member is not type(None)]
            if len(members) != 1:
                raise TypeError(f"{type_!r}: a union of several types needs a hook")
            return None if value is None else self.at(value, members[0], path, problems)
        if origin is list:
            return self._list(value, typing.get_args(type_)[0], path, problems)
        if attrs.has(type_):
            return self._object(value, type_, path, problems)
        raise TypeError(f"no rule to structure {type_!r}")

    def _list(self, value: Any, item_type: Any, path: str, problems: Problems) -> Any:
        if not isinstance(value, list):  # a string is iterable, but not a list
            return problems.report("expected a list", path)
        items = [
            self.at(item, item_type, f"{path}[{index}]", problems)
            for index, item in enumerate(value)
        ]
        return INVALID if any(item is INVALID for item in items) else items

    def _object(self, value: Any, cls: type, path: str, problems: Problems) -> Any:
        if not isinstance(value, dict):
            return problems.report("expected an object", path)
        kwargs: dict[str, Any] = {}
        valid = True
        for field in self._fields_of(cls):
            if field.name not in value:
                if field.default is attrs.NOTHING:
                    problems.report("required field missing", f"{path}.{field.name}")
                    valid = False
                continue
            item = self.at(value[field.name], field.type, f"{path}.{field.name}", problems)
            valid = valid and item is not INVALID
            kwargs[field.name] = item
        return cls(**kwargs) if valid else INVALID

    def _fields_of(self, cls: type) -> tuple[attrs.Attribute[Any], ...]:
        fields = self._fields.get(cls)
        if fields is None:
            # Annotations are strings (PEP 563) until resolved.
            fields = self._fields[cls] = attrs.fields(attrs.resolve_types(cls))
        return fields
