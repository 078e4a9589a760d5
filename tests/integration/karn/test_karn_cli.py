"""`esper karn evolve --embedded`: Urza, Tezzeret and Karn in one process, two generations."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_embedded_evolve_two_generations(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "esper.cli", "karn", "evolve", "--generations", "2",
         "--per-generation", "2", "--embedded", "--data-dir", str(tmp_path), "--seed", "3"],
        capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line[:3].strip().isdigit()]
    assert {r[0] for r in rows} == {"1", "2"}
    assert sum(r[1] == "accepted" for r in rows) >= 3
    assert "accepted over 2 generation(s)" in out.stdout
    # Children were stored by the embedded Urza under the data dir.
    assert (tmp_path / "urza" / "urza.db").exists()
