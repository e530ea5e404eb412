"""Frame encoders: a batch of run events in, the bytes of one write out.

A subscriber that wakes takes every pending event and writes them as one
frame, so each encoder turns a whole batch into one ``bytes``. Each encoder
also writes the one closing frame of a reader dropped for reading too
slowly (:class:`StreamDropped`), in its own format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from ..core.events import ErrorInfo, RunEvent
from . import openai
from .native import dumps, event_dict
from .sse import SSE_HEARTBEAT, sse_event, utf8


@attrs.frozen(kw_only=True)
class StreamDropped:
    """What a reader dropped for slowness is told: the run goes on, ``after``
    is the last ``seq`` it was sent (reattach after it), ``error`` says why."""

    run_id: str
    session_id: str
    after: int
    error: ErrorInfo

    def as_dict(self) -> dict[str, Any]:
        """The native ``stream.dropped`` object."""
        return {
            "type": "stream.dropped",
            "run_id": self.run_id,
            "session_id": self.session_id,
            "after": self.after,
            "error": {"code": self.error.code, "message": self.error.message},
        }


class FrameEncoder(Protocol):
    @property
    def media_type(self) -> str: ...

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        """The frame for ``batch``; after a terminal event it also carries
        whatever closes the stream (``[DONE]``)."""

    def heartbeat(self) -> bytes: ...

    def dropped(self, notice: StreamDropped) -> bytes:
        """The last frame of a reader dropped for slowness (the run goes on)."""


@attrs.frozen
class NativeSseEncoder:
    media_type: str = "text/event-stream"

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        return b"".join(
            sse_event(
                dumps(event_dict(event)), event_id=f"{event.run_id}:{event.seq}", event=event.type
            )
            for event in batch
        )

    def heartbeat(self) -> bytes:
        return SSE_HEARTBEAT

    def dropped(self, notice: StreamDropped) -> bytes:
        # No id: the client's Last-Event-ID stays at the last run event.
        return sse_event(dumps(notice.as_dict()), event="stream.dropped")


@attrs.frozen
class NativeNdjsonEncoder:
    media_type: str = "application/x-ndjson"

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        return utf8("".join(dumps(event_dict(event)) + "\n" for event in batch))

    def heartbeat(self) -> bytes:
        # An empty line: NDJSON readers skip blank lines.
        return b"\n"

    def dropped(self, notice: StreamDropped) -> bytes:
        return utf8(dumps(notice.as_dict()) + "\n")


@attrs.frozen(kw_only=True)
class OpenAIChunkEncoder:
    created: int
    model: str
    include_usage: bool = False
    media_type: str = "text/event-stream"

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        frame = bytearray()
        for event in batch:
            for chunk in openai.chunks_for(
                event, created=self.created, model=self.model, include_usage=self.include_usage
            ):
                frame += sse_event(dumps(chunk))
            if event.terminal:
                frame += sse_event("[DONE]")
        return bytes(frame)

    def heartbeat(self) -> bytes:
        return SSE_HEARTBEAT

    def dropped(self, notice: StreamDropped) -> bytes:
        """A final chunk with ``finish_reason: "error"`` and the error, then
        ``[DONE]``: what the OpenAI clients take for the end of a stream."""
        error = {"code": notice.error.code, "message": notice.error.message}
        final = openai.chunk(
            notice.run_id,
            created=self.created,
            model=self.model,
            delta={},
            finish={"finish_reason": "error", "error": error},
        )
        return sse_event(dumps(final)) + sse_event("[DONE]")
