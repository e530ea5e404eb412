"""Issue 11, finding 7: ``GET /v1/sessions/{sid}`` after a restart.

The session's runs are in the store (same data directory) but no longer in
memory: the session is answered from the store, newest first, in the same
shape; a run made after the restart comes first; another key still gets 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest

from .harness import FAST_REPLY, running_server
from .wire import CHAT_PATH, auth

pytestmark = pytest.mark.integration

KEYS = ("--api-key", "k1", "--api-key", "k2")


async def complete(client: httpx2.AsyncClient, prompt: str, session_id: str) -> str:
    response = await client.post(
        CHAT_PATH, json={"prompt": prompt}, headers={**auth("k1"), "X-Session-Id": session_id}
    )
    assert response.status_code == 200, response.text
    run_id: str = response.headers["x-run-id"]
    return run_id


async def get_session(client: httpx2.AsyncClient, session_id: str, key: str) -> httpx2.Response:
    return await client.get(f"/v1/sessions/{session_id}", headers=auth(key))


async def test_a_session_is_answered_from_the_store_after_a_restart(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path), *FAST_REPLY, *KEYS)
    with running_server(*data) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            first = await complete(client, "one", "s1")
            second = await complete(client, "two", "s1")
            before: dict[str, Any] = (await get_session(client, "s1", "k1")).json()
        assert server.stop() == 0

    with running_server(*data) as restarted:
        async with httpx2.AsyncClient(base_url=restarted.url, timeout=30.0) as client:
            after = await get_session(client, "s1", "k1")
            theirs = await get_session(client, "s1", "k2")
            unknown = await get_session(client, "nope", "k1")
            third = await complete(client, "three", "s1")
            with_new = (await get_session(client, "s1", "k1")).json()

    assert after.status_code == 200, after.text
    body = after.json()
    assert body["current_run"] == {"id": second, "status": "completed"}
    assert [run["id"] for run in body["recent_runs"]] == [second, first]
    # The same shape as before the restart (the event count is not stored).
    assert [set(run) for run in body["recent_runs"]] == [set(run) for run in before["recent_runs"]]
    for run, was in zip(body["recent_runs"], before["recent_runs"], strict=True):
        for key in ("status", "text", "usage", "cancel_reason", "error"):
            assert run[key] == was[key], key
        assert run["finished_at"] is not None
    assert theirs.status_code == 404 and unknown.status_code == 404
    assert theirs.json()["error"]["code"] == "session_not_found"
    assert with_new["current_run"]["id"] == third
    assert [run["id"] for run in with_new["recent_runs"]] == [third, second, first]
