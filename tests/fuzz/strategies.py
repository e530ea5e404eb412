"""Hypothesis strategies shared by the fuzz tests: JSON values, chat request
bodies near the valid ones, and the run events the wire encoders take."""

from __future__ import annotations

import itertools
import string
from typing import Any

from hypothesis import strategies as st

from server.core.events import (
    CancelReason,
    ErrorInfo,
    RunCancelled,
    RunCompleted,
    RunDelta,
    RunEvent,
    RunFailed,
    RunInterrupted,
    RunMessage,
    RunStarted,
    TerminalEvent,
    Usage,
)

# Any text, unpaired surrogates included: what a JSON "\ud800" escape (from
# a client or an upstream) decodes to.
# Line breaks and surrogates drawn often, as they are the characters framing
# gets wrong.
any_text = st.text(
    st.characters(exclude_categories=()) | st.sampled_from("\r\n\ud800\udfff\u2028\x00"),
    max_size=20,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"])},
        optional={
            "content": st.none()
            | texts
            | st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url"])}, optional={"text": texts}
                ),
                max_size=3,
            )
        },
    ),
    max_size=4,
)
# Bodies ChatRequest accepts, every field optional.
valid_chat_requests = st.fixed_dictionaries(
    {},
    optional={
        "messages": st.none() | valid_messages,
        "prompt": st.none() | texts,
        "model": st.none() | texts,
        "stream": st.booleans(),
        "stream_options": st.none()
        | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "stream_format": st.sampled_from([None, "openai", "events"]),
        "on_disconnect": st.sampled_from(["cancel", "continue"]),
        "on_conflict": st.sampled_from(["interrupt", "reject", "enqueue", "rollback"]),
    },
)
PATHS_INTO_BODY = [
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "content", 0),
    ("messages", 0, "content", 0, "type"),
    ("messages", 0, "content", 0, "text"),
    ("prompt",),
    ("model",),
    ("stream",),
    ("stream_options",),
    ("stream_options", "include_usage"),
    ("stream_format",),
    ("on_disconnect",),
    ("on_conflict",),
    ("unknown",),
]


def replace_at(body: Any, path: tuple[str | int, ...], value: Any) -> Any:
    """``body`` with the value at ``path`` replaced (when the path exists)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(body, dict) and isinstance(key, str) and (key in body or not rest):
        return {**body, key: replace_at(body.get(key), rest, value)}
    if isinstance(body, list) and isinstance(key, int) and key < len(body):
        return [*body[:key], replace_at(body[key], rest, value), *body[key + 1 :]]
    return body


# One of each JSON type: the likely mistakes.
LIKELY_MISTAKES = [None, True, 0, 1.5, "", "x", [], {}, [None], {"": None}]
_replacements = st.sampled_from(LIKELY_MISTAKES) | json_values


@st.composite
def chat_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one or two values (at any depth) replaced by arbitrary
    JSON, and unknown fields: mostly one mistake away from valid."""
    body: dict[str, Any] = draw(valid_chat_requests)
    for _ in range(draw(st.integers(0, 2))):
        body = replace_at(body, draw(st.sampled_from(PATHS_INTO_BODY)), draw(_replacements))
    extra = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))
    return {**extra, **body}


# --- run events --------------------------------------------------------------

ids = st.text(string.ascii_letters + string.digits + "_-.:", min_size=1, max_size=12)
usages = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10**6),
    completion_tokens=st.integers(0, 10**6),
)
errors = st.builds(
    ErrorInfo, code=st.text(string.ascii_lowercase + "_", min_size=1), message=any_text
)


def terminals(run_id: str, session_id: str, seq: int) -> st.SearchStrategy[TerminalEvent]:
    common = {"run_id": st.just(run_id), "session_id": st.just(session_id), "seq": st.just(seq)}
    details = st.none() | errors
    return st.one_of(
        st.builds(
            RunCompleted,
            **common,
            usage=st.none() | usages,
            finish_reason=st.sampled_from(["stop", "length"]),
            error_details=details,
        ),
        st.builds(
            RunCancelled, **common, reason=st.sampled_from(CancelReason), error_details=details
        ),
        st.builds(
            RunInterrupted, **common, reason=st.sampled_from(CancelReason), error_details=details
        ),
        st.builds(RunFailed, **common, error=errors, error_details=details),
    )


@st.composite
def runs(draw: st.DrawFn, text: st.SearchStrategy[str] = any_text) -> list[RunEvent]:
    """One run's events as published: started, deltas, maybe the full
    message, exactly one terminal; seq 0, 1, 2, ..."""
    run_id, session_id = draw(ids), draw(ids)
    deltas = draw(st.lists(text, max_size=5))
    events: list[RunEvent] = [RunStarted(run_id=run_id, session_id=session_id, seq=0)]
    events += [
        RunDelta(run_id=run_id, session_id=session_id, seq=seq, text=delta)
        for seq, delta in enumerate(deltas, start=1)
    ]
    if draw(st.booleans()):
        full = "".join(deltas)
        events.append(RunMessage(run_id=run_id, session_id=session_id, seq=len(events), text=full))
    events.append(draw(terminals(run_id, session_id, len(events))))
    return events


@st.composite
def batches(draw: st.DrawFn, events: list[RunEvent]) -> list[list[RunEvent]]:
    """``events`` cut into the batches a subscriber might take."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(events) - 1)), max_size=len(events))))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds) if a < b]
