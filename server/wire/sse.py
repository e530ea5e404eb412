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
