"""``python -m benchmarks.compare --smoke --profile --doc`` runs end to end and
every server x scenario produced a figure or an explicit error entry (the
values are not asserted: this keeps the harness from rotting, it does not
judge the servers). The smoke is one tiny case of each scenario, a few
seconds; the measurement itself (``tox -e bench``) and ``--quick`` run the
same code at larger settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._compare_proc import SERVERS
from benchmarks._report import BEGIN, END
from benchmarks.compare import SCALES, SCENARIOS, SEEDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def has_figure(scenario: str, result: dict[str, object]) -> bool:
    if "error" in result:
        return isinstance(result["error"], str) and bool(result["error"])
    if scenario == "seeds":
        return all(isinstance(result.get(seed), dict) for seed in SEEDS)
    if scenario.startswith("supersede"):
        keys = ("first_content", "old_upstream_closed", "overlap_sessions", "hangs")
        return all(key in result for key in keys)
    if scenario == "leaks":
        return all(key in result for key in ("before", "after", "hangs"))
    if scenario == "storm":
        keys = ("quiet_first_content", "storm_first_content", "storm_hangs", "probe_hangs")
        return all(key in result for key in keys)
    if scenario == "throughput":
        rows = [result.get(str(k)) for k in SCALES["smoke"]["ks"]]
        # --profile samples the largest K: a summary, or why there is none.
        return all(isinstance(row, dict) for row in rows) and "profile" in rows[-1]
    return False


@pytest.mark.timeout(120)
def test_smoke_comparison_produces_every_figure(tmp_path: Path) -> None:
    doc = tmp_path / "comparison.doc.md"
    doc.write_text((ROOT / "docs" / "comparison.md").read_text())
    command = ["--smoke", "--profile", "--out", str(tmp_path), "--doc", str(doc)]
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
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
    section = (tmp_path / "comparison.md").read_text()
    assert "**Smoke run**" in section
    assert "| scenario |" in section
    assert "| seed: multi_session |" in section
    assert "### Targets for trio-stream-server" in section
    # --doc replaced the generated section and kept the written text around it.
    original = (ROOT / "docs" / "comparison.md").read_text()
    head, tail = original.split(BEGIN)[0], original.split(END)[1]
    assert doc.read_text() == head + section.rstrip("\n") + tail
