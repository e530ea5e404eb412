"""``python -m benchmarks.compare --quick`` runs end to end and every server x
scenario produced a figure or an explicit error entry (the values are not
asserted: this keeps the harness from rotting, it does not judge the servers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._compare_proc import SERVERS
from benchmarks.compare import SCENARIOS, SEEDS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def has_figure(scenario: str, result: dict[str, object]) -> bool:
    if "error" in result:
        return isinstance(result["error"], str) and bool(result["error"])
    if scenario == "seeds":
        return all(isinstance(result.get(seed), dict) for seed in SEEDS)
    if scenario.startswith("supersede"):
        return "first_content" in result and "overlap_sessions" in result and "hangs" in result
    if scenario == "leaks":
        return all(key in result for key in ("before", "after", "hangs"))
    if scenario == "throughput":
        return all(str(k) in result for k in (1, 10))
    return False


@pytest.mark.timeout(170)
def test_quick_comparison_produces_every_figure(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=160,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    document = json.loads((tmp_path / "comparison.json").read_text())
    results = document["results"]
    assert set(results) == set(SERVERS)
    for server, scenarios in results.items():
        assert set(scenarios) == set(SCENARIOS), server
        for scenario, result in scenarios.items():
            assert has_figure(scenario, result), (server, scenario, result)
    table = (tmp_path / "comparison.md").read_text()
    assert "| scenario |" in table
    assert table.strip().splitlines()[-1].startswith("| seed: ")
