"""The top floor: nothing in `esper/` outside `esper/experiments/` imports it (docs/ARCHITECTURE.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

ESPER = Path(__file__).resolve().parents[3] / "esper"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, wherever it is (function bodies included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_no_core_module_imports_the_experiments() -> None:
    offenders = []
    for path in sorted(ESPER.rglob("*.py")):
        rel = path.relative_to(ESPER.parent)
        if rel.parts[:2] == ("esper", "experiments"):
            continue
        for line, module in _imports(path):
            if module == "esper.experiments" or module.startswith("esper.experiments."):
                offenders.append(f"{rel}:{line} imports {module}")
    assert offenders == []


def test_the_probe_finds_an_import_inside_a_function(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def run():\n    from esper.experiments import growth\n")
    assert (2, "esper.experiments.growth") in _imports(f)
