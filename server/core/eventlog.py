"""A run's in-memory event log and the subscriptions that read it.

The pump is the only writer; any number of subscribers read at their own
pace. A subscriber that wakes takes *everything* pending in one batch, so
a slow reader gets fewer, larger frames rather than a queue of small ones
(frames are what cost CPU on the wire, not tokens).

Appending never blocks: the writer is never held up by a reader.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import attrs
import trio

from .errors import LifecycleError
from .events import RunEvent


@attrs.define(eq=False)
class EventLog:
    _events: list[RunEvent] = attrs.field(factory=list, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __len__(self) -> int:
        return len(self._events)

    @property
    def last(self) -> RunEvent | None:
        return self._events[-1] if self._events else None

    @property
    def closed(self) -> bool:
        """True once the terminal event is in: nothing may follow it."""
        return bool(self._events) and self._events[-1].terminal

    @property
    def events(self) -> tuple[RunEvent, ...]:
        return tuple(self._events)

    def append(self, event: RunEvent) -> None:
        if self.closed:
            raise LifecycleError(f"event {event.type} published after the terminal event")
        if event.seq != len(self._events):
            raise LifecycleError(f"seq {event.seq} breaks the sequence at {len(self._events)}")
        self._events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def since(self, cursor: int) -> list[RunEvent]:
        return self._events[cursor:]

    async def wait_beyond(self, cursor: int) -> None:
        """Return once the log holds more than ``cursor`` events or is closed."""
        while len(self._events) <= cursor and not self.closed:
            await self._changed.wait()


@attrs.define(eq=False)
class Subscription:
    """A reader's cursor into one run's log.

    Use as a context manager so the run knows how many readers it has (an
    idle session with a reader is not dropped)."""

    _log: EventLog
    _on_change: Callable[[int], None]
    cursor: int = 0
    _open: bool = attrs.field(default=False, init=False)

    def open(self) -> Subscription:
        if not self._open:
            self._open = True
            self._on_change(+1)
        return self

    def __enter__(self) -> Subscription:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._on_change(-1)

    def take(self) -> list[RunEvent]:
        """Everything published since the last take, in order."""
        batch = self._log.since(self.cursor)
        self.cursor += len(batch)
        return batch

    @property
    def finished(self) -> bool:
        """The terminal event has been taken: nothing more will come."""
        return self._log.closed and self.cursor >= len(self._log)

    async def wait(self) -> None:
        await self._log.wait_beyond(self.cursor)
