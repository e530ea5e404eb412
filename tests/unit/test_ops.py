"""Health, readiness and the task tree."""

from __future__ import annotations

import re
from pathlib import Path

import trio
import trio.testing

from server.cli import build_parser
from server.web.auth import principal_of
from server.web.state import app_state
from tests.unit.test_http import AUTH, PATH, hang_up, open_stream, serving


async def test_health_and_readiness_follow_draining(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as app:
        client = app.test_client()
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        manager = app_state(app).manager
        assert manager is not None
        await manager.drain(grace_period=0)
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.headers["Retry-After"]
        assert (await not_ready.get_json())["error"]["code"] == "draining"
        assert (await client.get("/healthz")).status_code == 200


async def test_debug_tasks_is_off_without_an_admin_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as app:
        assert (await app.test_client().get("/debug/tasks", headers=AUTH)).status_code == 404


async def test_debug_tasks_accepts_only_the_bearer_scheme(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 11, finding 7: ``Basic <admin key>`` (any scheme) was accepted."""
    async with serving(admin_key="admin-secret") as app:
        client = app.test_client()
        for refused in ("Basic admin-secret", "Token admin-secret", "admin-secret", "Bearer"):
            response = await client.get("/debug/tasks", headers={"Authorization": refused})
            assert response.status_code == 401, refused
            assert (await response.get_json())["error"]["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        for accepted in ("Bearer admin-secret", "bearer admin-secret", "BEARER  admin-secret "):
            response = await client.get("/debug/tasks", headers={"Authorization": accepted})
            assert response.status_code == 200, accepted


async def test_debug_tasks_shows_the_tree_and_returns_to_baseline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admin = {"Authorization": "Bearer admin-secret"}
    async with serving(admin_key="admin-secret", token_delay=0.1, reply_words=3) as app:
        client = app.test_client()
        assert (await client.get("/debug/tasks", headers=AUTH)).status_code == 401
        before = await (await client.get("/debug/tasks", headers=admin)).get_json()
        for index in range(5):
            response = await client.post(PATH, headers=AUTH, json={"prompt": f"p{index}"})
            assert response.status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        after = await (await client.get("/debug/tasks", headers=admin)).get_json()
        assert after["live_runs"] == 0 and after["sessions"] == []
        assert after["tasks"] == before["tasks"]
        assert after["task_tree"]["children"]


async def test_debug_tasks_shows_each_sessions_run_state(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admin = {"Authorization": "Bearer admin-secret"}
    async with serving(admin_key="admin-secret", token_delay=1.0, reply_words=10) as app:
        client = app.test_client()
        async with open_stream(
            app, {"prompt": "A", "stream": True}, {"X-Session-Id": "s1"}
        ) as connection:
            await trio.sleep(3.5)
            live = await (await client.get("/debug/tasks", headers=admin)).get_json()
            await hang_up(connection)
        assert live["live_runs"] == 1 and live["draining"] is False
        [session] = live["sessions"]
        assert session["session_id"] == "s1" and session["principal"] == principal_of("devkey")
        assert session["waiting_submissions"] == 0
        run = session["current_run"]
        assert run["state"] == "running" and run["status"] == "running"
        assert run["subscribers"] == 1 and run["cancel_reason"] is None
        assert run["running_s"] == 3.5 and run["since_last_delta_s"] == 0.5
        assert run["events"] >= 2  # run.started and at least one delta
        # The reader went away: the run is cancelled and ends.
        await trio.testing.wait_all_tasks_blocked()
        ended = await (await client.get("/debug/tasks", headers=admin)).get_json()
        run = ended["sessions"][0]["current_run"]
        assert run["state"] == "ended" and run["status"] == "cancelled"
        assert run["cancel_reason"] == "client_disconnect" and run["subscribers"] == 0


# --- docs/operations.md ------------------------------------------------------

OPERATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TABLE_START = "<!-- configuration table: generated from server/cli.py -->"
TABLE_END = "<!-- end of configuration table -->"


def configuration_table() -> str:
    """The configuration reference as docs/operations.md holds it: one row
    per flag, from the CLI parser itself (defaults with no environment)."""
    rows = ["| Flag | Environment variable | Default | Meaning |", "|---|---|---|---|"]
    for action in build_parser({})._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        help_text = action.help or ""
        env = re.search(r"env (STREAM_SERVER_\w+)", help_text)
        assert env is not None, f"{flag} names no environment variable"
        meaning = re.sub(r" \(default: %\(default\)s; env \w+\)", "", help_text)
        meaning = re.sub(r"\(env \w+, ", "(", meaning)
        default = "(none)" if action.default is None else f"`{action.default!r}`"
        rows.append(f"| `{flag}` | `{env[1]}` | {default} | {meaning} |")
    return "\n".join(rows)


def test_operations_doc_lists_every_flag_with_its_default() -> None:
    text = OPERATIONS_DOC.read_text()
    table = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip()
    expected = configuration_table()
    assert table == expected, (
        "docs/operations.md's configuration table is out of date; replace it with:\n" + expected
    )


if __name__ == "__main__":  # python -m tests.unit.test_ops: the table to paste
    print(configuration_table())
