"""The pieces of ``--workers N`` that need no process: the restart policy,
each worker's data dir, the handoff through the environment, the worker's
log prefix. The processes themselves: tests/integration/test_workers.py."""

from __future__ import annotations

import json
import logging

import pytest

from server.cli import parse_settings
from server.handoff import WORKER_ENV, Handoff
from server.logs import JsonFormatter, configure_logging
from server.supervisor import RestartPolicy, worker_data_dir


def test_restarts_back_off_then_give_up_within_the_window() -> None:
    policy = RestartPolicy()
    delays = [policy.next_delay(now) for now in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert policy.next_delay(5.0) is None  # a 6th restart within 60 s


def test_a_policy_of_no_restarts_gives_up_at_the_first_exit() -> None:
    assert RestartPolicy(max_restarts=0).next_delay(0.0) is None


def test_restarts_spread_out_are_never_given_up_and_the_backoff_is_bounded() -> None:
    policy = RestartPolicy(max_restarts=10, max_delay=5.0)
    assert [policy.next_delay(now) for now in range(6)][-1] == 5.0
    # A minute later the earlier restarts no longer count.
    assert policy.next_delay(70.0) == 0.25
    for later in range(1, 50):
        assert policy.next_delay(70.0 + later * 61.0) == 0.25


def test_each_worker_has_a_data_dir_of_its_own_and_memory_stays_memory() -> None:
    assert worker_data_dir("data", 0) == "data/worker-0"
    assert worker_data_dir("/var/lib/tss", 3) == "/var/lib/tss/worker-3"
    assert worker_data_dir("", 1) == ""


def test_the_handoff_goes_through_the_environment() -> None:
    handoff = Handoff(index=1, listen_fds=(5, 6), lifeline_fd=7, ready_fd=8)
    assert Handoff.from_environ({WORKER_ENV: handoff.encode()}) == handoff
    assert Handoff.from_environ({}) is None
    assert handoff.binds == ["fd://5", "fd://6"]


def test_workers_default_to_one_and_more_need_a_redis_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse_settings([], environ={}).workers == 1
    settings = parse_settings(
        [], environ={"STREAM_SERVER_WORKERS": "2", "STREAM_SERVER_REDIS_URL": "redis://r:6379/0"}
    )
    assert (settings.workers, settings.redis_url) == (2, "redis://r:6379/0")
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--workers", "4"], environ={})
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "trio-stream-server: error: --workers 4 needs --redis-url: "
        "workers share sessions through Redis"
    ]


@pytest.fixture
def restore_root_logging() -> object:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved


def test_a_workers_lines_say_which_worker(restore_root_logging: None) -> None:
    configure_logging("info", "text", worker=1)
    formatter = logging.getLogger().handlers[0].formatter
    assert formatter is not None
    record = logging.getLogger("server.lifecycle").makeRecord(
        "server.lifecycle", logging.INFO, __file__, 1, "stream_end trace=r1", (), None
    )
    # After the level, before the logger: the lifecycle line keeps its shape.
    assert formatter.format(record).endswith(" INFO worker=1 server.lifecycle stream_end trace=r1")
    entry = json.loads(JsonFormatter(worker=1).format(record))
    assert (entry["worker"], entry["logger"]) == (1, "server.lifecycle")
    assert "worker" not in json.loads(JsonFormatter().format(record))
