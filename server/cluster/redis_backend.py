"""The cluster's shared state in Redis (or Valkey), through ``coredis``.

:class:`RedisBackend` implements :class:`~server.cluster.backend.ClusterBackend`:
each fenced primitive is one Lua script (:mod:`server.cluster.redis_scripts`,
EVALSHA with a NOSCRIPT fallback that loads it), so checking the token and
writing are one atomic step on the server. This module and
:mod:`server.cluster.redis_clients` are the only ones that import
``coredis`` (the ``cluster`` extra); nothing imports them unless
``--redis-url`` asks for it.

Connections: two coredis clients, each with a pool of its own
(:func:`server.cluster.redis_clients.clients`).

* *commands*: every non-blocking call. coredis multiplexes requests on a
  pooled connection (it releases the connection once a request is written),
  so a handful of connections carry all of them; ``stream_timeout`` is the
  call timeout.
* *blocking*: ``run_events``, ``read_intents`` and ``wait_reply`` (XREAD
  BLOCK, BLMOVE). A blocking read holds one connection for its whole block,
  so this pool is sized for the node's concurrent waiters
  (``max_blocking``: intents reader + remote readers + prompts waiting for a
  handover), and its ``stream_timeout`` is the call timeout plus
  :data:`MAX_BLOCK`. A longer ``block`` is cut to :data:`MAX_BLOCK` (the
  caller sees "nothing yet" and asks again). A blocking read that is
  cancelled drops its connection (coredis), so no late reply can land in the
  next request.

Timeouts: every call runs under ``trio.fail_after(timeout + block)`` and
coredis' own connect/stream/pool timeouts; running out, a refused or lost
connection, or an error reply that says Redis cannot serve now (LOADING,
READONLY, OOM...) becomes :class:`~server.cluster.backend.BackendUnavailable`;
any other error reply (WRONGTYPE, a script error) is a bug:
:class:`~server.cluster.backend.BackendError`. coredis retries a
command once on a connection error (a pooled connection that died with a
restarted Redis), never on a timeout; the scripts are written so a retry
after an unknown outcome is harmless (``publish`` skips events already
there, ``hand_over`` answers a handover that already happened).

Lifetime: coredis runs each pool's connections in a task group, so the
backend is an async context manager (``async with RedisBackend.from_url(url)
as backend``), entered and left (or :meth:`RedisBackend.aclose`\\ d) by the
same task, which owns those connection tasks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script

from . import redis_scripts as lua
from .backend import (
    REPLY_TTL,
    TERMINAL_TYPES,
    BackendError,
    BackendUnavailable,
    Holder,
    Intent,
    Lease,
    Published,
    Reply,
    SessionRef,
)
from .redis_clients import DEFAULT_MAX_BLOCKING, DEFAULT_TIMEOUT, MAX_BLOCK, clients
from .redis_codec import (
    created_at_of,
    event_of,
    holder_of,
    intent_json,
    is_outage,
    parsed_intent,
    reply_of,
)

# Entries one run_events / read_intents call returns at most.
READ_BATCH: Final = 1000

T = TypeVar("T")


class RedisBackend:
    """The seam's primitives on one Redis; see the module docstring."""

    def __init__(
        self,
        commands: coredis.Redis[str],
        blocking: coredis.Redis[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retain_seconds: float = 3600.0,
        prefix: str = lua.PREFIX,
    ) -> None:
        self.timeout = timeout
        # end_orphan's retention (the seam gives that primitive none).
        self.retain_seconds = retain_seconds
        self.keys = lua.Keys(prefix)
        self._commands = commands
        self._blocking = blocking
        self._stack: AsyncExitStack | None = None
        self._acquire = commands.register_script(lua.ACQUIRE)
        self._holder_script = commands.register_script(lua.HOLDER)
        self._renew = commands.register_script(lua.RENEW)
        self._release = commands.register_script(lua.RELEASE)
        self._hand_over = commands.register_script(lua.HAND_OVER)
        self._publish = commands.register_script(lua.PUBLISH)
        self._end_orphan = commands.register_script(lua.END_ORPHAN)
        self._forget_run = commands.register_script(lua.FORGET_RUN)
        self._session_runs = commands.register_script(lua.SESSION_RUNS)
        self._send_intent = commands.register_script(lua.SEND_INTENT)
        self._reply = commands.register_script(lua.REPLY)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_blocking: int = DEFAULT_MAX_BLOCKING,
        retain_seconds: float = 3600.0,
        prefix: str = lua.PREFIX,
    ) -> Self:
        """A backend for ``redis://host:port/db`` (no I/O until entered)."""
        commands, blocking = clients(url, timeout=timeout, max_blocking=max_blocking)
        return cls(
            commands, blocking, timeout=timeout, retain_seconds=retain_seconds, prefix=prefix
        )

    async def __aenter__(self) -> Self:
        assert self._stack is None, "RedisBackend entered twice"
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._commands)
            await stack.enter_async_context(self._blocking)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close both pools (their connection tasks end)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _call(self, call: Callable[[], Awaitable[T]], *, block: float = 0.0) -> T:
        try:
            with trio.fail_after(self.timeout + block):
                return await call()
        except trio.TooSlowError as error:
            raise BackendUnavailable(f"redis did not answer within {self.timeout}s") from error
        except coredis.exceptions.ResponseError as error:
            if not is_outage(error):
                raise BackendError(f"redis answered an error: {error}") from error
            raise BackendUnavailable(f"redis: {error!r}") from error
        except (coredis.exceptions.RedisError, OSError) as error:  # OSError: TimeoutError too
            raise BackendUnavailable(f"redis: {error!r}") from error
        except ExceptionGroup as group:
            if not is_outage(group):
                raise
            raise BackendUnavailable(f"redis: {group!r}") from group

    async def _script(self, script: Script[str], keys: list[str], args: list[Any]) -> Any:
        return await self._call(lambda: script(keys=keys, args=args))

    async def ping(self) -> None:
        """Cheap readiness check; BackendUnavailable if Redis does not answer."""
        await self._call(self._commands.ping)

    # --- leases ---------------------------------------------------------

    async def acquire(self, session: SessionRef, node: str, ttl: float) -> Lease | Holder:
        keys = [self.keys.lease(session), self.keys.fence]
        reply = await self._script(self._acquire, keys, [node, lua.milliseconds(ttl)])
        if reply[0] == 1:
            return Lease(session=session, node=node, token=int(reply[1]))
        return holder_of(reply)

    async def holder(self, session: SessionRef) -> Holder | None:
        reply = await self._script(self._holder_script, [self.keys.lease(session)], [])
        return None if reply is None else holder_of(reply)

    async def renew(self, lease: Lease, ttl: float, *, busy: bool, run_id: str | None) -> bool:
        args = [lease.token, lua.milliseconds(ttl), "1" if busy else "0", run_id or ""]
        return bool(await self._script(self._renew, [self.keys.lease(lease.session)], args) == 1)

    async def release(self, lease: Lease) -> bool:
        key = self.keys.lease(lease.session)
        return bool(await self._script(self._release, [key], [lease.token]) == 1)

    async def hand_over(self, lease: Lease, to_node: str, ttl: float) -> Lease | None:
        keys = [self.keys.lease(lease.session), self.keys.fence]
        args = [lease.token, to_node, lua.milliseconds(ttl)]
        token = int(await self._script(self._hand_over, keys, args))
        return Lease(session=lease.session, node=to_node, token=token) if token else None

    # --- runs -------------------------------------------------------------

    def _run_keys(self, lease: Lease, run_id: str) -> list[str]:
        return [
            self.keys.lease(lease.session),
            self.keys.events(run_id),
            self.keys.run(run_id),
            self.keys.session_runs(lease.session),
        ]

    async def publish(
        self,
        lease: Lease,
        run_id: str,
        events: Sequence[dict[str, Any]],
        *,
        record: dict[str, Any] | None = None,
        max_events: int,
        retain_seconds: float,
    ) -> Published:
        """See the protocol."""
        seqs = [int(event["seq"]) for event in events]
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            raise ValueError(f"events of run {run_id} are not consecutive: {seqs}")
        args: list[Any] = [
            lease.token,
            max_events,
            lua.milliseconds(max(retain_seconds, lua.MIN_RETAIN)),
            lua.milliseconds(max(retain_seconds, lua.LIVE_RUN_TTL)),
            "" if record is None else json.dumps(record),
            created_at_of(record) if record is not None else 0,
            run_id,
            lua.SESSION_RUNS_KEPT,
        ]
        for seq, event in zip(seqs, events, strict=True):
            terminal = "1" if event.get("type") in TERMINAL_TYPES else "0"
            args += [seq, terminal, json.dumps(event)]
        result = await self._script(self._publish, self._run_keys(lease, run_id), args)
        if result == -1:
            raise ValueError(f"events of run {run_id} from seq {seqs[0]} leave a gap")
        return {1: Published.WRITTEN, 2: Published.ENDED}.get(int(result), Published.LEASE_LOST)

    async def end_orphan(
        self, lease: Lease, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        return await self._end_orphan_if(lease.session, lease.token, run_id, terminal, record)

    async def end_orphan_unleased(
        self, session: SessionRef, run_id: str, terminal: dict[str, Any], record: dict[str, Any]
    ) -> bool:
        return await self._end_orphan_if(session, "", run_id, terminal, record)

    async def _end_orphan_if(
        self,
        session: SessionRef,
        token: int | str,
        run_id: str,
        terminal: dict[str, Any],
        record: dict[str, Any],
    ) -> bool:
        event = {key: value for key, value in terminal.items() if key != "seq"}
        keys = [
            self.keys.lease(session),
            self.keys.events(run_id),
            self.keys.run(run_id),
            self.keys.session_runs(session),
        ]
        args = [
            token,
            json.dumps(event),
            json.dumps(record),
            lua.milliseconds(max(self.retain_seconds, lua.MIN_RETAIN)),
            created_at_of(record),
            run_id,
            lua.SESSION_RUNS_KEPT,
        ]
        seq = await self._script(self._end_orphan, keys, args)
        return int(seq) >= 0

    async def forget_run(self, lease: Lease, run_id: str) -> bool:
        """Delete a run's record and events (``rollback``), fenced by ``lease``."""
        keys = self._run_keys(lease, run_id)
        return bool(await self._script(self._forget_run, keys, [lease.token, run_id]) == 1)

    async def run_record(self, run_id: str) -> dict[str, Any] | None:
        text = await self._call(lambda: self._commands.get(self.keys.run(run_id)))
        return None if text is None else dict(json.loads(text))

    async def run_events(
        self, run_id: str, after_seq: int, *, block: float
    ) -> list[dict[str, Any]]:
        stream = self.keys.events(run_id)
        entries = await self._read_stream(stream, f"0-{after_seq + 1}", block)
        return [event_of(dict(entry.field_values)) for entry in entries]

    async def session_runs(self, session: SessionRef, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        keys = [self.keys.session_runs(session)]
        texts = await self._script(self._session_runs, keys, [limit, self.keys.run("")])
        return [dict(json.loads(text)) for text in texts]

    # --- intents ----------------------------------------------------------

    async def send_intent(self, to_node: str, intent: Intent) -> None:
        args = [lua.INBOX_MAXLEN, lua.milliseconds(lua.INBOX_TTL), intent_json(intent)]
        await self._script(self._send_intent, [self.keys.inbox(to_node)], args)

    async def read_intents(
        self, node: str, after: str, *, block: float
    ) -> list[tuple[str, Intent | None]]:
        inbox = self.keys.inbox(node)
        entries = await self._read_stream(inbox, after, block)
        if entries:
            ttl = lua.milliseconds(lua.INBOX_TTL)
            await self._call(lambda: self._commands.pexpire(inbox, ttl))
        return [(str(entry.identifier), parsed_intent(entry)) for entry in entries]

    async def reply(self, reply_to: str, reply: Reply) -> None:
        body = {"status": reply.status.value, "token": reply.token, "record": reply.record}
        args = [json.dumps(body), lua.milliseconds(REPLY_TTL)]
        await self._script(self._reply, [self.keys.reply(reply_to)], args)

    async def wait_reply(self, reply_to: str, *, block: float) -> Reply | None:
        key = self.keys.reply(reply_to)
        block = min(max(block, 0.0), MAX_BLOCK)
        if block < 0.001:
            text = await self._call(lambda: self._commands.lindex(key, 0))
        else:
            # BLMOVE onto the same list returns the head and keeps it there.
            left: Literal[coredis.PureToken.LEFT] = coredis.PureToken.LEFT
            text = await self._call(
                lambda: self._blocking.blmove(key, key, left, left, timeout=block), block=block
            )
        return None if text is None else reply_of(text)

    async def _read_stream(self, key: str, after: str, block: float) -> list[Any]:
        """Entries of one stream after id ``after``, waiting up to ``block``."""
        block = min(max(block, 0.0), MAX_BLOCK)
        # XREAD BLOCK 0 would wait for ever: no block is a plain XREAD.
        block_ms = math.ceil(block * 1000) or None
        reply = await self._call(
            lambda: self._blocking.xread({key: after}, count=READ_BATCH, block=block_ms),
            block=block,
        )
        if not reply:
            return []
        return list(reply.get(key, ()))
