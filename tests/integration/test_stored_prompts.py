"""Issue 11, finding 7: prompts are not kept in the run store unless the
operator asks (``--store-prompts``), as docs/api.md says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx2
import pytest

from .harness import FAST_REPLY, running_server
from .wire import CHAT_PATH, auth

pytestmark = pytest.mark.integration

PROMPT = "a prompt that should not be on disk"


def stored_prompt(data_dir: Path, run_id: str) -> str | None:
    with sqlite3.connect(f"file:{data_dir / 'runs.sqlite3'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT prompt FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    db.close()
    assert row is not None, f"{run_id} not in the store"
    prompt: str | None = row[0]
    return prompt


@pytest.mark.parametrize(("flags", "expected"), [((), None), (("--store-prompts",), PROMPT)])
async def test_a_runs_row_keeps_its_prompt_only_with_store_prompts(
    tmp_path: Path, flags: tuple[str, ...], expected: str | None
) -> None:
    with running_server("--data-dir", str(tmp_path), *FAST_REPLY, *flags) as server:
        async with httpx2.AsyncClient(base_url=server.url, timeout=30.0) as client:
            response = await client.post(CHAT_PATH, json={"prompt": PROMPT}, headers=auth())
        assert response.status_code == 200, response.text
        assert server.stop() == 0
    assert stored_prompt(tmp_path, response.headers["x-run-id"]) == expected
    assert PROMPT not in server.log_text()
