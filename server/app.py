"""``hypercorn -k trio server.app:app``: the app configured from
``STREAM_SERVER_*`` environment variables.

Under plain Hypercorn, SIGTERM closes connections before our drain can run
(see :mod:`server.launcher`); runs still end with reason ``shutdown`` in the
lifespan shutdown, but their clients may not see the terminal frame.
``python -m server`` drains properly."""

from __future__ import annotations

from .cli import parse_settings
from .logs import configure_logging
from .web.app import create_app

settings = parse_settings([])
configure_logging(settings.log_level)
app = create_app(settings)
