"""The governor's boundaries, pinned (mutants of governor.py that survived the suite).

An explosion is `loss > explosion_factor × median` of the last `window` healthy losses,
once `min_history` of them are known, and never against a zero median. Each test sits on
one of those edges, where an off-by-one or a flipped comparison changes the answer.
"""

from __future__ import annotations

import math

import pytest
import torch

from esper.errors import ConfigError
from esper.tolaria.governor import Governor, GovernorConfig, RunDivergedError


def _fed(losses, **cfg) -> Governor:
    g = Governor(GovernorConfig(**cfg))
    for loss in losses:
        assert g.check(loss) is None, loss
    return g


def test_the_explosion_test_applies_from_exactly_min_history_losses() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3)
    assert g.check(50.0) is not None
    g = _fed([1.0, 1.0], explosion_factor=5.0, min_history=3)
    assert g.check(50.0) is None  # two losses are too few to call anything an explosion


def test_a_loss_of_exactly_factor_times_the_median_is_not_an_explosion() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3)
    assert g.check(5.0) is None
    assert g.check(5.0001) is not None


def test_small_medians_count_and_a_zero_median_never_calls_an_explosion() -> None:
    g = _fed([0.5, 0.5, 0.5], explosion_factor=5.0, min_history=3)
    assert "median 0.5" in (g.check(10.0) or "")
    g = _fed([0.0, 0.0, 0.0], explosion_factor=5.0, min_history=3)
    assert g.check(1.0) is None


def test_the_median_is_over_the_last_window_losses_only() -> None:
    g = _fed([100.0, 100.0, 100.0, 1.0, 1.0, 1.0], explosion_factor=5.0, window=3, min_history=3)
    # Over the last 3 the median is 1 (20 explodes); over all 6 it would be 50.5.
    why = g.check(20.0)
    assert why is not None and "median 1 of the last 3 steps" in why


def test_a_rollback_forgets_the_recent_losses() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3, max_rollbacks=2)
    g.remember(1, {"w": torch.ones(1)}, {"state": {}, "param_groups": []})
    g.begin_rollback("loss 50 exceeds ...")
    assert g.check(50.0) is None  # judged afresh: no history left


def test_max_rollbacks_zero_means_the_first_unhealthy_step_fails_the_run() -> None:
    g = Governor(GovernorConfig(max_rollbacks=0))
    g.remember(1, {"w": torch.ones(1)}, {"state": {}, "param_groups": []})
    with pytest.raises(RunDivergedError, match="after 0 rollbacks"):
        g.begin_rollback("loss is nan")


@pytest.mark.parametrize("ok", [
    {"explosion_factor": 1.5}, {"explosion_factor": 2}, {"window": 1}, {"min_history": 1}, {"max_rollbacks": 0},
])
def test_the_smallest_allowed_settings_are_accepted(ok: dict) -> None:
    cfg = GovernorConfig(**ok)
    for k, v in ok.items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize(("bad", "named"), [
    ({"explosion_factor": True}, "explosion_factor=True"),
    ({"explosion_factor": "5"}, "explosion_factor='5'"),
    ({"explosion_factor": math.inf}, "explosion_factor=inf"),
    ({"explosion_factor": math.nan}, "explosion_factor=nan"),
    ({"explosion_factor": 1.0}, "explosion_factor=1.0"),
    ({"window": 0}, "window=0 must be an integer >= 1"),
    ({"window": True}, "window=True"),
    ({"window": "3"}, "window='3'"),
    ({"window": 2.0}, "window=2.0"),
    ({"min_history": 0}, "min_history=0 must be an integer >= 1"),
    ({"max_rollbacks": -1}, "max_rollbacks=-1 must be an integer >= 0"),
])
def test_bad_settings_are_refused_naming_the_value(bad: dict, named: str) -> None:
    with pytest.raises(ConfigError) as e:
        GovernorConfig(**bad)
    assert named in str(e.value)


def test_every_rollback_counts_towards_max_rollbacks() -> None:
    g = Governor(GovernorConfig(max_rollbacks=2))
    g.remember(1, {"w": torch.ones(1)}, {"state": {}, "param_groups": []})
    g.begin_rollback("loss is nan")
    g.begin_rollback("loss is nan")
    assert g.rollbacks == 2
    with pytest.raises(RunDivergedError, match="after 2 rollbacks"):
        g.begin_rollback("loss is nan")
    assert g.rollbacks == 2


def test_the_remembered_model_state_is_a_copy_not_a_view() -> None:
    w = torch.ones(2)
    g = Governor()
    g.remember(3, {"w": w, "extra": {"kernel_id": "k"}}, {"state": {}, "param_groups": []})
    w.add_(1.0)  # training goes on mutating the live tensors
    assert g.good is not None and g.good.epoch == 3
    assert torch.equal(g.good.model["w"], torch.ones(2))
    assert g.good.model["extra"] == {"kernel_id": "k"}
