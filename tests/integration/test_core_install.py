"""The core install (`pip install esper`, no extras) runs the README's growth example.

A fresh venv (no system site-packages, so nothing of the dev venv is visible) gets the
repository installed the way a user installs it, with only the core dependencies of
pyproject.toml; then the README's "Python: grow your own model" block runs there, outside
the repository, and must grow a seed. Any import of a package from an extra (gRPC, NATS,
OpenTelemetry, torch_geometric, matplotlib, scikit-learn, mnist1d, yaml, ...) on the way
from `esper.grow`, `esper.kasmina` or `esper.blueprints` fails it.

Skipped, saying why, when pip cannot get the core dependencies (no index or wheel reachable
that has them): that says nothing about the code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# pip's words for "could not get a distribution" (no network, no index that has it), as
# opposed to a build or resolution failure of the project itself.
_UNREACHABLE = re.compile(r"No matching distribution found|Could not find a version|"
                          r"NewConnectionError|Network is unreachable|Temporary failure in name "
                          r"resolution|Max retries exceeded|ConnectTimeout|ReadTimeout")


def _readme_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python: grow your own model"):]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README's Python section has no python block"
    return match.group(1)


SCRIPT = """
import json
import torch
torch.manual_seed(0)
{block}
import esper.blueprints, esper.kasmina  # with esper.grow: the library layer
history = grower.history
json.dump({{"parameters": history.parameters,
           "germinated": [d for d in history.decisions
                          if d["kind"] == "DECISION_KIND_GERMINATE" and not d["rejected"]]}},
          open("result.json", "w"))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(python: Path, *args: str, env: dict[str, str]) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--retries", "1",
                           "--timeout", "60", *args], env=env, capture_output=True, text=True,
                          timeout=1500, check=False)
    if proc.returncode == 0:
        return
    out = proc.stdout + proc.stderr
    if _UNREACHABLE.search(out):
        pytest.skip(f"the core venv cannot be built here: pip install {' '.join(args)} could "
                    f"not get a distribution:\n{out[-1500:]}")
    raise AssertionError(f"pip install {' '.join(args)} failed:\n{out[-4000:]}")


def test_a_core_only_venv_runs_the_readme_growth_example(tmp_path: Path) -> None:
    env = _clean_env()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=300)
    python = venv / "bin" / "python"
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    _pip(python, *core, env=env)
    # The project itself without dependencies: its core ones are installed above, from the
    # same list pip would read, and nothing else may come in.
    # Built from a copy of what the wheel holds, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("esper", "generated"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    _pip(python, "--no-deps", str(src), env=env)

    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], env=env,
                            capture_output=True, text=True, check=True, timeout=120)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    for extra in ("grpcio", "nats-py", "opentelemetry-api", "torch-geometric", "matplotlib",
                  "scikit-learn", "mnist1d", "pyyaml", "tenacity", "protovalidate"):
        assert extra not in installed, f"{extra} came with the core install"

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "example.py").write_text(SCRIPT.format(block=_readme_block()))
    proc = subprocess.run([str(python), "example.py"], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"the README example failed in the core venv:\n{proc.stderr[-4000:]}"
    result = json.loads((run_dir / "result.json").read_text())
    assert proc.stdout.count("epoch ") == 20
    assert result["germinated"], "the example grew no seed in the core venv"
    assert max(result["parameters"]) > result["parameters"][0]
    assert (run_dir / "grown" / "manifest.json").is_file()

    # `esper --help` still works, naming the commands whose extra is missing.
    cli = subprocess.run([str(venv / "bin" / "esper"), "--help"], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, cli.stderr[-2000:]
