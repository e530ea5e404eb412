"""``--log-format json`` on the real process: every stderr line is one JSON
object, our lifecycle events and Hypercorn's access log alike, and
``/metrics`` answers in Prometheus text format next to them."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import FAST_REPLY, ServerProcess, running_server
from .wire import CHAT_PATH, auth, chat_body

pytestmark = pytest.mark.integration


class JsonLogServer(ServerProcess):
    """Finds its URL in the JSON ``listening`` event."""

    @classmethod
    def start(cls, *args: str) -> ServerProcess:
        server = cls(args)
        try:
            line = server.wait_for_line_sync(lambda line: '"event": "listening"' in line)
        except BaseException:
            server.stop()
            raise
        server.url = json.loads(line)["url"]
        return server


async def test_json_log_lines_from_the_real_process() -> None:
    with running_server(*FAST_REPLY, "--log-format", "json", kind=JsonLogServer) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            headers = {**auth(), "X-Session-Id": "json-logs"}
            answer = await client.post(CHAT_PATH, headers=headers, json=chat_body("hi"))
            assert answer.status_code == 200
            run_id = answer.headers["X-Run-Id"]
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
        server.stop()
        lines: list[dict[str, Any]] = [json.loads(line) for line in server.lines if line]

    assert all({"ts", "level", "logger", "event", "message"} <= line.keys() for line in lines)
    run_events = [line for line in lines if line.get("run_id") == run_id]
    assert [line["event"] for line in run_events] == ["stream_start", "stream_end"]
    assert run_events[0]["session_id"] == "json-logs"
    assert run_events[1]["status"] == "completed"
    access = [
        line
        for line in lines
        if line["event"] == "http_request" and line["path"] == CHAT_PATH and line["status"]
    ]
    assert len(access) == 1 and access[0]["logger"] == "hypercorn.access"
    assert access[0]["method"] == "POST" and access[0]["status"] == 200
    assert "Bearer" not in json.dumps(lines)
    events = [line["event"] for line in lines if line["logger"] == "server.launcher"]
    assert events[-3:] == ["shutdown_requested", "draining", "drained"]

    families = {family.name: family for family in text_string_to_metric_families(metrics.text)}
    ended = families["stream_server_runs_ended"].samples
    assert any(
        sample.labels == {"status": "completed", "reason": "none"} and sample.value == 1
        for sample in ended
    )
