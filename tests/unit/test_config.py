"""esper.config: the one from_dict every component config uses, to_dict, and the protobuf
mapping derived from field names."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from esper.config import PARSE, FieldError, from_dict, from_message, replace, to_dict, to_message
from esper.errors import ConfigError, InvalidArgumentError
from generated.esper.tolaria.v1 import tolaria_service_pb2 as tpb


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(kw_only=True, frozen=True)
class Inner:
    rate: float = 0.5
    """In [0, 1]."""
    name: str = "x"

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ValueError(f"rate={self.rate!r}: must be in [0, 1]")


def _words(value: object) -> object:
    return tuple(value.split(",")) if isinstance(value, str) else value


@dataclass(kw_only=True, frozen=True)
class Outer:
    count: int = 1
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    tags: tuple[str, ...] = ()
    pairs: tuple[int, str] = (0, "")
    scopes: frozenset[str] = frozenset()
    by_name: Mapping[str, Inner] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    mode: Literal["fast", "slow"] = "fast"
    color: Color = Color.RED
    where: Path = Path(".")
    flag: bool = False
    limit: int | None = None
    words: tuple[str, ...] = field(default=(), metadata={PARSE: _words})


@dataclass(kw_only=True, frozen=True)
class Needs:
    required: int


def test_nested_optional_sequences_mappings_and_enums_are_built() -> None:
    cfg = from_dict(Outer, {
        "count": 3, "inner": {"rate": 0.25}, "maybe": {"name": "m"}, "tags": ["a", "b"],
        "pairs": [1, "one"], "scopes": ["w", "r", "w"], "by_name": {"k": {"rate": 1}},
        "extra": {"any": [1, 2]}, "mode": "slow", "color": "BLUE", "where": "/tmp/x",
        "flag": True, "limit": None, "words": "a,b,c"})
    assert cfg == Outer(count=3, inner=Inner(rate=0.25), maybe=Inner(name="m"), tags=("a", "b"),
                        pairs=(1, "one"), scopes=frozenset({"r", "w"}),
                        by_name={"k": Inner(rate=1)}, extra={"any": [1, 2]}, mode="slow",
                        color=Color.BLUE, where=Path("/tmp/x"), flag=True, words=("a", "b", "c"))
    assert hash(from_dict(Inner, None)) == hash(Inner())  # None: every default; lists → tuples
    assert from_dict(Outer, {"color": "blue"}).color is Color.BLUE  # an enum's value works too
    assert from_dict(Outer, {"inner": Inner(rate=0.1)}).inner == Inner(rate=0.1)


def test_to_dict_gives_plain_data_that_from_dict_accepts_back() -> None:
    cfg = from_dict(Outer, {"inner": {"rate": 0.75}, "tags": ["t"], "scopes": ["b", "a"],
                            "by_name": {"k": {}}, "color": "BLUE", "where": "/w"})
    plain = to_dict(cfg)
    assert plain["inner"] == {"rate": 0.75, "name": "x"} and plain["tags"] == ["t"]
    assert plain["scopes"] == ["a", "b"] and plain["color"] == "BLUE" and plain["where"] == "/w"
    assert from_dict(Outer, plain) == cfg


@pytest.mark.parametrize(("data", "message", "key"), [
    ({"cont": 1}, r"unknown outer settings \['cont'\]; allowed: \['by_name', 'color', 'count', ", "cont"),
    ({"inner": {"rat": 1}}, r"unknown outer settings \['rat'\] under 'inner'; allowed: \['name', 'rate'\]",
     "inner.rat"),
    ({"count": "3"}, r"outer settings: count='3' must be an integer, got str", "count"),
    ({"count": True}, r"count=True must be an integer, got bool", "count"),
    ({"inner": {"rate": "high"}}, r"inner.rate='high' must be a number, got str", "inner.rate"),
    ({"inner": {"rate": 2}}, r"^inner: rate=2: must be in \[0, 1\]$", "inner"),
    ({"by_name": {"k": {"rate": -1}}}, r"^by_name.k: rate=-1", "by_name.k"),
    ({"tags": "a"}, r"tags='a' must be a list, got str", "tags"),
    ({"tags": ["a", 2]}, r"tags\[1\]=2 must be a string", "tags[1]"),
    ({"pairs": [1]}, r"pairs=\[1\] must have 2 items", "pairs"),
    ({"mode": "medium"}, r"mode='medium' is not one of \['fast', 'slow'\]", "mode"),
    ({"color": "green"}, r"color='green' is not one of \['RED', 'BLUE'\]", "color"),
    ({"limit": 1.5}, r"limit=1.5 must be an integer or null", "limit"),
    ({"inner": [1]}, r"inner must be a mapping of keys to values, got list", "inner"),
    ({"maybe": 3}, r"maybe must be a mapping", "maybe"),
])
def test_every_failure_is_one_config_error_naming_the_key_path(data, message, key) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        from_dict(Outer, data, what="outer settings")
    assert e.value.metadata["configKey"] == key


def test_a_path_prefixes_every_key_and_missing_required_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"settings.outer.inner: rate=5") as e:
        from_dict(Outer, {"inner": {"rate": 5}}, path="settings.outer")
    assert e.value.metadata["configKey"] == "settings.outer.inner"
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['required'\]"):
        from_dict(Needs, {})
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        from_dict(Needs, [("required", 1)])  # type: ignore[arg-type]


def test_a_top_level_post_init_message_is_kept_as_it_is() -> None:
    with pytest.raises(ValueError, match="^rate=3: must be in") as direct:
        Inner(rate=3)
    with pytest.raises(ConfigError) as built:
        from_dict(Inner, {"rate": 3})
    assert str(built.value) == str(direct.value)
    assert not isinstance(direct.value, ConfigError)


def test_a_custom_error_factory_gets_the_key_path() -> None:
    def error(message: str, key: str) -> Exception:
        return InvalidArgumentError(message, field=f"config.{key}")

    with pytest.raises(InvalidArgumentError) as e:
        from_dict(Outer, {"inner": {"rate": 9}}, error=error)
    assert e.value.field == "config.inner"


@dataclass(kw_only=True, frozen=True)
class _Window:
    lo: int = 0
    hi: int = 1

    def __post_init__(self) -> None:
        if self.hi <= self.lo:
            raise FieldError("hi", f"{self.hi} must be above lo={self.lo}")


@dataclass(kw_only=True, frozen=True)
class _Outer:
    window: _Window = field(default_factory=_Window)
    span: int = 1

    def __post_init__(self) -> None:
        if self.span > self.window.hi:
            raise FieldError("window.hi", f"{self.window.hi} must be at least span={self.span}")


def test_a_field_error_names_its_field_in_the_key_path() -> None:
    with pytest.raises(ValueError, match="^hi: 0 must be above lo=0$"):
        _Window(hi=0)
    with pytest.raises(ConfigError, match=r"^outer\.window\.hi: 0 must be above lo=0$") as e:
        from_dict(_Outer, {"window": {"hi": 0}}, path="outer")
    assert e.value.metadata["configKey"] == "outer.window.hi"
    with pytest.raises(ConfigError) as e:  # a cross-field check of the outer dataclass
        from_dict(_Outer, {"span": 3})
    assert e.value.metadata["configKey"] == "window.hi"
    assert str(e.value) == "window.hi: 1 must be at least span=3"


def test_replace_turns_validation_failures_into_config_errors() -> None:
    assert replace(Inner(), rate=0.0).rate == 0.0
    with pytest.raises(ConfigError, match="Inner: rate=7"):
        replace(Inner(), rate=7)


# --------------------------------------------------------------------------- protobuf


@dataclass(kw_only=True, frozen=True)
class Budget:
    max_seeds: int = 4
    max_added_parameters: int = 0


@dataclass(kw_only=True, frozen=True)
class Optimizer:
    name: str = "adamw"
    learning_rate: float = 3e-3
    warmup_epochs: int = 0


@dataclass(kw_only=True, frozen=True)
class Run:
    """A subset of tolaria's RunConfig, to show the mapping is derived from names."""

    job: str = ""
    job_params: Mapping[str, str] = field(default_factory=dict)
    sites: tuple[str, ...] = ()
    budget: Budget = field(default_factory=Budget)
    optimizer: Optimizer = field(default_factory=Optimizer)
    epochs: int = 20
    width: float = 1.0
    decide_timeout_s: float = 0.5
    not_on_the_wire: str = "kept"


NAMES = {"decide_timeout_s": "decide_timeout"}


def test_a_config_and_a_message_of_the_same_field_names_map_both_ways() -> None:
    run = Run(job="mnist1d", job_params={"host": "cnn"}, sites=("a", "b"),
              budget=Budget(max_seeds=2, max_added_parameters=100),
              optimizer=Optimizer(name="sgd", learning_rate=0.1, warmup_epochs=1), epochs=7,
              width=2.0, decide_timeout_s=1.25)
    msg = to_message(run, tpb.RunConfig(), names=NAMES)
    assert msg.job == "mnist1d" and dict(msg.job_params) == {"host": "cnn"}
    assert list(msg.sites) == ["a", "b"] and msg.budget.max_seeds == 2
    assert msg.optimizer.name == "sgd" and msg.decide_timeout.ToMilliseconds() == 1250
    back = from_message(Run, msg, names=NAMES, zero_is_default=("width",))
    assert back == run


def test_unset_message_fields_and_listed_zero_values_take_the_defaults() -> None:
    back = from_message(Run, tpb.RunConfig(job="digits", epochs=3), names=NAMES,
                        zero_is_default=("width",))
    assert back == Run(job="digits", epochs=3)


@dataclass(kw_only=True, frozen=True)
class CheckedBudget:
    max_seeds: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.max_seeds <= 1024:
            raise ValueError(f"max_seeds={self.max_seeds}: must be in [0, 1024]")


def test_a_message_goes_through_the_same_validation() -> None:
    with pytest.raises(ConfigError, match=r"^budget: max_seeds=5000: must be in") as e:
        from_message(CheckedBudget, tpb.GrowthBudget(max_seeds=5000), path="budget")
    assert e.value.metadata["configKey"] == "budget"
