"""Flags, their STREAM_SERVER_* mirrors, and clean start-up errors."""

from __future__ import annotations

import pytest

from server.cli import parse_settings
from server.settings import Settings


def test_defaults_serve_loopback_with_the_scripted_agent() -> None:
    settings = parse_settings([], environ={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.agent) == ("127.0.0.1", 8000, "scripted")
    assert settings.uses_dev_key and settings.accepted_keys == ("devkey",)


def test_environment_mirrors_flags_and_flags_win() -> None:
    environ = {
        "STREAM_SERVER_PORT": "9001",
        "STREAM_SERVER_TOKEN_DELAY": "0.5",
        "STREAM_SERVER_REPLY_WORDS": "7",
        "STREAM_SERVER_API_KEYS": "k1, k2,",
        "STREAM_SERVER_DRAIN_TIMEOUT": "3",
    }
    settings = parse_settings([], environ=environ)
    assert settings.port == 9001
    assert settings.token_delay == 0.5 and settings.reply_words == 7
    assert settings.api_keys == ("k1", "k2")
    assert settings.drain_timeout == 3
    flagged = parse_settings(["--port", "9002", "--api-key", "k3"], environ=environ)
    assert flagged.port == 9002 and flagged.api_keys == ("k3",)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, False),
        (["--store-prompts"], {}, True),
        ([], {"STREAM_SERVER_STORE_PROMPTS": "1"}, True),
        ([], {"STREAM_SERVER_STORE_PROMPTS": " Yes "}, True),
        ([], {"STREAM_SERVER_STORE_PROMPTS": "off"}, False),
        (["--no-store-prompts"], {"STREAM_SERVER_STORE_PROMPTS": "true"}, False),
    ],
)
def test_store_prompts_is_a_switch_mirrored_by_the_environment(
    argv: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert parse_settings(argv, environ=environ).store_prompts is expected


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--host", "0.0.0.0"], {}, "refusing to bind 0.0.0.0 with the dev key"),
        (["--agent", "nonesuch"], {}, "unknown agent 'nonesuch'"),
        (["--agent", "ollama", "--ollama-url", "localhost:11434"], {}, "--ollama-url must be"),
        (["--agent", "openai-asyncio", "--upstream-url", "ftp://x"], {}, "--upstream-url must be"),
        (["--agent", "nowhere.module:factory"], {}, "cannot import agent module"),
        (["--upstream-timeout", "0"], {}, "upstream_timeout"),
        (["--reply-words", "0"], {}, "--reply-words must be >= 1"),
        (["--port", "70000"], {}, "port"),
        ([], {"STREAM_SERVER_PORT": "eighty"}, "--port: invalid int value: 'eighty'"),
        (["--token-delay", "soon"], {}, "invalid float value"),
        ([], {"STREAM_SERVER_STORE_PROMPTS": "maybe"}, "STREAM_SERVER_STORE_PROMPTS: expected"),
    ],
)
def test_bad_configuration_is_a_usage_error_not_a_traceback(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(argv, environ=environ)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_dev_key_may_bind_any_loopback_address() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert parse_settings(["--host", host], environ={}).host == host
    assert parse_settings(["--host", "0.0.0.0", "--api-key", "k"], environ={}).api_keys == ("k",)
