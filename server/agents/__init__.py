"""Agent backends, selected by name (``--agent``)."""

from __future__ import annotations

from ..core.agent import Agent
from .scripted import ScriptedAgent

AGENT_NAMES = ("scripted",)


class AgentConfigError(ValueError):
    """Unknown agent or bad agent options: reported at startup, not as a traceback."""


def build_agent(name: str, *, token_delay: float, reply_words: int) -> Agent:
    if name == "scripted":
        if token_delay < 0:
            raise AgentConfigError("--token-delay must be >= 0")
        if reply_words < 1:
            raise AgentConfigError("--reply-words must be >= 1")
        return ScriptedAgent(token_delay=token_delay, reply_words=reply_words)
    raise AgentConfigError(f"unknown agent {name!r}; choose one of: {', '.join(AGENT_NAMES)}")
