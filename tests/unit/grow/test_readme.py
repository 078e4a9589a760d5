"""The README's Python block runs as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def _block() -> str:
    text = README.read_text()
    section = text[text.index("## Python: grow your own model"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_block_runs_and_has_at_most_15_esper_lines(tmp_path, monkeypatch, capsys) -> None:
    code = _block()
    esper_lines = [line for line in code.splitlines() if "# esper" in line]
    assert 0 < len(esper_lines) <= 15, esper_lines
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 (our README)
    out = capsys.readouterr().out
    assert out.count("epoch ") == 20
    assert (tmp_path / "grown" / "manifest.json").is_file()
