"""Frame encoders: a batch of run events in, the bytes of one write out.

A subscriber that wakes takes every pending event and writes them as one
frame, so each encoder turns a whole batch into one ``bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

from ..core.events import RunEvent
from . import openai
from .native import dumps, event_dict
from .sse import SSE_HEARTBEAT, sse_event, utf8


class FrameEncoder(Protocol):
    @property
    def media_type(self) -> str: ...

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        """The frame for ``batch``; after a terminal event it also carries
        whatever closes the stream (``[DONE]``)."""

    def heartbeat(self) -> bytes: ...


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


@attrs.frozen
class NativeNdjsonEncoder:
    media_type: str = "application/x-ndjson"

    def encode(self, batch: Sequence[RunEvent]) -> bytes:
        return utf8("".join(dumps(event_dict(event)) + "\n" for event in batch))

    def heartbeat(self) -> bytes:
        # An empty line: NDJSON readers skip blank lines.
        return b"\n"


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
