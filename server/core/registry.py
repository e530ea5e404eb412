"""Runs by id, for the runs API: every live run, and ended runs while their
event log is retained.

Retention: ended runs are kept for reattach and inspection up to
``keep_ended`` runs, ``keep_bytes`` of their logs (estimated) and
``keep_seconds`` after they ended, whichever is reached first; older ones
are forgotten, and their ids remembered (boundedly) so a late reattach can
be told the log is *gone* rather than *unknown*.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import attrs
import trio

from .run import Run

# An event's JSON envelope (type, ids, seq) is about this many bytes.
EVENT_OVERHEAD = 120


def log_bytes(run: Run) -> int:
    """A run's log size, estimated: its text plus a fixed cost per event."""
    return len(run.text) + EVENT_OVERHEAD * len(run.log)


class Gone:
    """The run existed, but its log is past retention."""


GONE = Gone()


@attrs.define(eq=False)
class RunRegistry:
    keep_ended: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    keep_seconds: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))
    keep_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=attrs.validators.ge(0))
    remember_gone: int = 100_000
    _runs: OrderedDict[str, tuple[str, Run]] = attrs.field(factory=OrderedDict, init=False)
    _gone: deque[tuple[str, str]] = attrs.field(factory=deque, init=False)
    _gone_ids: set[tuple[str, str]] = attrs.field(factory=set, init=False)
    _ended_sizes: dict[str, int] = attrs.field(factory=dict, init=False)

    def add(self, principal: str, run: Run) -> None:
        self._runs[run.run_id] = (principal, run)
        self.prune()

    def discard(self, run: Run) -> None:
        """Forget a run entirely (rolled back): it is unknown from now on."""
        self._runs.pop(run.run_id, None)
        self._ended_sizes.pop(run.run_id, None)

    def lookup(self, principal: str, run_id: str) -> Run | Gone | None:
        """The principal's run, :data:`GONE`, or ``None``; another
        principal's run is ``None`` (it does not exist for them)."""
        self.prune()
        entry = self._runs.get(run_id)
        if entry is not None:
            owner, run = entry
            return run if owner == principal else None
        return GONE if (principal, run_id) in self._gone_ids else None

    def for_session(self, principal: str, session_id: str, limit: int) -> list[Run]:
        """The session's known runs, newest first."""
        runs = [
            run
            for owner, run in reversed(self._runs.values())
            if owner == principal and run.session_id == session_id
        ]
        return runs[:limit]

    def prune(self) -> None:
        """Forget the oldest ended runs beyond the count, bytes or age."""
        now = trio.current_time()
        ended = [run for _, run in self._runs.values() if run.ended]
        sizes = [self._size(run) for run in ended]
        excess_runs = len(ended) - self.keep_ended
        excess_bytes = sum(sizes) - self.keep_bytes
        for run, size in zip(ended, sizes, strict=True):
            expired = run.ended_at is not None and now - run.ended_at > self.keep_seconds
            if excess_runs > 0 or excess_bytes > 0 or expired:
                self._forget(run.run_id)
                excess_runs -= 1
                excess_bytes -= size

    def _size(self, run: Run) -> int:
        # An ended run's log no longer changes: size it once (joining every
        # kept run's text on each request made prune quadratic under load).
        size = self._ended_sizes.get(run.run_id)
        if size is None:
            size = self._ended_sizes[run.run_id] = log_bytes(run)
        return size

    def _forget(self, run_id: str) -> None:
        principal, _ = self._runs.pop(run_id)
        self._ended_sizes.pop(run_id, None)
        key = (principal, run_id)
        self._gone.append(key)
        self._gone_ids.add(key)
        while len(self._gone) > self.remember_gone:
            self._gone_ids.discard(self._gone.popleft())
