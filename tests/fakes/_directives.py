"""Per-request behaviour, read from the prompt.

A directive is a word ``@name`` or ``@name=value`` in the last user message,
at the start of the prompt or after whitespace (so ``a@b.c`` is not one).
Rules:

1. Unknown names, missing or unparsable values and repeated directives are
   errors (:class:`DirectiveError`, answered with HTTP 400): a typo in a test
   must fail loudly, not silently stream the default reply.
2. At most one *fault* per request: ``@stall_headers``, ``@stall_first``,
   ``@stall_after``, ``@status``, ``@error_after``, ``@malformed_after``,
   ``@close_after``.
3. ``@X_after=K`` acts once ``min(K, tokens)`` tokens have been sent, in
   place of the rest of the reply.

Everything here is pure: no I/O, no event loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

DEFAULT_TOKENS = 20

FAULTS = (
    "stall_headers",
    "stall_first",
    "stall_after",
    "status",
    "error_after",
    "malformed_after",
    "close_after",
)

_DIRECTIVE = re.compile(r"(?<!\S)@(?P<name>[a-z_]+)(?:=(?P<value>\S*))?")


class DirectiveError(ValueError):
    """The prompt asks for something the fake cannot do; the message says what."""


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not number >= 0:  # also rejects nan
        raise ValueError(value)
    return number


def _error_status(value: str) -> int:
    number = int(value)
    if not 400 <= number <= 599:
        raise ValueError(value)
    return number


def _name(value: str) -> str:
    if not value:
        raise ValueError(value)
    return value


# name -> parser of the value, or None for a flag that takes no value.
_PARSERS: dict[str, Callable[[str], Any] | None] = {
    "tokens": _count,
    "delay": _seconds,
    "session": _name,
    "stall_headers": None,
    "stall_first": None,
    "stall_after": _count,
    "status": _error_status,
    "error_after": _count,
    "malformed_after": _count,
    "close_after": _count,
}


def _one_fault_at_most(instance: Directives, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in (None, False) and instance.fault != attribute.name:
        raise DirectiveError(f"at most one fault per request: @{instance.fault}, @{attribute.name}")


@attrs.frozen(kw_only=True)
class Directives:
    """What one request asks the fake to do. ``delay=None`` means the
    fake's default delay."""

    tokens: int = DEFAULT_TOKENS
    delay: float | None = None
    session: str | None = None
    stall_headers: bool = attrs.field(default=False, validator=_one_fault_at_most)
    stall_first: bool = attrs.field(default=False, validator=_one_fault_at_most)
    stall_after: int | None = attrs.field(default=None, validator=_one_fault_at_most)
    status: int | None = attrs.field(default=None, validator=_one_fault_at_most)
    error_after: int | None = attrs.field(default=None, validator=_one_fault_at_most)
    malformed_after: int | None = attrs.field(default=None, validator=_one_fault_at_most)
    close_after: int | None = attrs.field(default=None, validator=_one_fault_at_most)

    @property
    def fault(self) -> str | None:
        """The name of the first fault set, if any (rule 2 makes it the only one)."""
        return next((name for name in FAULTS if getattr(self, name) not in (None, False)), None)

    @property
    def tokens_before_fault(self) -> int:
        """How many tokens to send before the fault (rule 3), or all of them."""
        after = {
            "stall_after": self.stall_after,
            "error_after": self.error_after,
            "malformed_after": self.malformed_after,
            "close_after": self.close_after,
        }.get(self.fault or "")
        return self.tokens if after is None else min(after, self.tokens)


def parse_directives(prompt: str) -> Directives:
    """The directives in ``prompt``; raises :class:`DirectiveError` (rules 1, 2)."""
    values: dict[str, Any] = {}
    for match in _DIRECTIVE.finditer(prompt):
        name, raw = match["name"], match["value"]
        if name not in _PARSERS:
            known = ", ".join(f"@{known}" for known in _PARSERS)
            raise DirectiveError(f"unknown directive @{name} (known: {known})")
        if name in values:
            raise DirectiveError(f"@{name} given twice")
        parse = _PARSERS[name]
        if parse is None:
            if raw is not None:
                raise DirectiveError(f"@{name} takes no value")
            values[name] = True
            continue
        if raw is None:
            raise DirectiveError(f"@{name} needs a value: @{name}=...")
        try:
            values[name] = parse(raw)
        except ValueError:
            raise DirectiveError(f"bad value for @{name}: {raw!r}") from None
    return Directives(**values)
