"""Fixtures for the browser tests: the real server, a cuttable proxy in front
of it, and Debian's headless Chromium driven by Playwright.

Plain synchronous fixtures and tests (Playwright's sync API runs its own
event loop; pytest-trio leaves sync tests alone). A browser that is not
installed skips these tests with the reason, unless
``STREAM_SERVER_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes it a
failure. Browsers are never downloaded: Playwright launches the system
``chromium``.

Screenshots of each state go to ``$BROWSER_ARTIFACTS_DIR`` or
``tests/browser/artifacts/`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest

from tests.integration.harness import ServerProcess, running_server

from .proxy import SeverableProxy, severable_proxy

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

REQUIRE_BROWSER = os.environ.get("STREAM_SERVER_REQUIRE_BROWSER") == "1"
ARTIFACTS_DIR = Path(os.environ.get("BROWSER_ARTIFACTS_DIR") or Path(__file__).parent / "artifacts")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A run lasts ~2 s (40 words, 50 ms apart): long enough to supersede, stop
# or cut deterministically once the first words showed, short enough to
# wait for its completion.
REPLY_WORDS = 40
SERVER_ARGS = ("--token-delay", "0.05", "--reply-words", str(REPLY_WORDS))
DEV_KEY = "devkey"
PAGE_TIMEOUT_MS = 15_000
DESKTOP = {"width": 1100, "height": 800}


def browser_unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason} (STREAM_SERVER_REQUIRE_BROWSER=1 requires the browser tests)")
    pytest.skip(f"{reason}; install Debian's chromium (apt-get install chromium) to run them")


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        browser_unavailable("no chromium executable on this machine")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with standard_asyncio_loops(), sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile (user data
        # dir) of its own and deletes it on close.
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def standard_asyncio_loops() -> Iterator[None]:
    """Playwright's sync API runs a plain asyncio loop of its own. Once the
    server's trio-asyncio adapter is imported, ``asyncio.new_event_loop()``
    outside trio makes a trio-asyncio loop, which cannot host it; a policy
    set for this thread takes precedence (trio_asyncio/_loop.py), and
    ``None`` gives the thread back to whatever was there before."""
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


@pytest.fixture(scope="module")
def chat_server() -> Iterator[ServerProcess]:
    with running_server(*SERVER_ARGS) as process:
        yield process


@pytest.fixture(scope="module")
def proxy(chat_server: ServerProcess) -> Iterator[SeverableProxy]:
    port = int(chat_server.url.rsplit(":", 1)[1])
    with severable_proxy(port) as proxy:
        yield proxy


@pytest.fixture
def api(chat_server: ServerProcess) -> Iterator[httpx2.Client]:
    """The runs API straight to the server (not through the proxy)."""
    with httpx2.Client(
        base_url=chat_server.url, headers={"Authorization": f"Bearer {DEV_KEY}"}, timeout=10
    ) as client:
        yield client


@contextmanager
def opened_page(browser: Browser, url: str, **context_args: Any) -> Iterator[Page]:
    """The chat page at ``url`` in a fresh context (empty localStorage);
    fails the test on any uncaught page error."""
    context = browser.new_context(**context_args)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/")
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(browser: Browser, proxy: SeverableProxy) -> Iterator[Page]:
    """The page loaded through the proxy (whose connections a test may cut)."""
    proxy.restore()
    with opened_page(browser, proxy.url, viewport=DESKTOP) as page:
        yield page


@pytest.fixture
def phone_page(browser: Browser, proxy: SeverableProxy) -> Iterator[Page]:
    with opened_page(
        browser, proxy.url, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    ) as page:
        yield page


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        server = getattr(item, "funcargs", {}).get("chat_server")
        if isinstance(server, ServerProcess):
            report.sections.append((f"server log {server.url}", server.log_text(last=200)))
    return report
