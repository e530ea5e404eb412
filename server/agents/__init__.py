"""Agent backends, selected by ``--agent``: a built-in name or
``module:factory`` for a custom agent (``factory(settings)`` returns an
object with ``name`` and ``async def run(request, send_channel)``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from urllib.parse import urlsplit

from ..core.agent import Agent
from ..settings import Settings
from .ollama import OllamaAgent
from .openai_compat import OpenAICompatAgent
from .scripted import ScriptedAgent
from .upstream import UpstreamTimeouts

AGENT_NAMES = ("scripted", "ollama", "openai", "openai-asyncio")


class AgentConfigError(ValueError):
    """Unknown agent or bad agent options: reported at startup, not as a traceback."""


def check_agent_settings(settings: Settings) -> None:
    """Raise :class:`AgentConfigError` for settings no agent could run with,
    without building anything."""
    name = settings.agent
    if name == "scripted":
        if settings.token_delay < 0:
            raise AgentConfigError("--token-delay must be >= 0")
        if settings.reply_words < 1:
            raise AgentConfigError("--reply-words must be >= 1")
    elif name == "ollama":
        _check_url("--ollama-url", settings.ollama_url)
    elif name in ("openai", "openai-asyncio"):
        _check_url("--upstream-url", settings.upstream_url)
    elif ":" in name:
        _load_factory(name)
    else:
        raise AgentConfigError(
            f"unknown agent {name!r}; choose one of: {', '.join(AGENT_NAMES)} "
            "or give module:factory"
        )


def build_agent(settings: Settings) -> Agent:
    check_agent_settings(settings)
    timeouts = UpstreamTimeouts(connect=settings.connect_timeout, read=settings.upstream_timeout)
    match settings.agent:
        case "scripted":
            return ScriptedAgent(token_delay=settings.token_delay, reply_words=settings.reply_words)
        case "ollama":
            return OllamaAgent(
                base_url=settings.ollama_url, model=settings.model or "llama3.2", timeouts=timeouts
            )
        case "openai":
            return OpenAICompatAgent(
                base_url=settings.upstream_url,
                api_key=settings.upstream_key,
                model=settings.model or "gpt-4o-mini",
                timeouts=timeouts,
            )
        case "openai-asyncio":
            # Imported only here: importing trio_asyncio patches asyncio.
            from .asyncio_adapter import AsyncioAgentAdapter, AsyncioLoopHost
            from .openai_asyncio import OpenAIAsyncioAgent

            return AsyncioAgentAdapter(
                agent=OpenAIAsyncioAgent(
                    base_url=settings.upstream_url,
                    api_key=settings.upstream_key,
                    model=settings.model or "gpt-4o-mini",
                    timeouts=timeouts,
                ),
                host=AsyncioLoopHost(),
                owns_host=True,
                cleanup_budget=settings.cleanup_budget,
            )
    try:
        agent = _load_factory(settings.agent)(settings)
    except Exception as exc:  # reported to the operator at startup
        raise AgentConfigError(f"{settings.agent} failed: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(agent, "run", None)) or not isinstance(
        getattr(agent, "name", None), str
    ):
        raise AgentConfigError(f"{settings.agent} did not return an agent (needs name and run)")
    return agent


def _check_url(flag: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AgentConfigError(f"{flag} must be an http(s) URL, got {url!r}")


def _load_factory(spec: str) -> Callable[[Settings], Agent]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the operator's own module: any import failure
        raise AgentConfigError(
            f"cannot import agent module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise AgentConfigError(f"{spec!r}: {module_name} has no callable {attribute!r}")
    return factory  # type: ignore[no-any-return]
