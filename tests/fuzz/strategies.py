"""Hypothesis strategies shared by the fuzz tests: JSON values, chat request
bodies near the valid ones, and the run events the wire encoders take."""

from __future__ import annotations

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


def objects(keys: list[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose keys are mostly the expected ones."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=3), values, max_size=4)


_parts = objects(["type", "text"], st.sampled_from(["text", "image_url"]) | json_values)
_content = st.text(max_size=10) | st.lists(_parts, max_size=2) | json_values
_messages = st.lists(
    objects(["role", "content"], st.sampled_from(["user", "assistant"]) | _content), max_size=3
)

# Every field of ChatRequest, each with well-typed and ill-typed values.
CHAT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "messages": _messages | json_values,
    "prompt": st.text(max_size=10) | json_values,
    "model": st.text(max_size=10) | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": objects(["include_usage"], st.booleans() | json_values) | json_values,
    "stream_format": st.sampled_from(["openai", "events", "sse"]) | json_values,
    "on_disconnect": st.sampled_from(["cancel", "continue", "stay"]) | json_values,
    "on_conflict": st.sampled_from(["interrupt", "reject", "enqueue", "rollback", "x"])
    | json_values,
}

chat_bodies = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries({}, optional=CHAT_FIELDS),
    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)


# --- run events --------------------------------------------------------------

ids = st.text(string.ascii_letters + string.digits + "_-.:", min_size=1, max_size=12)
usages = st.builds(
    Usage,
    prompt_tokens=st.integers(0, 10**6),
    completion_tokens=st.integers(0, 10**6),
)
errors = st.builds(ErrorInfo, code=st.text(string.ascii_lowercase + "_", min_size=1), message=any_text)


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
    return [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]
