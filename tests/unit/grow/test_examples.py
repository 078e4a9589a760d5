"""The examples a researcher copies run, print growth vs no growth, and actually grow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NAMES = ["grow_tabular_mlp", "grow_digits_cnn", "grow_transformer"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def check_grew(result: dict) -> None:
    grown = result["grown"]
    kinds = [kind for _, kind, _, outcome in grown["history"] if outcome == "applied"]
    assert "germinate" in kinds, grown["history"]
    assert "fossilize" in kinds or "prune" in kinds, grown["history"]
    assert 0 < result["static"]["test_acc"] <= 1 and 0 < grown["test_acc"] <= 1


def test_the_tabular_example_grows_at_its_default_length(capsys) -> None:
    result = load("grow_tabular_mlp").main([])
    check_grew(result)
    out = capsys.readouterr().out
    assert "no growth" in out and "growth" in out and "test acc" in out


@pytest.mark.parametrize("name", ["grow_digits_cnn", "grow_transformer"])
def test_the_other_examples_run_short(name: str, capsys) -> None:
    result = load(name).main(["--epochs", "3"])
    assert set(result) == {"static", "grown"}
    assert "no growth" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_example_grows_at_its_default_length(name: str) -> None:
    check_grew(load(name).main([]))
