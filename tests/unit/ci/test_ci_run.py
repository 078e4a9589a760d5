""".ci/run says so when it skips the slow suites (it used to skip them silently)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

STUB = """#!/usr/bin/env bash
echo "test.sh markers=${ESPER_TEST_MARKERS:-not slow}" >> "$(dirname "$0")/../calls"
"""


def _ci(tmp_path: Path, budget_s: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    (tmp_path / ".ci").mkdir()
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts" / "test.sh").write_text(STUB)
    env = {**os.environ, "ESPER_CI_SLOW_BUDGET_S": budget_s}
    env.pop("ESPER_TEST_MARKERS", None)
    r = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                       env=env, timeout=60, check=False)
    calls = (tmp_path / "calls").read_text().splitlines()
    return r, calls


def test_ci_prints_that_it_skipped_the_slow_suites_when_out_of_time(tmp_path: Path) -> None:
    r, calls = _ci(tmp_path, "0")  # any default suite is "too slow" for a 0 s budget
    assert r.returncode == 0, r.stderr
    assert calls == ["test.sh markers=not slow"]
    assert "SKIPPED THE SLOW SUITES" in r.stderr and "ESPER_TEST_MARKERS=slow" in r.stderr
    assert "SKIPPED: slow suites not run" in r.stdout


def test_ci_runs_the_slow_suites_when_there_is_time(tmp_path: Path) -> None:
    r, calls = _ci(tmp_path, "2700")
    assert r.returncode == 0, r.stderr
    assert calls == ["test.sh markers=not slow", "test.sh markers=slow"]
    assert "SKIPPED" not in r.stdout + r.stderr
