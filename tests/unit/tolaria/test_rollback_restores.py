"""A rollback really restores the model: a finite loss explosion whose step was applied.

A non-finite step is never applied to the weights, so after a NaN the host is unchanged
whether or not anything was restored. Here the loss explodes but stays finite: the
optimizer step runs on the exploded gradients and damages the weights, and only a real
restore brings them back to the last-known-good ones.

Written against the run's public surface: the host model (a forward hook injects the
explosion), the event sink (where the last-good weights and the weights at the rollback
are read) and `run()`.
"""

from __future__ import annotations

import torch

from esper.tolaria.trainer import build_job

from .conftest import tiny_config

# The explosion: logits × 1e4 make the cross-entropy ~1e4 times the healthy one (finite).
_BLOW_UP = 1e4


def _host_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.host.state_dict().items()}


def test_finite_explosion_is_rolled_back_to_the_last_good_weights(make_trainer) -> None:
    armed = {"on": False}

    def explode_when_armed(host: torch.nn.Module) -> None:
        def hook(_module, _args, out):
            return out * _BLOW_UP if armed["on"] else out

        host.head.register_forward_hook(hook)

    seen: dict[str, object] = {}
    trainer_box: list = []

    def sink(env) -> None:
        trainer = trainer_box[0]
        kind = env.WhichOneof("payload")
        if kind == "epoch_metrics" and env.epoch_metrics.epoch == 1:
            # Epoch 1's boundary is healthy: these weights are the last-known-good ones.
            seen["good"] = _host_weights(trainer)
            armed["on"] = True  # the first step of epoch 2 explodes
        elif kind == "degradation" and env.degradation.component == "governor":
            armed["on"] = False
            seen["rollback"] = env.degradation
            seen["after"] = _host_weights(trainer)
            seen["stages"] = {s: slot.current_stage.name for s, slot in trainer.model.slots.items()}
        elif kind == "lifecycle":
            seen.setdefault("lifecycle", []).append(env.lifecycle)

    plan = {1: [("GERMINATE", "act2", "bottleneck_mlp")]}
    config = tiny_config(epochs=3)
    job = build_job(config)  # the trainer takes the job as given: the hook is on its model
    explode_when_armed(job.model)
    trainer, _events = make_trainer(config, plan=plan, job=job)
    trainer_box.append(trainer)
    trainer.event_sink = sink
    result = trainer.run()

    assert result.completed and result.rollbacks == 1
    rollback = seen["rollback"]
    assert rollback.kind == "rollback"
    # Finite: the governor saw losses above its moving average for `patience` steps, not a NaN/Inf.
    assert "moving average" in rollback.detail and "loss is" not in rollback.detail, rollback.detail
    assert "after epoch 1" in rollback.detail and "act2" in rollback.detail
    good, after = seen["good"], seen["after"]
    assert good.keys() == after.keys()
    for k in good:
        assert torch.equal(after[k], good[k]), f"{k} not restored to the last-good weights"
    # The live seed was pruned by the rollback.
    assert seen["stages"]["act2"] in ("PRUNED", "EMBARGOED", "RESETTING")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
