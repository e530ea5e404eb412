"""The two coredis clients a :class:`~server.cluster.redis_backend.RedisBackend`
uses (see its docstring: *commands* multiplexed, *blocking* one connection
per blocking read), and a workaround for a coredis defect."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlparse

import coredis
import coredis.exceptions
from coredis.retry import ConstantRetryPolicy

from .urls import redacted

# Seconds a blocking read waits at most in one call.
MAX_BLOCK: Final = 10.0
DEFAULT_TIMEOUT: Final = 2.0
DEFAULT_MAX_BLOCKING: Final = 64
# Non-blocking requests are multiplexed: a few connections carry them all.
COMMAND_CONNECTIONS: Final = 8
URL_SCHEMES: Final = ("redis", "rediss", "unix")


def check_url(url: str) -> str:
    """``url`` if it names a Redis server, else ValueError with the reason."""
    parsed = urlparse(url)
    if parsed.scheme not in URL_SCHEMES:
        raise ValueError(
            f"redis url must start with redis://, rediss:// or unix://: {redacted(url)!r}"
        )
    if parsed.scheme != "unix" and not parsed.hostname:
        raise ValueError(f"redis url has no host: {redacted(url)!r}")
    return url


def clients(
    url: str, *, timeout: float = DEFAULT_TIMEOUT, max_blocking: int = DEFAULT_MAX_BLOCKING
) -> tuple[coredis.Redis[str], coredis.Redis[str]]:
    """(commands, blocking) for ``url``; no I/O until they are entered."""
    check_url(url)
    # Once, on a connection error only: a timeout may have taken effect.
    retry = ConstantRetryPolicy((coredis.exceptions.ConnectionError,), retries=1, delay=0)
    common: dict[str, Any] = {
        "decode_responses": True,
        "connect_timeout": timeout,
        "pool_timeout": timeout,
        "retry_policy": retry,
    }
    commands = coredis.Redis.from_url(
        url, stream_timeout=timeout, max_connections=COMMAND_CONNECTIONS, **common
    )
    blocking = coredis.Redis.from_url(
        url, stream_timeout=timeout + MAX_BLOCK, max_connections=max_blocking, **common
    )
    return _with_closing_streams(commands), _with_closing_streams(blocking)


class _ClosingStreams(coredis.connection.BaseConnection):
    """Workaround for coredis 6.9 (connection/_base.py): a connection makes
    its anyio memory streams in ``__init__`` and closes them only in
    ``run`` once connected, so every refused connect (Redis down) leaves six
    unclosed streams behind, each a ResourceWarning when collected. Close
    them when connecting fails. tests/cluster/test_redis_outage.py's
    ``test_coredis_still_leaks_streams_of_a_refused_connect`` fails once
    coredis closes them itself: then this can go."""

    async def _connect(self) -> Any:
        try:
            # A concrete _connect follows in the MRO (TCP or Unix).
            return await super()._connect()  # type: ignore[safe-super]
        except BaseException:
            for stream in (
                self._write_buffer_in,
                self._write_buffer_out,
                self._push_message_buffer_in,
                self._push_message_buffer_out,
                self._streamed_message_buffer_in,
                self._streamed_message_buffer_out,
            ):
                stream.close()
            raise


class _TCPConnection(_ClosingStreams, coredis.TCPConnection):
    pass


class _UnixConnection(_ClosingStreams, coredis.UnixDomainSocketConnection):
    pass


def _with_closing_streams(client: coredis.Redis[str]) -> coredis.Redis[str]:
    pool = client.connection_pool
    if issubclass(pool.connection_class, coredis.TCPConnection):
        pool.connection_class = _TCPConnection
    elif issubclass(pool.connection_class, coredis.UnixDomainSocketConnection):
        pool.connection_class = _UnixConnection
    return client
