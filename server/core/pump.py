"""Producing a run's answer: the agent ──memory channel──▶ the pump, which
numbers the agent's output into the run's log, coalescing deltas.

Resource handling: :func:`produce` runs the agent and the pump in a nursery
of two tasks (inside the run's cancel scope), so cancelling the run reaches
the agent at its next checkpoint; it returns once the agent is done.

Coalescing: a delta that arrives while no window is open is published at
once and opens a window of ``coalesce_window`` seconds; deltas arriving
inside it are buffered and published as one ``run.delta`` when it closes
(or as soon as ``coalesce_max_chars`` are buffered), and a new window
opens. A window that closes with nothing buffered simply ends. The window's
timer is the pump's own receive deadline (set only while something is
buffered), so it cannot outlive the run, and a model streaming slower than
the window costs no timer per token. Whatever is buffered when the pump
stops is published by :meth:`Pump.flush`, which the run calls right before
``run.message`` and the terminal event; a delta still in the channel then
is never received.

Limits: an answer over ``max_run_bytes`` (UTF-8) or a log that would leave
no room for the closing events within ``max_run_events`` stops the pump
with ``run_too_large``; output an agent may not send stops it with
``agent_error``. The run then fails (and cancels its agent); what was
published stays.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from .agent import Agent, AgentRequest
from .config import EngineConfig
from .errors import AgentError
from .eventlog import EventLog
from .events import (
    AgentOutput,
    Envelope,
    ErrorInfo,
    FullMessage,
    RunDelta,
    StopReason,
    TextDelta,
    Usage,
    UsageReport,
)
from .lifecycle import Lifecycle

logger = logging.getLogger(__name__)

AGENT_ERROR = ErrorInfo(code="agent_error", message="The agent failed while producing the answer.")
RUN_TOO_LARGE = ErrorInfo(
    code="run_too_large", message="The answer exceeded the server's size limit for one run."
)
# Events a run may still publish once its agent stops: the buffered deltas,
# run.message and the terminal event. max_run_events keeps room for them.
CLOSING_EVENTS = 3


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8; an agent's lone surrogate (which the
    encoders replace) counts as the 3 bytes it would take."""
    return len(text.encode("utf-8", "surrogatepass"))


@attrs.define(eq=False)
class Pump:
    """The one writer of a run's log, and what the answer is so far."""

    run_id: str
    session_id: str
    config: EngineConfig
    log: EventLog = attrs.field(factory=EventLog)

    usage: Usage | None = attrs.field(default=None, init=False)
    finish_reason: str = attrs.field(default="stop", init=False)
    # trio clock when the first and the latest run.delta were published
    # (time to first token; how long a stream has been silent).
    first_delta_at: float | None = attrs.field(default=None, init=False)
    last_delta_at: float | None = attrs.field(default=None, init=False)
    _deltas: list[str] = attrs.field(factory=list, init=False)
    # Deltas received but not yet published (the coalescing window's).
    _buffered: list[str] = attrs.field(factory=list, init=False)
    _buffered_chars: int = attrs.field(default=0, init=False)
    _message: str | None = attrs.field(default=None, init=False)
    _delta_events: int = attrs.field(default=0, init=False)
    _text_bytes: int = attrs.field(default=0, init=False)

    @property
    def text(self) -> str:
        """The answer so far (the agent's full message, once it sent one)."""
        return self._message if self._message is not None else "".join(self._deltas)

    @property
    def buffered(self) -> bool:
        return bool(self._buffered)

    @property
    def coalesced_deltas(self) -> int:
        """Agent deltas that went out merged into another one's ``run.delta``
        (those still buffered counted as the flush will merge them)."""
        pending_events = 1 if self._buffered else 0
        return len(self._deltas) - self._delta_events - pending_events

    def envelope(self) -> Envelope:
        """The ids and the next ``seq`` for an event of this run."""
        return {"run_id": self.run_id, "session_id": self.session_id, "seq": len(self.log)}

    async def run(
        self, receive_channel: trio.MemoryReceiveChannel[AgentOutput]
    ) -> ErrorInfo | None:
        """Take the agent's output until it is done; the error that stopped
        the pump early (the run then fails), else None."""
        # Until window_end, deltas are buffered; the first delta after it is
        # published at once and opens the next window.
        window_end = -math.inf
        while True:
            if self._buffered:
                with trio.move_on_at(window_end) as window:
                    try:
                        output = await receive_channel.receive()
                    except trio.EndOfChannel:
                        return None
                if window.cancelled_caught:
                    if not self._room_for_delta():
                        return self._too_large()
                    self.flush()
                    window_end = self._window_from_now()
                    continue
            else:
                try:
                    output = await receive_channel.receive()
                except trio.EndOfChannel:
                    return None
            match output:
                case TextDelta(text=text) if text:
                    self._text_bytes += utf8_size(text)
                    if self._text_bytes > self.config.max_run_bytes:
                        return self._too_large()
                    if not self._buffered and trio.current_time() >= window_end:
                        if not self._room_for_delta():
                            return self._too_large()
                        self._deltas.append(text)
                        self._publish_delta(text)
                        window_end = self._window_from_now()
                    else:
                        self._deltas.append(text)
                        self._buffered.append(text)
                        self._buffered_chars += len(text)
                        if self._buffered_chars >= self.config.coalesce_max_chars:
                            if not self._room_for_delta():
                                return self._too_large()
                            self.flush()
                            window_end = self._window_from_now()
                case FullMessage(text=text):
                    if utf8_size(text) > self.config.max_run_bytes:
                        return self._too_large()
                    self._message = text
                case UsageReport(usage=usage):
                    self.usage = usage
                case StopReason(reason=reason):
                    self.finish_reason = reason
                case TextDelta():
                    pass  # empty
                case _:
                    # Not something an agent may send: the run fails (the
                    # agent's next send then finds the channel closed).
                    logger.warning("run %s: agent sent %r", self.run_id, type(output))
                    return AGENT_ERROR

    def flush(self) -> None:
        """Publish what the coalescing window holds, as one ``run.delta``."""
        if self._buffered:
            text = "".join(self._buffered)
            self._buffered.clear()
            self._buffered_chars = 0
            self._publish_delta(text)

    def _room_for_delta(self) -> bool:
        """Whether one more run.delta leaves room for the closing events."""
        return len(self.log) + 1 + CLOSING_EVENTS <= self.config.max_run_events

    def _too_large(self) -> ErrorInfo:
        logger.warning(
            "run_too_large trace=%s events=%d bytes=%d",
            self.run_id,
            len(self.log),
            self._text_bytes,
        )
        return RUN_TOO_LARGE

    def _window_from_now(self) -> float:
        return trio.current_time() + self.config.coalesce_window

    def _publish_delta(self, text: str) -> None:
        self.log.append(RunDelta(**self.envelope(), text=text))
        self._delta_events += 1
        self.last_delta_at = trio.current_time()
        if self.first_delta_at is None:
            self.first_delta_at = self.last_delta_at


async def produce(agent: Agent, request: AgentRequest, pump: Pump, lifecycle: Lifecycle) -> None:
    """Run ``agent`` on ``request`` into ``pump`` until the agent is done (or
    stopped). Errors go to ``lifecycle``: the pump's refusal (the agent is
    then cancelled) first, the agent's own after it."""
    async with trio.open_nursery() as nursery:
        send_channel, receive_channel = trio.open_memory_channel[AgentOutput](0)
        nursery.start_soon(_drive_agent, agent, request, send_channel, lifecycle, pump.run_id)
        # Closed only after the agent was cancelled: a send that found it
        # closed first would fail the agent (BrokenResourceError) over the
        # pump's own error.
        with receive_channel:
            refused = await pump.run(receive_channel)
            if refused is not None:
                lifecycle.fail(refused)
                nursery.cancel_scope.cancel()
    # The agent has returned: from here on a cancel is too late and the run
    # completes (or fails).
    lifecycle.agent_finished()


async def _drive_agent(
    agent: Agent,
    request: AgentRequest,
    send_channel: trio.MemorySendChannel[AgentOutput],
    lifecycle: Lifecycle,
    run_id: str,
) -> None:
    async with send_channel:
        try:
            await agent.run(request, send_channel)
        except AgentError as exc:
            logger.warning("run %s: agent error %s", run_id, exc.code)
            lifecycle.fail(ErrorInfo(code=exc.code, message=exc.message))
        except Exception:
            logger.exception("run %s: agent raised", run_id)
            # A pump's refusal (run_too_large, a bad output) came first and wins.
            lifecycle.fail(AGENT_ERROR)
