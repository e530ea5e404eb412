"""Fixtures for the integration suite: real server processes on loopback.

The shared ``server`` runs for the whole session with the fast scripted
reply (:data:`harness.FAST_REPLY`); tests that need other flags (API keys,
shutdown timing) start their own with :func:`harness.running_server`.
Tests use unique session ids, so sharing one process is safe.

When a test fails, the log of every server it used is attached to the
report (section "server log ...")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator

import httpx2
import pytest

from .harness import FAST_REPLY, ServerProcess, loopback_client, running_server

LOG_LINES_ON_FAILURE = 200


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    with running_server(*FAST_REPLY, "--drain-timeout", "2") as process:
        yield process
    assert process.proc.returncode == 0, process.log_text(last=LOG_LINES_ON_FAILURE)


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx2.AsyncClient]:
    async with loopback_client(server.url) as http:
        yield http


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, ServerProcess):
                report.sections.append(
                    (f"server log {value.url}", value.log_text(last=LOG_LINES_ON_FAILURE))
                )
    return report
