"""``python -m benchmarks.baselines.asyncio_taskgroup``: serve the baseline with
uvicorn (httptools, the stock asyncio loop) on a pre-bound loopback socket.

Prints ``listening url=http://HOST:PORT`` on stderr once it accepts
connections (so ``--port 0`` works for a harness). On SIGTERM or SIGINT it
stops accepting, cancels live runs with reason ``shutdown`` and awaits their
cleanup (clients get a final ``interrupted`` chunk and ``[DONE]``), lets
uvicorn close the connections, and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys

import uvicorn

from .app import App, Config


class _Server(uvicorn.Server):
    """uvicorn's server, plus the ready line and a drain before it waits for
    open connections (a streaming response only ends when its run does)."""

    def __init__(self, config: uvicorn.Config, *, app: App, url: str) -> None:
        super().__init__(config)
        self._app = app
        self._url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"listening url={self._url}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._app.drain()
        await super().shutdown(sockets)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _ignore_signal(signum: int, frame: object) -> None:
    """uvicorn re-raises the signal it shut down for once it has finished;
    with this handler that is a no-op, so SIGTERM ends in a clean exit 0."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baselines.asyncio_taskgroup", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--upstream-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--model", default=None, help="model name sent upstream")
    parser.add_argument("--upstream-api-key", default=None)
    parser.add_argument("--api-key", action="append", default=None, help="default: devkey")
    parser.add_argument("--cleanup-budget", type=float, default=5.0)
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    parser.add_argument("--upstream-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes accepting on the one socket (forked; sessions are per process)",
    )
    args = parser.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error(f"--host must be a loopback address, not {args.host!r}")

    _configure_logging(args.log_level)
    sock = _bind(args.host, args.port)
    with sock:
        if args.workers > 1:
            _fork_workers(args, sock)
        else:
            _serve(args, sock)


def _fork_workers(args: argparse.Namespace, sock: socket.socket) -> None:
    """What ``uvicorn --workers N`` gives: N processes accepting on one
    socket, each with its own registry (a session's prompts may land on
    different processes: the benchmark measures throughput, not supersede).
    The parent forwards SIGTERM and SIGINT and exits once they all did."""
    pids = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                _serve(args, sock)
            finally:
                os._exit(0)
        pids.append(pid)

    def forward(signum: int, frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for pid in pids:
        os.waitpid(pid, 0)


def _serve(args: argparse.Namespace, sock: socket.socket) -> None:
    app = App(
        Config(
            upstream_url=args.upstream_url,
            model=args.model,
            api_keys=frozenset(args.api_key or ["devkey"]),
            upstream_api_key=args.upstream_api_key,
            cleanup_budget=args.cleanup_budget,
            idle_timeout=args.idle_timeout,
            upstream_timeout=args.upstream_timeout,
        )
    )
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
    config = uvicorn.Config(
        app,
        loop="asyncio",
        http="httptools",
        lifespan="on",
        log_config=None,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        # A backstop only: the drain in _Server.shutdown ends the streams.
        timeout_graceful_shutdown=args.cleanup_budget + 5,
    )
    signal.signal(signal.SIGTERM, _ignore_signal)
    _Server(config, app=app, url=url).run(sockets=[sock])


if __name__ == "__main__":
    main()
