"""Stages, config and the alpha controller."""

from __future__ import annotations

import itertools

import pytest

from esper.errors import ConfigError, IllegalTransitionError
from esper.kasmina import AlphaController, AlphaCurve, AlphaDirection, KasminaConfig, ScheduleUnit
from esper.kasmina.alpha import curve_value
from esper.kasmina.stages import TRANSITIONS, SeedStage, check_transition
from generated.esper.common.v1 import seed_pb2


def test_seed_stage_values_equal_the_proto_enum() -> None:
    proto = {n: v for n, v in seed_pb2.SeedStage.items() if v != 0}
    assert {f"SEED_STAGE_{s.name}": int(s) for s in SeedStage} == proto


@pytest.mark.parametrize(
    ("src", "dst"),
    [(a, b) for a, b in itertools.product(SeedStage, SeedStage) if b not in TRANSITIONS[a]],
)
def test_every_edge_outside_the_lifecycle_raises(src: SeedStage, dst: SeedStage) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{src.name} → {dst.name}"):
        check_transition("s", src, dst)


def test_lifecycle_edges_match_design() -> None:
    S = SeedStage
    forward = [S.DORMANT, S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING, S.FOSSILIZED]
    for a, b in itertools.pairwise(forward):
        check_transition("s", a, b)
    for s in (S.GERMINATED, S.TRAINING, S.BLENDING, S.HOLDING):
        check_transition("s", s, S.PRUNED)
    for a, b in itertools.pairwise([S.PRUNED, S.EMBARGOED, S.RESETTING, S.DORMANT]):
        check_transition("s", a, b)
    assert TRANSITIONS[S.FOSSILIZED] == frozenset()
    assert sum(len(v) for v in TRANSITIONS.values()) == 5 + 4 + 3


def test_unknown_config_key_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="'blend_steps'") as info:
        KasminaConfig.from_dict({"blend_steps": 10})
    assert "blend_duration" in str(info.value)  # lists what is allowed


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("schedule_unit", "minutes"),
        ("blend_curve", "cubic"),
        ("blend_duration", 0),
        ("incubation", -1),
        ("embargo_epochs", 1.5),
        ("stats_interval", True),
        ("gate_min_seed_grad_norm", float("nan")),
        ("function_preserving_tol", -1.0),
        ("blend_backend", "triton"),
        ("layouts", {"x": "nhwc"}),
        ("fossilize_min_contribution", float("inf")),
    ],
)
def test_bad_config_values_raise_naming_the_value(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        KasminaConfig.from_dict({key: value})


def test_config_round_trips_through_a_dict() -> None:
    cfg = KasminaConfig(blend_curve="cosine", layouts={"a.b": "NLD"}, seed_lr=0.01)
    assert KasminaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.layouts == {"a.b": "nld"}


@pytest.mark.parametrize("curve", list(AlphaCurve))
def test_curves_are_monotone_with_exact_endpoints(curve: AlphaCurve) -> None:
    vals = [curve_value(curve, i / 100) for i in range(101)]
    assert vals[0] == 0.0 and vals[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert curve_value(curve, 0.5) == pytest.approx(0.5, abs=1e-12)  # all three are symmetric


def test_cosine_and_sigmoid_differ_from_linear_inside_the_ramp() -> None:
    assert curve_value(AlphaCurve.COSINE, 0.25) == pytest.approx(0.1464466, abs=1e-6)
    assert curve_value(AlphaCurve.SIGMOID, 0.25) < curve_value(AlphaCurve.COSINE, 0.25) < 0.25


def test_controller_ramps_up_down_and_holds() -> None:
    ctl = AlphaController()
    ctl.start(target=1.0, duration=4, curve=AlphaCurve.LINEAR, unit=ScheduleUnit.STEPS)
    assert ctl.direction is AlphaDirection.UP
    assert not ctl.tick(ScheduleUnit.EPOCHS)  # counts steps only
    seen = []
    while not ctl.done:
        ctl.tick(ScheduleUnit.STEPS)
        seen.append(ctl.value)
    assert seen == [0.25, 0.5, 0.75, 1.0]
    assert float(ctl.alpha) == 1.0
    ctl.start(target=0.0, duration=2, curve=AlphaCurve.LINEAR, unit=ScheduleUnit.EPOCHS)
    assert ctl.direction is AlphaDirection.DOWN
    ctl.tick(ScheduleUnit.EPOCHS)
    assert ctl.value == 0.5 and not ctl.done
    ctl.tick(ScheduleUnit.EPOCHS)
    assert ctl.value == 0.0 and ctl.done
    ctl.hold(0.3)
    assert ctl.direction is AlphaDirection.HOLD and not ctl.tick(ScheduleUnit.STEPS)
    assert ctl.value == 0.3
    with pytest.raises(ConfigError, match="1.5"):
        ctl.start(target=1.5, duration=2, curve=AlphaCurve.LINEAR, unit=ScheduleUnit.STEPS)


def test_controller_state_dict_resumes_mid_ramp() -> None:
    a = AlphaController()
    a.start(target=1.0, duration=10, curve=AlphaCurve.COSINE, unit=ScheduleUnit.STEPS)
    for _ in range(3):
        a.tick(ScheduleUnit.STEPS)
    b = AlphaController()
    b.load_state_dict(a.state_dict())
    assert b.value == a.value and b.elapsed == 3 and b.duration == 10
    for _ in range(4):
        a.tick(ScheduleUnit.STEPS)
        b.tick(ScheduleUnit.STEPS)
    assert b.value == a.value == curve_value(AlphaCurve.COSINE, 0.7)
