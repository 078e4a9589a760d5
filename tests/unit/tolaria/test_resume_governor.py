"""Checkpoints resume bit for bit; the governor rolls back on NaN."""

from __future__ import annotations

import os
import threading

import torch

from esper.kasmina import SeedStage
from esper.tolaria import checkpoint as ckpt

from .conftest import tiny_config

PLAN = {1: [("GERMINATE", "act2", "bottleneck_mlp")], 3: [("GERMINATE", "act1", "lowrank_adapter")]}


def final_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in trainer.model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_resume_is_bit_identical(make_trainer) -> None:
    config = tiny_config(epochs=4)
    straight, _ = make_trainer(config, plan=PLAN)
    straight.run()

    first, _ = make_trainer(config, plan=PLAN, ckpt="a")
    for _ in range(2):
        first.train_epoch()
        first.evaluate()
        first.maybe_control()
        first.maybe_checkpoint()
    assert [e for e, _ in ckpt.list_checkpoints(first.checkpointer.directory)] == [1, 2]
    assert first.model.slots["act2"].current_stage is not SeedStage.DORMANT

    second, _ = make_trainer(config, plan=PLAN, ckpt="a")
    assert second.resume()
    assert second.epoch == 2 and second.model.slots["act2"].seed is not None
    result = second.run()
    a, b = final_state(straight), final_state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert result.history.val_loss == straight.history.val_loss
    assert result.train_flops == straight.flops.total
    assert second.model.slots["act1"].current_stage is straight.model.slots["act1"].current_stage


def test_stop_mid_epoch_then_resume_is_bit_identical(make_trainer) -> None:
    config = tiny_config(epochs=3)
    straight, _ = make_trainer(config, plan=PLAN)
    straight.run()

    stop = threading.Event()
    first, _ = make_trainer(config, plan=PLAN, ckpt="b", stop=stop)
    first.train_epoch()
    first.evaluate()
    first.maybe_control()
    batches_done = []
    original = first._train_step

    def step_then_maybe_stop(x, y):
        loss = original(x, y)
        batches_done.append(1)
        if len(batches_done) == 5:
            stop.set()
        return loss

    first._train_step = step_then_maybe_stop
    result = first.run()
    assert not result.completed and first._step_in_epoch == 5

    second, _ = make_trainer(config, plan=PLAN, ckpt="b")
    assert second.resume() and second._step_in_epoch == 5
    second.run()
    a, b = final_state(straight), final_state(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_write_is_atomic_and_pickle_free(tmp_path) -> None:
    path = ckpt.checkpoint_path(tmp_path, 3)
    ckpt.save(path, {"w": torch.arange(4.0)}, {"epoch": 3})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000003.safetensors"]
    tensors, meta = ckpt.load(path)
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta["epoch"] == 3
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle stream
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    flat, structure = ckpt.flatten(opt.state_dict(), "o/")
    back = ckpt.unflatten(flat, structure)
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["param_groups"][0]["lr"] == 0.1


def test_governor_rolls_back_on_nan_prunes_seeds_and_resets_optimizer(make_trainer) -> None:
    plan = {1: [("GERMINATE", "act2", "bottleneck_mlp")]}
    trainer, events = make_trainer(tiny_config(epochs=4), plan=plan)
    trainer.train_epoch()
    trainer.evaluate()
    trainer.maybe_control()
    good_host = {k: v.clone() for k, v in trainer.model.host.state_dict().items()}
    assert trainer.optimizer.state  # AdamW moments of the host after epoch 1
    with torch.no_grad():
        for p in trainer.model.slots["act2"].seed.parameters():
            p.fill_(float("inf"))
    trainer.train_epoch()
    slot = trainer.model.slots["act2"]
    assert slot.current_stage in (SeedStage.PRUNED, SeedStage.EMBARGOED, SeedStage.RESETTING)
    assert slot.seed is None
    for k, v in trainer.model.host.state_dict().items():
        assert torch.equal(v, good_host[k]), k
    assert not trainer.optimizer.state
    assert trainer.governor.rollbacks == 1
    rollback = [e.degradation for e in events if e.WhichOneof("payload") == "degradation"]
    assert rollback and rollback[0].component == "governor" and rollback[0].kind == "rollback"
    assert "loss is nan" in rollback[0].detail and "act2" in rollback[0].detail
    result = trainer.run()
    assert result.completed and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_governor_detects_explosions_and_limits_rollbacks() -> None:
    """NaN/Inf at once; a finite explosion once it lasts `patience` steps (a single noisy
    step is not one: see test_governor.py); rollbacks judge afresh and are limited."""
    import pytest

    from esper.tolaria.governor import Governor, GovernorConfig, RunDivergedError

    g = Governor(GovernorConfig(explosion_factor=5.0, window=10, patience=2, max_rollbacks=1))
    with pytest.raises(RunDivergedError, match="before any known-good state"):
        g.begin_rollback("loss is nan")
    assert g.check(float("inf")) == "loss is inf"
    for loss in (1.0, 1.2, 0.8):
        assert g.check(loss) is None
    assert g.baseline == pytest.approx(1.0)  # the first losses' plain mean
    assert g.check(60.0) is None  # one step above 5 x the average: not yet
    why = g.check(70.0)
    assert why is not None and "5 × its moving average 1 for 2 steps in a row (60, 70)" in why
    g.remember(2, {"w": torch.ones(2)}, {"state": {}, "param_groups": []})
    assert g.begin_rollback(why).epoch == 2 and g.rollbacks == 1
    # The restored epoch's loss level starts a new baseline instead of being judged by the old one.
    assert g.check(4.0) is None and g.check(4.5) is None and g.baseline == pytest.approx(4.25)
    with pytest.raises(RunDivergedError, match="after 1 rollbacks"):
        g.begin_rollback("loss is nan")
    with pytest.raises(ValueError, match="explosion_factor=1"):
        GovernorConfig(explosion_factor=1)


def test_resume_refuses_a_checkpoint_of_another_config(make_trainer) -> None:
    import pytest

    from esper.errors import FailedPreconditionError

    first, _ = make_trainer(tiny_config(epochs=1), ckpt="c")
    first.run()
    other, _ = make_trainer(tiny_config(epochs=1, batch_size=64), ckpt="c")
    with pytest.raises(FailedPreconditionError, match="batch_size"):
        other.resume()


def test_nested_state_round_trips_through_named_tensors_and_json(tmp_path) -> None:
    from esper.tolaria.checkpoint import CheckpointConfig, read_state

    state = {"opt": {"state": {0: {"step": torch.tensor(3.0)}, 7: {}}, "betas": (0.9, 0.99)},
             "rng": (3, (1, 2, 3), None), "loss": float("nan"), "names": ["a", {"b": torch.ones(2)}]}
    saver = CheckpointConfig(directory=tmp_path, every=2, keep=1).build()
    assert saver.due(4, last=False) and not saver.due(3, last=False) and saver.due(3, last=True)
    saver.save(1, state)
    path = saver.save(2, state)
    assert saver.latest() == path and len(list(tmp_path.iterdir())) == 1  # keep=1
    back = read_state(path)
    assert set(back["opt"]["state"]) == {0, 7} and torch.equal(back["opt"]["state"][0]["step"], torch.tensor(3.0))
    assert back["opt"]["betas"] == (0.9, 0.99) and back["rng"] == (3, (1, 2, 3), None)
    assert torch.equal(back["names"][1]["b"], torch.ones(2)) and back["names"][0] == "a"
    import math

    assert math.isnan(back["loss"])


def test_the_governor_keeps_its_rollbacks_and_judgement_across_a_resume() -> None:
    from esper.tolaria.governor import Governor, GovernorConfig

    cfg = GovernorConfig(explosion_factor=5.0, min_history=3, window=4, patience=3)
    g = Governor(cfg)
    for loss in (1.0, 1.0, 2.0, 1.0, 1.0, 50.0, 50.0):  # two divergent steps in a row so far
        assert g.check(loss) is None
    g.rollbacks = 2
    again = Governor(cfg)
    again.load_state_dict(g.state_dict())
    assert again.rollbacks == 2 and again.state_dict() == g.state_dict()
    assert again.state_dict()["streak"] == [50.0, 50.0] and again.seen == 5
    assert again.check(50.0) is not None  # the third in a row: the streak survived the resume
