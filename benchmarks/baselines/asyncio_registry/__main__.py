"""``python -m benchmarks.baselines.asyncio_registry``: serve the old design
with uvicorn (httptools) on a socket bound here, so ``--port 0`` reports the
real port (``listening url=http://HOST:PORT`` on stderr once serving).

SIGTERM or SIGINT: uvicorn stops accepting, gives open responses
``--graceful-timeout`` seconds, then cancels them. Model calls still blocked
in their worker threads cannot be interrupted (that is the design); rather
than hang in the interpreter's executor join, the process logs
``shutdown_abandoned_threads`` and exits with status 0 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys

import uvicorn

from .app import create_app

logger = logging.getLogger("baseline.asyncio_registry")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One INFO line per upstream request would tax the throughput runs; ours logs none.
    for name in ("httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def bind(host: str, port: int) -> socket.socket:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to bind {host}: this baseline binds loopback only")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class AnnouncingServer(uvicorn.Server):
    """Prints the ``listening`` line once uvicorn accepts connections."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"listening url=http://{shown}:{port}", file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace, sock: socket.socket) -> None:
    app = create_app(
        upstream_url=args.upstream_url,
        model=args.model,
        api_keys=args.api_key or ["devkey"],
        upstream_key=args.upstream_key,
    )
    config = uvicorn.Config(
        app,
        http="httptools",
        loop="asyncio",
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    await AnnouncingServer(config).serve(sockets=[sock])
    app.state.exit_in_flight = app.state.model_client.in_flight
    if not app.state.exit_in_flight:
        app.state.model_client.close()
    args.in_flight = app.state.exit_in_flight


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baselines.asyncio_registry", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--upstream-url", required=True, help="OpenAI-compatible base, …/v1")
    parser.add_argument("--upstream-key", default=None)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--api-key", action="append", help="accepted key (default: devkey)")
    parser.add_argument("--graceful-timeout", type=float, default=2.0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    sock = bind(args.host, args.port)
    # uvicorn re-raises the signal it caught once it has shut down; with this
    # handler in place that ends in our exit status 0, not death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)
    args.in_flight = 0
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve(args, sock))
        if not args.in_flight:
            loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    if args.in_flight:
        logger.warning("shutdown_abandoned_threads model_calls=%d", args.in_flight)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
