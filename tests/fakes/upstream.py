"""A fake LLM upstream: a real HTTP server on loopback speaking the Ollama
and OpenAI chat dialects, scripted per request by ``@directives`` in the
prompt (see ``_directives``), recording what it saw (see ``_registry``).

In a trio test::

    async with open_fake_upstream(default_delay=0.001) as fake:
        ...  # point the server under test at fake.url
        record = await fake.wait_for_request()
        await fake.wait_disconnected(record)

As a process (for benchmarks)::

    python -m tests.fakes.upstream --port 0 [--api-key K] [--delay S]

prints ``listening url=http://127.0.0.1:PORT`` on stderr once it accepts
connections, serves ``GET /_fake/stats`` and ``POST /_fake/reset``, and
exits with status 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from ._directives import DirectiveError as DirectiveError
from ._directives import Directives as Directives
from ._directives import parse_directives as parse_directives
from ._registry import RequestRecord as RequestRecord
from ._registry import SessionStats as SessionStats
from ._server import FakeUpstream as FakeUpstream
from ._server import open_fake_upstream as open_fake_upstream
from ._wire import token_text as token_text


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    # The receiver is in place before "listening" is printed, so a harness
    # may signal as soon as it has read the line.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_fake_upstream(
            api_key=args.api_key, default_delay=args.delay, host=args.host, port=args.port
        ) as fake:
            print(f"listening url={fake.url}", file=sys.stderr, flush=True)
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="required on the OpenAI routes if set")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds before each token")
    trio.run(_serve_until_signalled, parser.parse_args(argv))


if __name__ == "__main__":
    main()
