"""trio-stream-server: streaming LLM agent chat sessions on Trio.

The engine lives in :mod:`server.core` (no HTTP), the HTTP edge in
:mod:`server.web`, wire encoders in :mod:`server.wire`, agents in
:mod:`server.agents`, and the process launcher in :mod:`server.launcher`.
"""

__version__ = "0.1.0"
