"""Engine settings (the HTTP edge builds them from the process settings)."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class EngineConfig:
    cleanup_budget: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    idle_timeout: float = attrs.field(default=300.0, validator=attrs.validators.ge(0))
    coalesce_window: float = attrs.field(default=0.02, validator=attrs.validators.ge(0))
    coalesce_max_chars: int = attrs.field(default=2048, validator=attrs.validators.ge(1))
    # Ended runs kept (with their event logs) for reattach and inspection.
    keep_ended_runs: int = attrs.field(default=1000, validator=attrs.validators.ge(0))
    keep_ended_seconds: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))
    keep_ended_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=attrs.validators.ge(0))
    # enqueue: prompts a session may hold in line (running one included).
    max_queued: int = attrs.field(default=8, validator=attrs.validators.ge(1))
