"""The training loop: epochs, growth through Kasmina, rejected decisions, events, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from esper.errors import UnavailableError
from esper.jobs.errors import JobConfigError
from esper.kasmina import SeedStage
from generated.esper.common.v1 import decision_pb2, health_pb2

from .conftest import tiny_config


def payloads(events, kind: str):
    return [getattr(e, kind) for e in events if e.WhichOneof("payload") == kind]


def test_two_epochs_train_and_report(make_trainer) -> None:
    trainer, events = make_trainer(tiny_config(epochs=2))
    result = trainer.run()
    assert result.completed and result.epochs == 2
    assert len(result.history.val_accuracy) == 2 and len(result.history.train_loss) == 2
    assert result.history.train_loss[1] < result.history.train_loss[0]
    assert 0.0 <= result.test_accuracy <= 1.0 and math.isfinite(result.test_loss)
    assert result.parameters == trainer.host_parameters == 123
    metrics = payloads(events, "epoch_metrics")
    assert [m.epoch for m in metrics] == [1, 2]
    assert metrics[-1].train_flops == result.train_flops > 0
    # The cosine schedule is at 0 on the last step: the last recorded lr is the final step's.
    assert trainer.scheduler.lr_lambdas[0](trainer.total_steps - 1) == 0.0
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.event_id for e in events}) == len(events)


def test_germination_attaches_a_seed_that_trains_and_preserves_output(make_trainer) -> None:
    plan = {1: [("GERMINATE", "act2", "bottleneck_mlp")]}
    trainer, events = make_trainer(tiny_config(epochs=4), plan=plan)
    trainer.train_epoch()
    trainer.evaluate()
    x = next(iter(trainer.job.val_loader))[0][:64]  # the job's validation rows
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(x)
    trainer.maybe_control()
    with torch.no_grad():
        after = trainer.model(x)
    trainer.model.train()
    assert torch.max(torch.abs(after - before)).item() <= 1e-6
    slot = trainer.model.slots["act2"]
    assert slot.current_stage is SeedStage.TRAINING and slot.seed is not None
    initial = {n: p.detach().clone() for n, p in slot.seed.named_parameters()}
    seed_group = [g for g in trainer.optimizer.param_groups if g.get("kasmina_slot") == "act2"]
    assert len(seed_group) == 1
    result = trainer.run()
    changed = [n for n, p in slot.seed.named_parameters() if not torch.equal(p, initial[n])]
    assert changed, "the seed's parameters never changed"
    assert result.parameters > trainer.host_parameters
    stages = [(e.from_stage, e.to_stage) for e in payloads(events, "lifecycle") if e.slot_id == "act2"]
    assert (SeedStage.DORMANT, SeedStage.GERMINATED) in stages
    assert (SeedStage.TRAINING, SeedStage.BLENDING) in stages
    decision = payloads(events, "decision")[0]
    assert decision.decisions[0].kind == decision_pb2.DECISION_KIND_GERMINATE
    assert dict(decision.rejected) == {}


def test_illegal_decisions_are_recorded_not_fatal(make_trainer) -> None:
    plan = {1: [("PRUNE", "act1", ""), ("FOSSILIZE", "nope", ""),
                ("GERMINATE", "act1", "norm_scale"), ("GERMINATE", "act1", "norm_scale")]}
    trainer, events = make_trainer(tiny_config(epochs=2), plan=plan)
    result = trainer.run()
    assert result.completed
    rejected = dict(payloads(events, "decision")[0].rejected)
    assert set(rejected) == {0, 1, 3}
    assert "ILLEGAL_TRANSITION" in rejected[0]
    assert "no slot 'nope'" in rejected[1] and "act1" in rejected[1]
    assert "germinate is not legal" in rejected[3]
    assert trainer.model.slots["act1"].current_stage is not SeedStage.DORMANT


def test_controller_failure_degrades_and_the_run_continues(make_trainer) -> None:
    class Down:
        component = "tamiyo"  # degradations name the controller's component

        def decide(self, snapshot: health_pb2.HealthSnapshot, candidates) -> list[decision_pb2.Decision]:
            raise UnavailableError("tamiyo at 127.0.0.1:1 is unreachable")

    trainer, events = make_trainer(tiny_config(epochs=3), controller=Down())
    result = trainer.run()
    assert result.completed and result.epochs == 3
    degradations = payloads(events, "degradation")
    assert [d.component for d in degradations] == ["tamiyo", "tamiyo"]
    assert "unreachable" in degradations[0].detail and degradations[0].kind == "unavailable"


def test_snapshot_has_slots_budget_histories_and_graph(make_trainer) -> None:
    plan = {1: [("GERMINATE", "act1", "bottleneck_mlp")]}
    trainer, _ = make_trainer(tiny_config(epochs=3, budget={"max_seeds": 2, "max_added_parameters": 500}),
                              plan=plan)
    trainer.run()
    snaps = trainer.controller.snapshots
    assert [s.epoch for s in snaps] == [1, 2]
    first, second = snaps
    assert [s.slot_id for s in first.slots] == ["act1", "act2"]
    assert first.seeds_left == 2 and second.seeds_left == 1
    seed_params = second.total_parameters - second.host_parameters
    assert seed_params > 0 and second.parameters_left == 500 - seed_params
    assert len(second.val_loss_history) == 2 and second.task == "spirals"
    names = [n.name for n in second.graph.nodes]
    assert names == ["flatten", "fc1", "act1", "act1/slot", "fc2", "act2", "act2/slot", "head"]
    assert len(second.graph.edges) == len(names) - 1
    slot_node = second.graph.nodes[3]
    assert slot_node.kind == "slot" and slot_node.parameters == seed_params


def test_flops_count_forward_and_backward_and_grow_with_seeds(make_trainer) -> None:
    plan = {1: [("GERMINATE", "act1", "bottleneck_mlp")]}
    trainer, _ = make_trainer(tiny_config(epochs=3), plan=plan)
    trainer.train_epoch()
    # 2-8-8-3 MLP: forward 2·(2·8 + 8·8 + 8·3) per sample; backward computes weight
    # gradients for all three layers and input gradients for the last two.
    forward = 2 * (2 * 8 + 8 * 8 + 8 * 3)
    backward = 2 * (2 * 8 + 8 * 8 + 8 * 3) + 2 * (8 * 8 + 8 * 3)
    assert trainer.flops.per_sample == forward + backward
    assert trainer.flops.total == (forward + backward) * len(trainer.job.train_loader.dataset)
    host_epoch = trainer.flops.total
    trainer.evaluate()
    trainer.maybe_control()
    assert trainer.flops.per_sample is None  # germination changed the topology
    trainer.train_epoch()
    assert trainer.flops.total - host_epoch > host_epoch
    assert trainer.flops.measurements >= 2


def test_bad_site_lists_available_modules(make_trainer) -> None:
    # Site resolution is the jobs layer's now (any job's model): its JobConfigError.
    with pytest.raises(JobConfigError, match="available: flatten, fc1, act1, fc2, act2, head") as e:
        make_trainer(tiny_config(sites=["act9"]))
    assert e.value.field == "sites[0]"


def test_schedule_warms_up_then_decays_to_exactly_zero(make_trainer) -> None:
    trainer, _ = make_trainer(tiny_config(epochs=3, optimizer={"learning_rate": 0.02, "warmup_epochs": 1}))
    spe = trainer.steps_per_epoch
    assert spe == 17  # 2100 spirals / batch 128
    f = trainer.scheduler.lr_lambdas[0]  # the schedule's factor at a batch position
    assert f(0) == pytest.approx(1 / spe) and f(spe - 1) == 1.0
    assert f(spe) == 1.0 and 0.0 < f(2 * spe) < 1.0
    assert f(trainer.total_steps - 1) == 0.0
    trainer.run()
    assert trainer.history.learning_rate[-1] == 0.0


def test_kernel_source_down_defers_growth_then_recovers(make_trainer) -> None:
    from esper.grow import BuiltinKernels

    plan = {1: [("GERMINATE", "act1", "bottleneck_mlp")], 2: [("GERMINATE", "act1", "bottleneck_mlp")]}
    builtin = BuiltinKernels()
    calls = []

    class Flaky:
        """Urza is down for the first fetch, then answers (the built-in catalog)."""

        component = "urza"

        def candidates(self, site):
            return builtin.candidates(site)

        def load(self, kernel_id, site=None):
            calls.append(kernel_id)
            if len(calls) == 1:
                raise UnavailableError("urza at 127.0.0.1:1 is unreachable")
            return builtin.load(kernel_id, site)

    trainer, events = make_trainer(tiny_config(epochs=3), plan=plan, kernels=Flaky())
    result = trainer.run()
    assert result.completed and len(calls) == 2
    decisions = payloads(events, "decision")
    assert "kernel unavailable" in decisions[0].rejected[0]
    assert dict(decisions[1].rejected) == {}
    assert [(d.component, d.kind) for d in payloads(events, "degradation")] == [
        ("urza", "unavailable"), ("urza", "recovered")]
    assert trainer.model.slots["act1"].seed is not None


def test_any_job_trains_and_grows_at_type_sites(make_trainer) -> None:
    """A job function's own non-Sequential model, sites given as a module type, its own
    loaders, loss and metric: the trainer needs nothing else, and a seed grows there."""
    from esper.jobs.registry import JobRegistry

    reg = JobRegistry.discover({"two-branch": "tests.unit.jobs.sample_jobs:tiny"}, entry_points=False)
    cfg = tiny_config(task="spirals", epochs=3).replace(job="two-branch", job_params={"hidden": "6"})
    from esper.tolaria.trainer import build_job

    job = build_job(cfg, reg)
    trainer, events = make_trainer(cfg, plan={1: [("GERMINATE", "mix", "bottleneck_mlp")]}, job=job)
    assert list(trainer.model.slots) == ["mix"] and trainer.steps_per_epoch == 96 // 128 + 1
    result = trainer.run()
    assert result.completed and result.epochs == 3 and 0.0 <= result.val_accuracy <= 1.0
    assert math.isnan(result.test_accuracy)  # the job has no test loader
    assert trainer.model.slots["mix"].current_stage != SeedStage.DORMANT
    assert result.parameters > trainer.host_parameters
    assert payloads(events, "health")[0].task == "two-branch"
