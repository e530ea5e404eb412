"""The embedded default stays light: without --redis-url nothing imports
coredis (the ``cluster`` extra)."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.harness import REPO_ROOT


def test_the_server_imports_without_the_redis_client() -> None:
    code = (
        "import sys, server.cli, server.app, server.launcher, server.cluster.backend\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'coredis')\n"
        "assert 'server.cluster.redis_backend' not in sys.modules\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)
