"""``python -m server`` / ``trio-stream-server``: flags, mirrored by
``STREAM_SERVER_*`` environment variables (``--port`` ⇔ ``STREAM_SERVER_PORT``;
``--api-key`` ⇔ ``STREAM_SERVER_API_KEYS``, comma-separated)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NoReturn

import trio

from .agents import AGENT_NAMES, AgentConfigError, check_agent_settings
from .logs import configure_logging
from .settings import DEV_KEY, Settings

logger = logging.getLogger("server")
ENV_PREFIX = "STREAM_SERVER_"
PROG = "trio-stream-server"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad flag: one line naming it (exit status 2), without the usage
        of forty flags around it (``--help`` has that)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    defaults = Settings()
    parser = _Parser(
        prog=PROG,
        description="Streaming server for LLM agent chat sessions (Hypercorn, trio worker).",
        epilog="Every flag can also be set as STREAM_SERVER_<FLAG> (e.g. STREAM_SERVER_PORT).",
    )

    def option(flag: str, kind: type, default: object, help_text: str) -> None:
        env = environ.get(_env_name(flag))
        parser.add_argument(
            flag,
            type=kind,
            # A string default goes through ``type`` like a typed flag, so a
            # bad environment value is a usage error naming the flag.
            default=env if env is not None else default,
            help=f"{help_text} (default: %(default)s; env {_env_name(flag)})",
        )

    def switch(flag: str, default: bool, help_text: str) -> None:
        """``--flag`` / ``--no-flag``; the environment variable takes
        1/true/yes/on or 0/false/no/off."""
        env = environ.get(_env_name(flag))
        if env is not None:
            try:
                default = _parse_bool(env)
            except ValueError as exc:
                parser.error(f"{_env_name(flag)}: {exc}")
        parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction,
            default=default,
            help=f"{help_text} (default: %(default)s; env {_env_name(flag)})",
        )

    option("--host", str, defaults.host, "address to bind")
    option("--port", int, defaults.port, "port to bind; 0 picks a free one")
    option(
        "--agent",
        str,
        defaults.agent,
        f"agent backend: {', '.join(AGENT_NAMES)}, or module:factory for a custom one",
    )
    option("--token-delay", float, defaults.token_delay, "scripted agent: seconds between tokens")
    option("--reply-words", int, defaults.reply_words, "scripted agent: words per reply")
    option(
        "--heartbeat-interval",
        float,
        defaults.heartbeat_interval,
        "seconds of silence before a ': ping'",
    )
    option("--cleanup-budget", float, defaults.cleanup_budget, "seconds a run's cleanup may take")
    option(
        "--idle-timeout", float, defaults.idle_timeout, "seconds before an idle session is dropped"
    )
    option(
        "--drain-timeout", float, defaults.drain_timeout, "seconds runs may finish after SIGTERM"
    )
    option("--max-body-bytes", int, defaults.max_body_bytes, "largest request body accepted")
    # Limits (docs/operations.md, "Limits").
    option(
        "--max-prompt-chars",
        int,
        defaults.max_prompt_chars,
        "characters of prompt and message contents in one request",
    )
    option("--max-messages", int, defaults.max_messages, "messages in one request")
    option(
        "--max-header-bytes",
        int,
        defaults.max_header_bytes,
        "bytes of a request's line and headers (HTTP/1.1) or header list (HTTP/2)",
    )
    option("--max-sessions", int, defaults.max_sessions, "open sessions in total")
    option("--max-sessions-per-key", int, defaults.max_sessions_per_key, "open sessions per key")
    option("--max-runs", int, defaults.max_runs, "concurrent runs in total")
    option("--max-runs-per-key", int, defaults.max_runs_per_key, "concurrent runs per key")
    option(
        "--run-timeout",
        float,
        defaults.run_timeout,
        "seconds a run may take before it is interrupted (reason deadline); 0: no limit",
    )
    option("--max-run-events", int, defaults.max_run_events, "events in one run's log")
    option("--max-run-bytes", int, defaults.max_run_bytes, "bytes of one run's answer")
    option("--max-subscribers", int, defaults.max_subscribers, "readers of one run at once")
    option(
        "--send-timeout",
        float,
        defaults.send_timeout,
        "seconds one frame's write may take before its reader is dropped; 0: no limit",
    )
    option(
        "--keep-alive-timeout",
        float,
        defaults.keep_alive_timeout,
        "seconds an idle kept-alive connection stays open",
    )
    option(
        "--coalesce-ms",
        float,
        defaults.coalesce_ms,
        "deltas within this window after a published one go out merged; 0 disables",
    )
    option(
        "--data-dir",
        str,
        defaults.data_dir,
        "directory of the run store (runs.sqlite3); '' keeps records in memory only",
    )
    switch(
        "--store-prompts",
        defaults.store_prompts,
        "keep each run's prompt in the run store (off: only who, when, how it ended, the answer)",
    )
    option(
        "--redis-url",
        str,
        defaults.redis_url,
        "redis://host:port/db: run as a node of the cluster sharing this Redis (docs/cluster.md)",
    )
    option(
        "--lease-ttl",
        float,
        defaults.lease_ttl,
        "cluster mode: seconds a session's lease lives unrenewed (how long a dead node holds "
        "it); must exceed --cleanup-budget + 2 x --redis-timeout",
    )
    option(
        "--redis-timeout",
        float,
        defaults.redis_timeout,
        "cluster mode: seconds one call to Redis may take before the node treats Redis as "
        "unreachable",
    )
    option("--retain-runs", int, defaults.retain_runs, "ended runs kept for reattach")
    option("--retain-seconds", float, defaults.retain_seconds, "seconds an ended run is kept")
    option(
        "--retain-bytes", int, defaults.retain_bytes, "bytes of ended runs' logs kept (estimated)"
    )
    option("--log-level", str, defaults.log_level, "debug, info, warning or error")
    option("--log-format", str, defaults.log_format, "text (key=value) or json (one object a line)")
    option("--admin-key", str, defaults.admin_key, "enables /debug/tasks for this bearer key")
    option("--model", str, defaults.model, "upstream agents: the model to ask")
    option("--ollama-url", str, defaults.ollama_url, "ollama agent: base URL")
    option("--upstream-url", str, defaults.upstream_url, "openai agents: base URL (with /v1)")
    option("--upstream-key", str, defaults.upstream_key, "openai agents: upstream API key")
    option(
        "--upstream-timeout",
        float,
        defaults.upstream_timeout,
        "upstream agents: seconds of upstream silence before upstream_timeout",
    )
    option("--connect-timeout", float, defaults.connect_timeout, "upstream agents: connect timeout")
    option("--thread-limit", int, defaults.thread_limit, "blocking agents: worker threads at once")
    option(
        "--workers",
        int,
        defaults.workers,
        "node processes serving the port, each with its own drain; above 1 needs --redis-url",
    )
    option(
        "--max-worker-restarts",
        int,
        defaults.max_worker_restarts,
        "--workers: restarts of one worker within a minute before the server gives up and exits 1",
    )
    env_keys = [key for key in environ.get(ENV_PREFIX + "API_KEYS", "").split(",") if key.strip()]
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        default=None,
        help=f"accepted API key, repeatable (env {ENV_PREFIX}API_KEYS, comma-separated); "
        f"with none the dev key '{DEV_KEY}' is accepted on loopback only",
    )
    parser.set_defaults(env_api_keys=[key.strip() for key in env_keys])
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags and environment; exits with a usage error (status 2)
    on anything invalid, never with a traceback."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    try:
        settings = Settings(
            host=args.host,
            port=args.port,
            agent=args.agent,
            token_delay=args.token_delay,
            reply_words=args.reply_words,
            api_keys=tuple(args.api_keys or args.env_api_keys),
            heartbeat_interval=args.heartbeat_interval,
            cleanup_budget=args.cleanup_budget,
            idle_timeout=args.idle_timeout,
            drain_timeout=args.drain_timeout,
            max_body_bytes=args.max_body_bytes,
            max_prompt_chars=args.max_prompt_chars,
            max_messages=args.max_messages,
            max_header_bytes=args.max_header_bytes,
            max_sessions=args.max_sessions,
            max_sessions_per_key=args.max_sessions_per_key,
            max_runs=args.max_runs,
            max_runs_per_key=args.max_runs_per_key,
            run_timeout=args.run_timeout,
            max_run_events=args.max_run_events,
            max_run_bytes=args.max_run_bytes,
            max_subscribers=args.max_subscribers,
            send_timeout=args.send_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            coalesce_ms=args.coalesce_ms,
            data_dir=args.data_dir,
            store_prompts=args.store_prompts,
            redis_url=args.redis_url or None,
            lease_ttl=args.lease_ttl,
            redis_timeout=args.redis_timeout,
            retain_runs=args.retain_runs,
            retain_seconds=args.retain_seconds,
            retain_bytes=args.retain_bytes,
            log_level=args.log_level,
            log_format=args.log_format,
            admin_key=args.admin_key,
            model=args.model,
            ollama_url=args.ollama_url,
            upstream_url=args.upstream_url,
            upstream_key=args.upstream_key,
            upstream_timeout=args.upstream_timeout,
            connect_timeout=args.connect_timeout,
            thread_limit=args.thread_limit,
            workers=args.workers,
            max_worker_restarts=args.max_worker_restarts,
        )
        check_agent_settings(settings)
    except (AgentConfigError, ValueError) as exc:
        parser.error(str(exc))
    if settings.workers > 1 and not settings.redis_url:
        parser.error(
            f"--workers {settings.workers} needs --redis-url: workers share sessions through Redis"
        )
    if settings.uses_dev_key and not settings.binds_loopback_only:
        parser.error(
            f"refusing to bind {settings.host} with the dev key '{DEV_KEY}': "
            "set --api-key or STREAM_SERVER_API_KEYS"
        )
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    """Exit status: 0 after a shutdown by signal (SIGINT, SIGTERM, SIGHUP),
    2 for a bad flag or a start-up error the operator can fix (one line on
    stderr), 1 for anything else (a bug: its traceback; with ``--workers``,
    a worker that failed: see :mod:`server.supervisor`)."""
    settings = parse_settings(argv)
    from .handoff import Handoff

    handoff = Handoff.from_environ(os.environ)
    worker = None if handoff is None else handoff.index
    configure_logging(settings.log_level, settings.log_format, worker=worker)
    if settings.uses_dev_key and handoff is None:
        logger.warning(
            "no API key configured: accepting the dev key '%s' (loopback only); "
            "set --api-key or STREAM_SERVER_API_KEYS for anything else",
            DEV_KEY,
        )
    from .launcher import serve
    from .shutdown import SHUTDOWN_SIGNALS
    from .startup import EXIT_STARTUP_ERROR, StartupError

    status = 0
    try:
        if settings.workers > 1:
            from .supervisor import supervise

            args = sys.argv[1:] if argv is None else argv
            status = trio.run(partial(supervise, settings, list(args)))
        else:
            trio.run(partial(serve, settings, handoff=handoff))
    except StartupError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        raise SystemExit(EXIT_STARTUP_ERROR) from None
    # serve() took every shutdown signal while it ran and has cleaned up; one
    # that arrives while the interpreter exits must not change the exit status.
    for signum in SHUTDOWN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if status:
        raise SystemExit(status)
