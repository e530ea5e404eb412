"""Engine settings (the HTTP edge builds them from the process settings).

Limits (docs/operations.md, "Limits"): the defaults are generous enough for
a soak test of hundreds of sessions and bound what one principal, one run or
one reader can hold on to."""

from __future__ import annotations

import attrs

MiB = 1024 * 1024
_positive = attrs.validators.ge(1)


@attrs.frozen(kw_only=True)
class EngineConfig:
    cleanup_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    idle_timeout: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    coalesce_window: float = attrs.field(default=0.02, validator=attrs.validators.ge(0))
    coalesce_max_chars: int = attrs.field(default=2048, validator=attrs.validators.ge(1))
    # Ended runs kept (with their event logs) for reattach and inspection.
    keep_ended_runs: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    keep_ended_seconds: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))
    keep_ended_bytes: int = attrs.field(default=64 * MiB, validator=attrs.validators.ge(0))
    # enqueue: prompts a session may hold in line (running one included).
    max_queued: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    # Open sessions (idle ones included, until the idle timeout drops them).
    max_sessions: int = attrs.field(default=10_000, validator=_positive)
    max_sessions_per_principal: int = attrs.field(default=1000, validator=_positive)
    # Concurrent runs: sessions with a live run or a submission on its way.
    max_runs: int = attrs.field(default=1000, validator=_positive)
    max_runs_per_principal: int = attrs.field(default=256, validator=_positive)
    # Seconds a run may produce before it is interrupted (reason deadline); 0: no limit.
    run_timeout: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    # One run's log: events (room for the closing ones included) and answer bytes.
    max_run_events: int = attrs.field(default=100_000, validator=attrs.validators.ge(8))
    max_run_bytes: int = attrs.field(default=8 * MiB, validator=_positive)
    # Readers of one run at once (the request that started it included).
    max_subscribers: int = attrs.field(default=64, validator=_positive)
