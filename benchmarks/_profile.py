"""Sampling a server process with py-spy while a scenario loads it, and
summing the samples up by where the CPU went.

py-spy samples another process from the outside (no code in the server),
so the same profile is taken of ours and of both baselines. Its raw output
is one line per distinct stack: ``frame;frame;...;leaf count``, each frame
``function (path:line)``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import trio

# The leaf frame's file -> the component it belongs to.
COMPONENTS = [
    ("/server/", "trio-stream-server"),
    ("/benchmarks/baselines/", "baseline app"),
    ("/h11/", "h11"),
    ("/hypercorn/", "hypercorn"),
    ("/quart_trio/", "quart"),
    ("/quart/", "quart"),
    ("/werkzeug/", "quart"),
    ("/uvicorn/", "uvicorn"),
    ("/httptools/", "uvicorn"),
    ("/starlette/", "starlette"),
    ("/httpx2/", "httpx2 (upstream client)"),
    ("/httpcore2/", "httpx2 (upstream client)"),
    ("/trio/", "trio"),
    ("/asyncio/", "asyncio"),
    ("/json/", "json"),
    ("/attr/", "attrs"),
    ("/cattrs/", "attrs"),
]
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy next to this interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def record(pid: int, seconds: float, raw_path: Path) -> str | None:
    """Sample ``pid`` for ``seconds`` into ``raw_path``; an error text, or None."""
    binary = py_spy()
    if binary is None:
        return "py-spy is not installed (pip install -e '.[bench]')"
    command = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(raw_path),
    ]
    with trio.move_on_after(seconds + 30):
        result = await trio.run_process(
            command, check=False, stdout=subprocess.DEVNULL, capture_stderr=True
        )
        if result.returncode != 0 or not await trio.Path(raw_path).exists():
            return f"py-spy exited {result.returncode}: {result.stderr.decode()[-300:]}"
        return None
    return "py-spy did not finish"


def component(path: str) -> str:
    # py-spy names files relative to their sys.path entry: "trio/_socket.py".
    path = "/" + path.lstrip("/")
    for marker, name in COMPONENTS:
        if marker in path:
            return name
    return "stdlib and other"


def summarize(raw_path: Path, top: int = 12) -> dict[str, Any]:
    """Self time by component and by function, as shares of all samples."""
    by_component: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.split(";")[-1]
        match = FRAME.match(leaf)
        path = match["path"] if match else leaf
        function = match["function"] if match else leaf
        total += count
        by_component[component(path)] += count
        by_function[f"{function} ({short(path)})"] += count

    def shares(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * count / total, 1)] for name, count in counter.most_common(top)]

    return {
        "samples": total,
        "self_by_component_pct": shares(by_component) if total else [],
        "self_by_function_pct": shares(by_function) if total else [],
    }


def short(path: str) -> str:
    """``.../site-packages/h11/_writers.py`` -> ``h11/_writers.py``."""
    for anchor in ("site-packages/", "lib/python3.11/", "/work/"):
        if anchor in path:
            return path.split(anchor, 1)[1]
    return path
