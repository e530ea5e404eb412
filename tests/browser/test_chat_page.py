"""The chat page in headless Chromium against the real server (scripted
agent, paced so a run lasts ~2 s).

Every wait is on page state (Playwright's ``expect`` retries until the
condition holds or its timeout) or on the server's state, never a sleep.
The expected text is the scripted agent's, computed here, and checked
against the run's record from the runs API: the page shows each run's text
exactly, nothing of another run's, nothing twice.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest

from server.agents.scripted import scripted_words
from tests.integration.harness import running_server

from .conftest import DESKTOP, DEV_KEY, REPLY_WORDS, SERVER_ARGS, opened_page
from .proxy import SeverableProxy

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

# Words on screen before the test acts on a streaming answer.
SHOWN_WORDS = 4
FIRST_WORDS = re.compile(rf"^(?:\S+\s+){{{SHOWN_WORDS}}}")
SERVER_WAIT = 10.0


def expected_text(prompt: str) -> str:
    return " ".join(scripted_words(prompt, REPLY_WORDS))


def expect(target: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def answers(page: Page) -> Locator:
    return page.locator("ol.messages:not([hidden]) li.assistant")


def text_of(answer: Locator) -> str:
    return answer.locator(".text").inner_text()


def send(page: Page, prompt: str, *, key: str = DEV_KEY) -> None:
    if page.input_value("#api-key") != key:
        page.fill("#api-key", key)
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_streaming(answer: Locator) -> None:
    """Until the answer is streaming and shows its first words."""
    expect(answer).to_have_attribute("data-status", "streaming")
    expect(answer.locator(".text")).to_have_text(FIRST_WORDS)


def run_record(api: httpx2.Client, answer: Locator) -> dict[str, Any]:
    run_id = answer.get_attribute("data-run-id")
    assert run_id, "the answer has no run id"
    response = api.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


def shot(page: Page, artifacts_dir: Path, name: str) -> None:
    page.screenshot(path=str(artifacts_dir / f"{name}.png"), full_page=True)


def test_prompt_streams_and_completes(page: Page, api: httpx2.Client, artifacts_dir: Path) -> None:
    prompt = "Tell me about structured concurrency"
    send(page, prompt)
    answer = answers(page).first
    wait_streaming(answer)
    expect(page.locator("#stop")).to_be_enabled()
    expect(answer).to_have_attribute("aria-busy", "true")
    shot(page, artifacts_dir, "01-streaming")

    expect(answer).to_have_attribute("data-status", "completed")
    expect(answer.locator(".status")).to_have_text("completed")
    expect(answer).to_have_attribute("aria-busy", "false")
    expect(page.locator("#stop")).to_be_disabled()
    assert text_of(answer) == expected_text(prompt)
    # The deltas the page showed add up to the run's own full message.
    assert answer.get_attribute("data-verified") == "true"
    record = run_record(api, answer)
    assert record["status"] == "completed"
    assert record["text"] == text_of(answer)
    shot(page, artifacts_dir, "02-completed")


def test_second_prompt_supersedes_the_first_and_keeps_its_partial_text(
    page: Page, api: httpx2.Client, artifacts_dir: Path
) -> None:
    first_prompt = "alpha bravo charlie"
    second_prompt = "xray yankee zulu"
    send(page, first_prompt)
    first = answers(page).nth(0)
    wait_streaming(first)

    send(page, second_prompt)
    second = answers(page).nth(1)
    expect(first).to_have_attribute("data-status", "superseded")
    expect(first.locator(".status")).to_have_text("cancelled — superseded by a newer prompt")
    wait_streaming(second)
    shot(page, artifacts_dir, "03-superseded-while-second-streams")
    expect(second).to_have_attribute("data-status", "completed")

    first_text, second_text = text_of(first), text_of(second)
    # The first keeps what it had streamed: a strict prefix of its reply,
    # exactly what its run produced before the supersede.
    assert first_text.startswith("You said: alpha bravo charlie")
    assert expected_text(first_prompt).startswith(first_text)
    assert first_text != expected_text(first_prompt)
    first_record = run_record(api, first)
    assert (first_record["status"], first_record["cancel_reason"]) == ("cancelled", "superseded")
    assert first_record["text"] == first_text
    # The second is its own run's text and nothing else: none of the first
    # run's frames landed in it.
    assert second_text == expected_text(second_prompt)
    assert not {"alpha", "bravo", "charlie"} & set(second_text.split())
    assert run_record(api, second)["text"] == second_text
    assert first.get_attribute("data-run-id") != second.get_attribute("data-run-id")
    shot(page, artifacts_dir, "04-superseded-then-completed")


def test_stop_button_stops_the_run(page: Page, api: httpx2.Client, artifacts_dir: Path) -> None:
    prompt = "Stop me halfway"
    send(page, prompt)
    answer = answers(page).first
    wait_streaming(answer)
    page.click("#stop")

    expect(answer).to_have_attribute("data-status", "stopped")
    expect(answer.locator(".status")).to_have_text("cancelled — stopped")
    expect(page.locator("#stop")).to_be_disabled()
    record = run_record(api, answer)
    assert (record["status"], record["cancel_reason"]) == ("cancelled", "client_stop")
    assert record["text"] == text_of(answer)
    assert expected_text(prompt).startswith(text_of(answer))
    assert text_of(answer) != expected_text(prompt)
    shot(page, artifacts_dir, "05-stopped")


def wait_for_run_progress(api: httpx2.Client, run_id: str, beyond_events: int) -> dict[str, Any]:
    """Until the run (on the server) has more than ``beyond_events`` events.
    Polls: the state lives in another process."""
    deadline = time.monotonic() + SERVER_WAIT
    while True:
        record: dict[str, Any] = api.get(f"/v1/runs/{run_id}").json()
        if record["events"] > beyond_events or record["status"] != "running":
            return record
        assert time.monotonic() < deadline, f"the run made no progress: {record}"
        time.sleep(0.05)


def test_dropped_connection_reattaches_without_gap_or_repeat(
    page: Page, proxy: SeverableProxy, api: httpx2.Client, artifacts_dir: Path
) -> None:
    prompt = "Keep going when my connection drops"
    send(page, prompt)
    answer = answers(page).first
    wait_streaming(answer)

    proxy.sever()  # the page's stream dies; new connections are refused
    expect(answer).to_have_attribute("data-status", "reconnecting")
    seen_seq = int(answer.get_attribute("data-seq") or "-1")
    run_id = answer.get_attribute("data-run-id")
    assert run_id
    # The run goes on without the page (on_disconnect=continue) and
    # publishes events the page has not seen...
    record = wait_for_run_progress(api, run_id, beyond_events=seen_seq + 1 + 5)
    assert record["status"] == "running", record
    shot(page, artifacts_dir, "06-reconnecting")

    proxy.restore()  # ...which the reattach (Last-Event-ID) replays
    expect(answer).to_have_attribute("data-status", "completed")
    final = run_record(api, answer)
    assert final["status"] == "completed"
    assert text_of(answer) == final["text"] == expected_text(prompt)
    assert answer.get_attribute("data-verified") == "true"
    assert answer.get_attribute("data-seq") == str(final["events"] - 1)
    shot(page, artifacts_dir, "07-reattached-and-completed")


def test_wrong_api_key_shows_a_clear_error(page: Page, artifacts_dir: Path) -> None:
    send(page, "Let me in", key="not-the-key")
    answer = answers(page).first
    expect(answer).to_have_attribute("data-status", "failed")
    expect(answer.locator(".status")).to_have_text("failed — the API key was refused")
    alert = page.locator("#alert")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("The server refused the API key (401 unauthorized)")
    expect(alert).to_contain_text("The API key is not valid.")
    expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
    shot(page, artifacts_dir, "08-wrong-api-key")

    # Fixing the key clears the error, and the next prompt goes through;
    # the key is kept for the next visit.
    send(page, "Let me in", key=DEV_KEY)
    expect(alert).to_be_hidden()
    wait_streaming(answers(page).nth(1))
    assert page.evaluate("localStorage.getItem('tss.apiKey')") == DEV_KEY


def test_phone_width_keyboard_send_and_escape_stop(
    phone_page: Page, api: httpx2.Client, artifacts_dir: Path
) -> None:
    page = phone_page
    send(page, "Small screens too")  # Enter sends
    answer = answers(page).first
    wait_streaming(answer)
    page.keyboard.press("Escape")
    expect(answer).to_have_attribute("data-status", "stopped")
    assert run_record(api, answer)["cancel_reason"] == "client_stop"
    # Nothing wider than the screen: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, artifacts_dir, "09-phone-width")


def test_frames_of_another_run_or_seen_before_never_land_in_an_answer(page: Page) -> None:
    """The page's own guard. The server never mixes runs on one stream, so
    this is the one test with a stubbed response: a stale frame of an
    earlier run and a repeated frame in the middle of an answer's stream."""

    def frame(run_id: str, seq: int, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "run_id": run_id, "session_id": "s", "seq": seq, **fields}

    frames = [
        frame("run-new", 0, "run.started"),
        frame("run-old", 7, "run.delta", text=" STALE"),
        frame("run-new", 1, "run.delta", text="fresh"),
        frame("run-new", 1, "run.delta", text="fresh"),
        frame("run-new", 2, "run.delta", text=" words"),
        frame("run-old", 8, "run.cancelled", reason="superseded"),
        frame("run-new", 3, "run.message", text="fresh words"),
        frame("run-new", 4, "run.completed", usage=None, finish_reason="stop"),
    ]
    body = "".join(json.dumps(item) + "\n" for item in frames)
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200,
            headers={"Content-Type": "application/x-ndjson", "X-Run-Id": "run-new"},
            body=body,
        ),
    )
    send(page, "anything")
    answer = answers(page).first
    expect(answer).to_have_attribute("data-status", "completed")
    assert text_of(answer) == "fresh words"
    assert answer.get_attribute("data-ignored") == "2"
    assert answer.get_attribute("data-verified") == "true"


def test_sessions_new_and_existing_and_a_reload_mid_run_follows_the_live_run(
    page: Page, api: httpx2.Client, artifacts_dir: Path
) -> None:
    prompt = "Survive a reload"
    send(page, prompt)
    wait_streaming(answers(page).first)
    session_id = page.input_value("#session-id")

    # A reload keeps the key and session (localStorage); the run went on
    # without the page, which loads the session and follows the live run.
    page.reload()
    expect(page.locator("#session-id")).to_have_value(session_id)
    expect(page.locator("#api-key")).to_have_value(DEV_KEY)
    answer = answers(page).first
    expect(answer).to_have_attribute("data-status", "completed")
    assert text_of(answer) == run_record(api, answer)["text"] == expected_text(prompt)
    assert answer.get_attribute("data-verified") == "true"

    # A new session starts empty; typing the old id brings its answers back.
    page.click("#new-session")
    expect(page.locator("#session-id")).not_to_have_value(session_id)
    expect(answers(page)).to_have_count(0)
    page.fill("#session-id", session_id)
    page.press("#session-id", "Enter")
    expect(answers(page)).to_have_count(1)
    assert text_of(answers(page).first) == expected_text(prompt)
    shot(page, artifacts_dir, "10-existing-session")


def test_server_shutdown_shows_interrupted(browser: Browser, artifacts_dir: Path) -> None:
    # A server of its own, which this test stops: no drain time, so the run
    # is interrupted (reason shutdown) at once.
    with running_server(*SERVER_ARGS, "--drain-timeout", "0") as server:
        with opened_page(browser, server.url, viewport=DESKTOP) as page:
            send(page, "Interrupt me")
            answer = answers(page).first
            wait_streaming(answer)
            server.send_signal(signal.SIGTERM)
            expect(answer).to_have_attribute("data-status", "interrupted")
            expect(answer.locator(".status")).to_have_text(
                "interrupted — the server is shutting down"
            )
            assert expected_text("Interrupt me").startswith(text_of(answer))
            shot(page, artifacts_dir, "11-interrupted-by-shutdown")
