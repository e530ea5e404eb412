"""``GET /v1/sessions/{sid}`` with a run store (issue 11, finding 7): runs
in memory first, then stored ones; a failing store costs nothing that memory
can answer. In process, with a stand-in store (no threads under MockClock)."""

from __future__ import annotations

import attrs
import trio
import trio.testing

from server.core.events import RunStatus
from server.store import RunRecord, StoreReadError
from server.web.auth import principal_of
from server.web.state import app_state
from tests.unit.test_http import AUTH, serving
from tests.unit.test_runs_api import finished_run


@attrs.define
class StandInStore:
    records: list[RunRecord] = attrs.field(factory=list)
    failing: bool = False

    async def recent_for_session(
        self, principal: str, session_id: str, limit: int = 20
    ) -> list[RunRecord]:
        await trio.lowlevel.checkpoint()
        if self.failing:
            raise StoreReadError("recent_for_session")
        mine = [r for r in self.records if (r.principal, r.session_id) == (principal, session_id)]
        return sorted(mine, key=lambda r: r.created_at, reverse=True)[:limit]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def stored(run_id: str, created_at: float, principal: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        principal=principal,
        session_id="s1",
        prompt=None,
        agent="scripted",
        status=RunStatus.COMPLETED,
        created_at=created_at,
        finished_at=created_at + 1,
        text=f"answer of {run_id}",
    )


async def test_stored_runs_follow_the_ones_in_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.1, reply_words=3) as app:
        me = principal_of("devkey")
        store = StandInStore([stored("old-1", 1.0, me), stored("old-2", 2.0, me)])
        app_state(app).store = store  # type: ignore[assignment]
        client = app.test_client()
        only_stored = await (await client.get("/v1/sessions/s1", headers=AUTH)).get_json()
        new = await finished_run(app, "three")
        merged = await (await client.get("/v1/sessions/s1", headers=AUTH)).get_json()

    assert only_stored["current_run"] == {"id": "old-2", "status": "completed"}
    assert [run["id"] for run in only_stored["recent_runs"]] == ["old-2", "old-1"]
    assert only_stored["recent_runs"][0]["text"] == "answer of old-2"
    assert merged["current_run"]["id"] == new
    assert [run["id"] for run in merged["recent_runs"]] == [new, "old-2", "old-1"]


async def test_a_failing_store_is_503_only_when_memory_has_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.1, reply_words=3) as app:
        app_state(app).store = StandInStore(failing=True)  # type: ignore[assignment]
        run_id = await finished_run(app)
        client = app.test_client()
        known = await client.get("/v1/sessions/s1", headers=AUTH)
        unknown = await client.get("/v1/sessions/other", headers=AUTH)
        assert known.status_code == 200
        assert [run["id"] for run in (await known.get_json())["recent_runs"]] == [run_id]
        assert unknown.status_code == 503 and unknown.headers["Retry-After"] == "1"
        assert (await unknown.get_json())["error"]["code"] == "store_read_failed"
