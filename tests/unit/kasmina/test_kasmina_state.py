"""State: buffers move with `.to()`, checkpoints restore slots, seeds and optimizer state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esper.errors import FailedPreconditionError
from esper.kasmina import KasminaConfig, SeedStage, wrap
from tests.unit.kasmina.kasmina_hosts import ZeroOutSeed, mlp, train_steps

CFG = KasminaConfig(stats_interval=1, incubation=2, gate_interval=1, blend_duration=8, blend_curve="cosine")


class Library:
    """kernel_id → freshly built seed module (what a kernel loader would return)."""

    def __init__(self, mm) -> None:
        self.sig = mm.site_signature("3")
        self.calls: list[str] = []

    def __call__(self, kernel_id: str) -> torch.nn.Module:
        self.calls.append(kernel_id)
        return ZeroOutSeed(self.sig)


def _trained(steps: int = 5):
    torch.manual_seed(0)
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["1", "3"], example_input=x, config=CFG)
    opt = torch.optim.Adam(host.parameters(), lr=0.01)
    mm.attach_optimizer(opt)
    mm.germinate("3", ZeroOutSeed(mm.site_signature("3")), kernel_id="sha256:abc",
                 blueprint_id="bp-x")
    train_steps(mm, opt, x, steps)
    return host, mm, opt, x


def _fresh(library: Library | None = None):
    torch.manual_seed(99)  # different init: everything must come from the checkpoint
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["1", "3"], example_input=x, config=CFG, kernel_resolver=library)
    return host, mm


def test_to_moves_and_casts_slot_state() -> None:
    _host, mm, _opt, _x = _trained()
    mm.to(torch.float64)
    slot = mm.slots["3"]
    assert slot.alpha_ctl.alpha.dtype == torch.float64 and slot.probe.dtype == torch.float64
    assert slot.acc.dtype == torch.float32  # accumulators stay float32 on purpose
    assert slot.stage.dtype == torch.int64 and next(slot.seed.parameters()).dtype == torch.float64
    mm.to("meta")
    assert {b.device.type for b in mm.buffers()} == {"meta"}
    assert {p.device.type for p in mm.parameters()} == {"meta"}


def test_checkpoint_mid_blend_restores_and_continues_the_ramp() -> None:
    _host, mm, _opt, x = _trained(steps=5)
    slot = mm.slots["3"]
    assert slot.current_stage is SeedStage.BLENDING and 0 < slot.alpha < 1
    state = mm.state_dict()
    _, mm2 = _fresh(lib := Library(mm))
    lib.sig = mm2.site_signature("3")
    mm2.load_state_dict(state)
    assert lib.calls == ["sha256:abc"]
    s2 = mm2.slots["3"]
    assert (s2.current_stage, s2.alpha, s2.steps_in_stage, s2.kernel_id, s2.blueprint_id) == (
        slot.current_stage, slot.alpha, slot.steps_in_stage, "sha256:abc", "bp-x")
    assert mm2.global_step == mm.global_step == 5
    mm.eval(), mm2.eval()
    assert torch.equal(mm(x), mm2(x))
    for _ in range(10):
        mm.step()
        mm2.step()
        assert mm2.slots["3"].alpha == mm.slots["3"].alpha
        assert mm2.slots["3"].current_stage is mm.slots["3"].current_stage
    assert mm2.slots["3"].current_stage is SeedStage.HOLDING


def test_checkpoint_through_safetensors_and_json_without_pickle(tmp_path) -> None:
    _host, mm, _opt, x = _trained(steps=4)
    state = mm.state_dict()
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    extras = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert set(extras) == {"seed_slots.1._extra_state", "seed_slots.3._extra_state"}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "extra.json").write_text(json.dumps(extras))
    _, mm2 = _fresh(Library(mm))
    restored = {**load_file(tmp_path / "model.safetensors"),
                **json.loads((tmp_path / "extra.json").read_text())}
    mm2.load_state_dict(restored)
    mm.eval(), mm2.eval()
    assert torch.equal(mm(x), mm2(x))


def test_checkpoint_with_a_seed_needs_a_kernel_resolver() -> None:
    _host, mm, _opt, _x = _trained(steps=1)
    _, mm2 = _fresh(None)
    with pytest.raises(FailedPreconditionError, match="sha256:abc.*kernel_resolver"):
        mm2.load_state_dict(mm.state_dict())


def test_optimizer_state_of_seeds_survives_a_checkpoint() -> None:
    _host, mm, opt, x = _trained(steps=4)
    # deepcopy: a real checkpoint is serialized; state_dict() shares the state tensors
    model_state, opt_state = copy.deepcopy(mm.state_dict()), copy.deepcopy(opt.state_dict())
    host2, mm2 = _fresh(Library(mm))
    mm2.load_state_dict(model_state)
    opt2 = torch.optim.Adam(host2.parameters(), lr=0.01)
    mm2.attach_optimizer(opt2)
    opt2.load_state_dict(opt_state)
    seed, seed2 = mm.slots["3"].seed, mm2.slots["3"].seed
    for p, q in zip(seed.parameters(), seed2.parameters(), strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], opt2.state[q]["exp_avg"])
    train_steps(mm, opt, x, 2)
    train_steps(mm2, opt2, x, 2)
    for p, q in zip(mm.parameters(), mm2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loading_a_dormant_checkpoint_removes_a_live_seed_and_its_group() -> None:
    torch.manual_seed(0)
    host = mlp()
    x = torch.randn(32, 8)
    dormant = wrap(host, sites=["1", "3"], example_input=x, config=CFG).state_dict()
    host, mm, opt, x = _trained(steps=1)
    mm.load_state_dict(dormant)
    assert mm.slots["3"].current_stage is SeedStage.DORMANT and mm.slots["3"].seed is None
    assert len(opt.param_groups) == 1
