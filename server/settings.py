"""Process settings: one frozen value built by the CLI (flags, then
``STREAM_SERVER_*`` environment variables, then these defaults; the
engine's defaults are :class:`~server.core.config.EngineConfig`'s)."""

from __future__ import annotations

import ipaddress

import attrs

from .core.config import EngineConfig
from .logs import LOG_FORMATS, LOG_LEVELS

DEV_KEY = "devkey"
MiB = 1024 * 1024


# The engine's defaults are EngineConfig's: the settings that tune the engine
# default to them, and map to them in one place (Settings.engine_config).
_ENGINE = EngineConfig()


# Seconds one call to the cluster's shared state may take, by default
# (--redis-timeout).
CLUSTER_CALL_TIMEOUT = 2.0


def check_lease_ttl(lease_ttl: float, cleanup_budget: float, call_timeout: float) -> None:
    """A node gives a session up ``cleanup_budget + call_timeout`` before its
    lease can expire (its run's cleanup and the publish of its end happen
    while the lease is still its own), and needs at least one call's time
    before that to renew: anything shorter is refused."""
    least = cleanup_budget + 2 * call_timeout
    if not lease_ttl > least:
        raise ValueError(
            f"--lease-ttl must exceed --cleanup-budget + 2 x --redis-timeout "
            f"({least:g} s here), got {lease_ttl:g}"
        )


def _lowercase(value: str) -> str:
    return value.lower()


@attrs.frozen(kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = attrs.field(
        default=8000, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    agent: str = "scripted"
    token_delay: float = 0.02
    reply_words: int = 120
    api_keys: tuple[str, ...] = ()
    heartbeat_interval: float = attrs.field(default=15.0, validator=attrs.validators.gt(0))
    cleanup_budget: float = attrs.field(
        default=_ENGINE.cleanup_budget, validator=attrs.validators.gt(0)
    )
    idle_timeout: float = attrs.field(
        default=_ENGINE.idle_timeout, validator=attrs.validators.ge(0)
    )
    drain_timeout: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    max_body_bytes: int = attrs.field(default=MiB, validator=attrs.validators.gt(0))
    # Limits (docs/operations.md, "Limits").
    max_prompt_chars: int = attrs.field(default=256 * 1024, validator=attrs.validators.gt(0))
    max_messages: int = attrs.field(default=1000, validator=attrs.validators.gt(0))
    max_header_bytes: int = attrs.field(default=16 * 1024, validator=attrs.validators.ge(1024))
    max_sessions: int = attrs.field(default=_ENGINE.max_sessions, validator=attrs.validators.gt(0))
    max_sessions_per_key: int = attrs.field(
        default=_ENGINE.max_sessions_per_principal, validator=attrs.validators.gt(0)
    )
    max_runs: int = attrs.field(default=_ENGINE.max_runs, validator=attrs.validators.gt(0))
    max_runs_per_key: int = attrs.field(
        default=_ENGINE.max_runs_per_principal, validator=attrs.validators.gt(0)
    )
    # Seconds a run may produce before it is interrupted (reason deadline); 0: off.
    run_timeout: float = attrs.field(default=_ENGINE.run_timeout, validator=attrs.validators.ge(0))
    max_run_events: int = attrs.field(
        default=_ENGINE.max_run_events, validator=attrs.validators.ge(8)
    )
    max_run_bytes: int = attrs.field(
        default=_ENGINE.max_run_bytes, validator=attrs.validators.gt(0)
    )
    max_subscribers: int = attrs.field(
        default=_ENGINE.max_subscribers, validator=attrs.validators.gt(0)
    )
    # Seconds one frame's write may take before its reader is dropped; 0: off.
    send_timeout: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    # Seconds an idle kept-alive connection stays open (Hypercorn's default).
    keep_alive_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    # Deltas arriving within this many ms of a published one are merged.
    coalesce_ms: float = attrs.field(
        default=_ENGINE.coalesce_window * 1000, validator=attrs.validators.ge(0)
    )
    # The run store (SQLite) lives here; "" keeps run records in memory only.
    data_dir: str = "data"
    # Cluster mode: this process is a node of the cluster sharing this Redis.
    redis_url: str | None = None
    # Seconds a session's lease lives without renewal: how long a dead node
    # can hold a session.
    lease_ttl: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # The bound of every call to Redis; a lease must outlive two of them.
    redis_timeout: float = attrs.field(
        default=CLUSTER_CALL_TIMEOUT, validator=attrs.validators.gt(0)
    )
    # Keep each run's prompt in the run store (off: the prompt column is NULL).
    store_prompts: bool = False
    # Ended runs whose events stay available for reattach (then 410).
    retain_runs: int = attrs.field(
        default=_ENGINE.keep_ended_runs, validator=attrs.validators.ge(0)
    )
    retain_seconds: float = attrs.field(
        default=_ENGINE.keep_ended_seconds, validator=attrs.validators.ge(0)
    )
    retain_bytes: int = attrs.field(
        default=_ENGINE.keep_ended_bytes, validator=attrs.validators.ge(0)
    )
    log_level: str = attrs.field(
        default="info", converter=_lowercase, validator=attrs.validators.in_(LOG_LEVELS)
    )
    # text (key=value lines) or json (one object per line).
    log_format: str = attrs.field(default="text", validator=attrs.validators.in_(LOG_FORMATS))
    # Guards /debug/tasks; without one that endpoint does not exist.
    admin_key: str | None = None
    # Upstream agents (ollama, openai, openai-asyncio).
    model: str | None = None
    ollama_url: str = "http://127.0.0.1:11434"
    upstream_url: str = "https://api.openai.com/v1"
    upstream_key: str | None = None
    upstream_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    connect_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    # Blocking agents: worker threads at once.
    thread_limit: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    # Node processes serving the port (server.supervisor); above 1 needs redis_url.
    workers: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    # Restarts of one worker within a minute before the supervisor gives up.
    max_worker_restarts: int = attrs.field(default=5, validator=attrs.validators.ge(0))

    def engine_config(self) -> EngineConfig:
        """The engine's configuration from these settings (what they do not
        set, such as ``max_queued``, keeps EngineConfig's default)."""
        return EngineConfig(
            cleanup_budget=self.cleanup_budget,
            idle_timeout=self.idle_timeout,
            coalesce_window=self.coalesce_ms / 1000,
            keep_ended_runs=self.retain_runs,
            keep_ended_seconds=self.retain_seconds,
            keep_ended_bytes=self.retain_bytes,
            max_sessions=self.max_sessions,
            max_sessions_per_principal=self.max_sessions_per_key,
            max_runs=self.max_runs,
            max_runs_per_principal=self.max_runs_per_key,
            run_timeout=self.run_timeout,
            max_run_events=self.max_run_events,
            max_run_bytes=self.max_run_bytes,
            max_subscribers=self.max_subscribers,
        )

    def __attrs_post_init__(self) -> None:
        if self.redis_url:
            check_lease_ttl(self.lease_ttl, self.cleanup_budget, self.redis_timeout)

    @property
    def uses_dev_key(self) -> bool:
        return not self.api_keys

    @property
    def accepted_keys(self) -> tuple[str, ...]:
        return self.api_keys or (DEV_KEY,)

    @property
    def binds_loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False
