"""Server-sent events framing (WHATWG HTML, "server-sent events")."""

from __future__ import annotations

import re

# A comment line: keeps proxies and clients from timing out, ignored by every
# SSE parser (the OpenAI clients included).
SSE_HEARTBEAT = b": ping\n\n"


# SSE ends a line at CRLF, LF or CR alike.
_LINE_BREAK = re.compile("\r\n|\r|\n")
# A surrogate code point in a ``str`` is an unpaired one, which UTF-8 cannot
# carry; an agent's text may still hold one (an upstream's "\ud800" escape).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, an unpaired surrogate replaced by U+FFFD instead of
    failing the whole frame."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return LONE_SURROGATE.sub("\ufffd", text).encode()


def sse_event(data: str, *, event_id: str | None = None, event: str | None = None) -> bytes:
    """One event. A line break in ``data`` (CR, LF or CRLF) would end the
    field, so ``data`` goes over several data lines, which the client joins
    back with LF: every line break arrives as LF. ``event_id`` and ``event``
    are the caller's names and hold no line break."""
    lines: list[str] = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in _LINE_BREAK.split(data))
    return utf8("\n".join(lines) + "\n\n")


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
