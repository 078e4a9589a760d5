"""KarnConfig: unknown keys, nested evolve settings and bounds are errors naming the value."""

from __future__ import annotations

import pytest

from esper.errors import ConfigError
from esper.karn.service import KarnConfig


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown karn settings \['urza_timeout'\]"):
        KarnConfig.from_dict({"urza_timeout": 5})


def test_unknown_nested_evolve_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown karn settings \['mutation_rat'\]"):
        KarnConfig.from_dict({"evolve": {"mutation_rat": 0.5}})


def test_known_keys_are_applied() -> None:
    cfg = KarnConfig.from_dict({"urza_timeout_s": 2.5, "evolve": {"crossover_rate": 0.25}})
    assert cfg.urza_timeout_s == 2.5 and cfg.evolve.crossover_rate == 0.25


@pytest.mark.parametrize("value", [0, -1.0, 3601, float("nan"), "10"])
def test_timeouts_outside_bounds_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"compile_timeout_s=.*\(0, 3600\]"):
        KarnConfig(compile_timeout_s=value)  # type: ignore[arg-type]
