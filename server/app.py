"""``hypercorn -k trio server.app:app``: the app configured from
``STREAM_SERVER_*`` environment variables.

Under plain Hypercorn, SIGTERM closes connections (after its
``graceful_timeout``) before our drain can run (see :mod:`server.launcher`):
runs that still have a reader end ``cancelled`` with reason
``client_disconnect`` when their connection is cut, runs without one end
``interrupted`` with reason ``shutdown`` in the lifespan shutdown, and clients
see no terminal frame. ``python -m server`` drains properly."""

from __future__ import annotations

from .cli import parse_settings
from .logs import configure_logging
from .web.app import create_app

settings = parse_settings([])
configure_logging(settings.log_level, settings.log_format)
app = create_app(settings)
