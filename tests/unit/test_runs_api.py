"""The runs API in process (Quart-Trio test client, MockClock): inspect,
reattach, stop, sessions, retention, and on_disconnect=continue."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from server.core import CancelReason
from server.web.auth import principal_of
from server.web.state import app_state
from tests.unit.test_http import AUTH, PATH, hang_up, open_stream, read_frames, serving

OTHER = {"Authorization": "Bearer k2"}
KEYS = ("devkey", "k2")


def ndjson_events(frames: list[tuple[float, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(line) for _, data in frames for line in data.decode().splitlines() if line]


async def finished_run(app: Any, prompt: str = "hello", session: str = "s1") -> str:
    response = await app.test_client().post(
        PATH, headers={**AUTH, "X-Session-Id": session}, json={"prompt": prompt}
    )
    assert response.status_code == 200
    return str(response.headers["X-Run-Id"])


async def test_record_is_owner_only(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(api_keys=KEYS, token_delay=0.1, reply_words=4) as app:
        run_id = await finished_run(app)
        client = app.test_client()
        mine = await client.get(f"/v1/runs/{run_id}", headers=AUTH)
        assert mine.status_code == 200
        record = await mine.get_json()
        assert record["status"] == "completed" and len(record["text"].split()) == 4
        for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events"):
            theirs = await client.get(path, headers=OTHER)
            assert theirs.status_code == 404
        stop = await client.post(f"/v1/runs/{run_id}/cancel", headers=OTHER)
        assert stop.status_code == 404
        unknown = await client.get("/v1/runs/run_nope", headers=AUTH)
        assert (await unknown.get_json())["error"]["code"] == "run_not_found"


async def test_reattach_from_every_seq_of_a_finished_run_gives_the_same_suffix(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.1, reply_words=5, coalesce_ms=0) as app:
        run_id = await finished_run(app)
        headers = {**AUTH, "Accept": "application/x-ndjson"}
        full = None
        for after in range(-1, 9):
            async with app.test_client().request(
                f"/v1/runs/{run_id}/events",
                method="GET",
                headers={**headers, "Last-Event-ID": f"{run_id}:{after}"}
                if after >= 0
                else headers,
            ) as connection:
                await connection.send_complete()
                events = ndjson_events(await read_frames(connection))
            if full is None:
                full = events
                assert [event["seq"] for event in full] == list(range(len(full)))
            assert events == full[after + 1 :]


async def test_live_reattach_sees_every_later_event_exactly_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=6, coalesce_ms=0) as app:
        async with open_stream(
            app, {"prompt": "hi"}, {"Accept": "application/x-ndjson", "X-Session-Id": "s1"}
        ) as first:
            await trio.sleep(2.5)
            run = app_state(app).manager.find_session(principal_of("devkey"), "s1").current  # type: ignore[union-attr]
            async with app.test_client().request(
                f"/v1/runs/{run.run_id}/events?after=1",
                method="GET",
                headers={**AUTH, "Accept": "application/x-ndjson"},
            ) as second:
                await second.send_complete()
                original = ndjson_events(await read_frames(first))
                reattached = ndjson_events(await read_frames(second))
    assert [event["seq"] for event in reattached] == list(range(2, len(original)))
    assert reattached == original[2:]
    assert original[-1]["type"] == "run.completed"


async def test_stop_endpoint_is_client_stop_distinct_from_disconnect_and_idempotent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=50) as app:
        async with open_stream(
            app, {"prompt": "hi"}, {"Accept": "application/x-ndjson", "X-Session-Id": "s1"}
        ) as stream:
            await trio.sleep(2.5)
            run = app_state(app).manager.find_session(principal_of("devkey"), "s1").current  # type: ignore[union-attr]
            client = app.test_client()
            stopped = await client.post(f"/v1/runs/{run.run_id}/cancel", headers=AUTH)
            again = await client.post(f"/v1/runs/{run.run_id}/cancel", headers=AUTH)
            events = ndjson_events(await read_frames(stream))
    assert (await stopped.get_json())["status"] == "cancelled"
    assert (await stopped.get_json())["cancel_reason"] == "client_stop"
    assert (await again.get_json()) == (await stopped.get_json())
    assert events[-1]["type"] == "run.cancelled" and events[-1]["reason"] == "client_stop"


async def test_on_disconnect_continue_finishes_and_can_be_reattached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=5, coalesce_ms=0) as app:
        body = {"prompt": "hi", "stream": True, "on_disconnect": "continue"}
        async with open_stream(app, body, {"X-Session-Id": "s1"}) as connection:
            await connection.receive()
            run = app_state(app).manager.find_session(principal_of("devkey"), "s1").current  # type: ignore[union-attr]
            await hang_up(connection)
        await run.wait_ended()
        assert run.status.value == "completed"
        async with app.test_client().request(
            f"/v1/runs/{run.run_id}/events",
            method="GET",
            headers={**AUTH, "Accept": "application/x-ndjson"},
        ) as connection:
            await connection.send_complete()
            events = ndjson_events(await read_frames(connection))
    assert [event["seq"] for event in events] == list(range(len(events)))
    assert events[-1]["type"] == "run.completed"


async def test_session_shows_current_and_recent_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.1, reply_words=3) as app:
        first = await finished_run(app, "one")
        second = await finished_run(app, "two")
        client = app.test_client()
        session = await (await client.get("/v1/sessions/s1", headers=AUTH)).get_json()
        assert session["current_run"] == {"id": second, "status": "completed"}
        assert [run["id"] for run in session["recent_runs"]] == [second, first]
        missing = await client.get("/v1/sessions/nope", headers=AUTH)
        assert missing.status_code == 404


async def test_reattach_past_retention_is_410(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(token_delay=0.1, reply_words=3, retain_runs=1) as app:
        old = await finished_run(app, "one", session="a")
        await finished_run(app, "two", session="b")
        client = app.test_client()
        gone = await client.get(f"/v1/runs/{old}/events", headers=AUTH)
        assert gone.status_code == 410
        assert (await gone.get_json())["error"]["code"] == "run_gone"


@pytest.mark.parametrize(
    "limit",
    [{"retain_runs": 1}, {"retain_bytes": 2500}, {"retain_seconds": 5}],
    ids=["count", "bytes", "age"],
)
async def test_retention_by_count_bytes_and_age(
    autojump_clock: trio.testing.MockClock, limit: dict[str, float]
) -> None:
    async with serving(token_delay=0.1, reply_words=4, **limit) as app:
        old = await finished_run(app, "one", session="a")
        await trio.sleep(10)
        # About 2.3 kB of log: with the old one, past the byte limit.
        new = await finished_run(app, "two " + "x" * 1500, session="b")
        client = app.test_client()
        gone = await client.get(f"/v1/runs/{old}/events", headers=AUTH)
        assert gone.status_code == 410
        kept = await client.get(f"/v1/runs/{new}", headers=AUTH)
        assert kept.status_code == 200


async def test_reattach_after_a_seq_not_yet_published_is_a_400(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=1.0, reply_words=50) as app:
        async with open_stream(
            app, {"prompt": "hi", "stream": True}, {"X-Session-Id": "s1"}
        ) as stream:
            await stream.receive()
            run = app_state(app).manager.find_session(principal_of("devkey"), "s1").current  # type: ignore[union-attr]
            client = app.test_client()
            for query in ("after=100", "after=--5", "after=%C2%B2", "after=1.5"):
                response = await client.get(f"/v1/runs/{run.run_id}/events?{query}", headers=AUTH)
                assert response.status_code == 400, query
                assert (await response.get_json())["error"]["code"] == "invalid_after"
            run.cancel(CancelReason.CLIENT_STOP)
            await read_frames(stream)


async def test_stopping_a_run_past_retention_is_410_not_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(token_delay=0.1, reply_words=3, retain_runs=0) as app:
        old = await finished_run(app)
        client = app.test_client()
        assert (await client.post(f"/v1/runs/{old}/cancel", headers=AUTH)).status_code == 410
        assert (await client.get(f"/v1/runs/{old}", headers=AUTH)).status_code == 410


@pytest.mark.parametrize(
    ("header", "status"),
    [("run_other:3", 400), ("garbage", 400)],
)
async def test_bad_last_event_id_is_a_400(
    autojump_clock: trio.testing.MockClock, header: str, status: int
) -> None:
    async with serving(token_delay=0.1, reply_words=3) as app:
        run_id = await finished_run(app)
        response = await app.test_client().get(
            f"/v1/runs/{run_id}/events", headers={**AUTH, "Last-Event-ID": header}
        )
        assert response.status_code == status
