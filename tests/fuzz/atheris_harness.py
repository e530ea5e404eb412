"""Coverage-guided fuzzing (atheris, libFuzzer) of the request parsers and
the wire encoders, by hand; not part of the test suite.

    pip install -e '.[fuzz]'
    python -m tests.fuzz.atheris_harness parsers -runs=200000
    python -m tests.fuzz.atheris_harness encoders -max_total_time=60

Arguments after the target go to libFuzzer (``-runs``, ``-max_total_time``,
a corpus directory...). A crash is an exception other than the parser's
:class:`ApiError`, or a frame that does not read back as it was meant.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

# Only our code: instrumenting trio, quart and cattrs makes start-up minutes long.
with atheris.instrument_imports(include=["server"]):
    from server.core.events import RunDelta
    from server.web.errors import ApiError
    from server.web.requests import SESSION_ID_PATTERN, parse_chat_request, parse_session_id
    from server.wire import NativeNdjsonEncoder, OpenAIChunkEncoder
    from server.wire.sse import SseDecoder, sse_event

SURROGATE = re.compile("[\ud800-\udfff]")


VOCABULARY = [
    *("prompt", "messages", "role", "content", "type", "text", "model", "stream"),
    *("stream_options", "include_usage", "stream_format", "on_disconnect", "on_conflict"),
    *("user", "assistant", "events", "openai", "cancel", "continue", "interrupt", "reject"),
]


def json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    """A JSON value built from the fuzzer's bytes, keys mostly ChatRequest's:
    structure-aware, so the input gets past ``json.loads`` into the parser."""
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(4)
    if kind == 3:
        return fdp.ConsumeUnicode(8)
    if kind in (4, 5):
        return VOCABULARY[fdp.ConsumeIntInRange(0, len(VOCABULARY) - 1)]
    if kind == 6:
        return [json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {
        str(json_value(fdp, depth + 1)): json_value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def fuzz_parsers(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():  # raw bytes, or JSON built from them
        body = fdp.ConsumeBytes(len(data))
    else:
        body = json.dumps(json_value(fdp)).encode()
    try:
        request = parse_chat_request(body)
    except ApiError as error:
        assert error.status in {400, 422}, error.status
    else:
        try:
            request.agent_request()
        except ApiError as error:
            assert error.code == "missing_prompt", error.code
    header = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(140)
    try:
        assert parse_session_id(header) == header
    except ApiError:
        assert not SESSION_ID_PATTERN.fullmatch(header)


def fuzz_encoders(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicode(len(data))
    sent = SURROGATE.sub("\ufffd", text)

    decoder = SseDecoder()
    frames = [decoder.feed(line) for line in re.split("\r\n|\r|\n", sse_event(text).decode())]
    assert [frame for frame in frames if frame] == [("message", re.sub("\r\n|\r", "\n", sent))]

    delta = RunDelta(run_id="r", session_id="s", seq=1, text=text)
    lines = NativeNdjsonEncoder().encode([delta]).decode().split("\n")
    assert lines[-1] == "" and json.loads(lines[0])["text"] == sent

    chunk_frame = OpenAIChunkEncoder(created=0, model=text).encode([delta]).decode()
    chunk = json.loads(chunk_frame.removeprefix("data: ").removesuffix("\n\n"))
    assert chunk["choices"][0]["delta"]["content"] == sent and chunk["model"] == sent


TARGETS: dict[str, Callable[[bytes], None]] = {
    "parsers": fuzz_parsers,
    "encoders": fuzz_encoders,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        targets = ",".join(TARGETS)
        sys.exit(f"usage: python -m tests.fuzz.atheris_harness {{{targets}}} [libFuzzer args]")
    target = TARGETS[sys.argv[1]]
    args = [sys.argv[0], *sys.argv[2:]]
    if not any(arg.startswith("-dict=") for arg in args):
        # JSON and ChatRequest tokens, so random bytes reach past json.loads.
        args.append(f"-dict={Path(__file__).with_name('chat_request.dict')}")
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
