"""The governor's boundaries, pinned (each edge an off-by-one or a flipped comparison moves).

A finite loss is *divergent* when `loss > explosion_factor × baseline` (the EMA of healthy
losses, their plain mean while fewer than `window` are known), once `min_history` healthy
losses are known; `patience` divergent steps in a row are a divergence; NaN/Inf is one at
once. Divergent steps do not feed the baseline.
"""

from __future__ import annotations

import math

import pytest
import torch

from esper.tolaria.governor import Governor, GovernorConfig, RunDivergedError


def _fed(losses, **cfg) -> Governor:
    g = Governor(GovernorConfig(**cfg))
    for loss in losses:
        assert g.check(loss) is None, loss
    return g


def test_the_explosion_test_applies_from_exactly_min_history_losses() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3, patience=1)
    assert g.check(50.0) is not None
    g = _fed([1.0, 1.0], explosion_factor=5.0, min_history=3, patience=1)
    assert g.check(50.0) is None  # two losses are too few to call anything divergent


def test_a_loss_of_exactly_factor_times_the_baseline_is_not_divergent() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3, patience=1)
    assert g.check(5.0) is None
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3, patience=1)
    assert g.check(5.0001) is not None


def test_a_divergence_takes_patience_divergent_steps_in_a_row() -> None:
    g = _fed([1.0] * 10, explosion_factor=5.0, patience=3)
    assert g.check(50.0) is None and g.check(50.0) is None  # two: noise so far
    why = g.check(50.0)
    assert why is not None and "for 3 steps in a row (50, 50, 50)" in why
    # A healthy step between them starts the count again.
    g = _fed([1.0] * 10, explosion_factor=5.0, patience=3)
    for loss in (50.0, 50.0, 1.0, 50.0, 50.0):
        assert g.check(loss) is None, loss
    assert g.check(50.0) is not None


def test_nan_and_inf_are_a_divergence_at_once_even_before_any_history() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        assert Governor(GovernorConfig(min_history=5, patience=5)).check(bad) == f"loss is {bad}"


def test_the_baseline_is_the_plain_mean_first_then_an_ema_and_divergent_steps_do_not_feed_it() -> None:
    g = _fed([1.0, 3.0], window=10, patience=2)
    assert g.baseline == pytest.approx(2.0)  # mean of the first two
    assert g.check(100.0) is None  # divergent (> 10 × 2): not taken in
    assert g.baseline == pytest.approx(2.0) and g.seen == 2
    assert g.check(2.0) is None
    assert g.baseline == pytest.approx(2.0) and g.seen == 3 and g.streak == []
    g = _fed([1.0] * 20, window=3)  # beyond `window` losses the weight is 2 / (window + 1)
    g.check(3.0)
    assert g.baseline == pytest.approx(1.0 + 0.5 * 2.0)


def test_small_baselines_count_and_a_zero_baseline_calls_any_positive_loss_divergent() -> None:
    g = _fed([0.5, 0.5, 0.5], explosion_factor=5.0, min_history=3, patience=1)
    assert "moving average 0.5" in (g.check(10.0) or "")
    g = _fed([0.0, 0.0, 0.0], explosion_factor=5.0, min_history=3, patience=1)
    assert g.check(0.0) is None


def test_a_rollback_forgets_the_recent_losses() -> None:
    g = _fed([1.0, 1.0, 1.0], explosion_factor=5.0, min_history=3, max_rollbacks=2, patience=1)
    g.remember(1, {"w": torch.ones(1)}, {"state": {}, "param_groups": []})
    g.begin_rollback("loss above ...")
    assert g.check(50.0) is None  # judged afresh: no history left
    assert g.seen == 1 and g.baseline == 50.0


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
    with pytest.raises(ValueError) as e:  # direct construction: the config convention's ValueError
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
