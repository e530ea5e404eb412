"""Server-sent events framing (WHATWG HTML, "server-sent events")."""

from __future__ import annotations

# A comment line: keeps proxies and clients from timing out, ignored by every
# SSE parser (the OpenAI clients included).
SSE_HEARTBEAT = b": ping\n\n"


def sse_event(data: str, *, event_id: str | None = None, event: str | None = None) -> bytes:
    lines: list[str] = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    # A newline inside data would end the field: split it over data lines,
    # which the client joins back with "\n".
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class SseDecoder:
    """Incremental SSE parser: feed it lines, get ``(event, data)`` for each
    complete event. Comment lines (heartbeats) and ``id``/``retry`` fields
    are skipped; multi-line data is joined with ``"\\n"``."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            complete = (self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return complete
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
