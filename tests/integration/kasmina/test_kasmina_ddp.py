"""DDP with two gloo processes: rank 0 decides a germination, every rank applies it at the
same step, and parameters, stages and alphas stay identical across ranks."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from esper.kasmina import KasminaConfig, SeedStage, wrap

WORLD = 2
GERMINATE_AT = 3
STEPS = 14


class _Seed(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(c, 8), nn.Linear(8, c)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(h)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same host on every rank (DDP also broadcasts rank 0's)
        host = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                             nn.Linear(16, 2))
        events: list = []
        mm = wrap(host, sites=["1", "3"], example_input=torch.randn(4, 8),
                  config=KasminaConfig(stats_interval=1, incubation=3, gate_interval=1,
                                       blend_duration=4),
                  event_sink=events.append)
        opt = torch.optim.SGD(host.parameters(), lr=0.05)
        mm.attach_optimizer(opt)
        ddp = DDP(mm, broadcast_buffers=False)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        for step in range(STEPS):
            if step == GERMINATE_AT:
                # Step boundary: rank 0 decides, every rank applies the same decision.
                decision: list = [None]
                if rank == 0:
                    decision[0] = {"slot": "3", "kernel_id": "sha256:ddp", "init_seed": 7}
                dist.broadcast_object_list(decision, src=0)
                d = decision[0]
                torch.manual_seed(d["init_seed"])
                mm.germinate(d["slot"], _Seed(16), kernel_id=d["kernel_id"],
                             blueprint_id="bp-ddp", reason=f"rank 0 decided at step {step}")
                # New parameters: rebuild DDP so its reducer covers them.
                ddp = DDP(mm, broadcast_buffers=False)
            xb = torch.randn(16, 8, generator=data)
            opt.zero_grad()
            ddp(xb).pow(2).mean().backward()
            mm.clip_grad_norms(1.0, 1.0)
            opt.step()
            mm.step()
        flat = torch.cat([p.detach().flatten() for p in mm.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        slot = mm.slots["3"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "max_param_diff": max((g - flat).abs().max().item() for g in gathered),
            "n_params": flat.numel(),
            "stage": int(slot.current_stage),
            "alpha": slot.alpha,
            "transitions": [(e.step, int(e.to_stage)) for e in events if e.kind == "transition"],
            "seed_grad_norm": [h.seed_grad_norm for h in mm.health()][1],
        }))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow
def test_ddp_ranks_apply_the_same_germination_and_stay_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["max_param_diff"] == 0.0 and r1["max_param_diff"] == 0.0
    assert r0["n_params"] > 8 * 16 + 16  # the seed's parameters are included
    assert r0["transitions"] == r1["transitions"]
    # germinated at step 3, gate after 3 more steps, alpha ramps for 4 → HOLDING at step 10
    assert r0["transitions"] == [
        [GERMINATE_AT, SeedStage.GERMINATED], [GERMINATE_AT, SeedStage.TRAINING],
        [GERMINATE_AT + 3, SeedStage.BLENDING], [GERMINATE_AT + 3 + 4, SeedStage.HOLDING],
    ]
    assert r0["stage"] == r1["stage"] == SeedStage.HOLDING
    assert r0["alpha"] == r1["alpha"] == 1.0
    assert r0["seed_grad_norm"] > 0


# ---- parallel slots: the same under DDP, for every parallel-slot blueprint ---------------


class _Block(nn.Module):
    """A residual token block (so a parallel slot can wrap all of it)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.block, self.head = nn.Linear(4, 16), _Block(), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(dim=1))


# layout → (host factory, example input shape, parallel site)
_PARALLEL_HOSTS = {
    "NC": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 2)), (8,), "0:2"),
    "NCL": (lambda: nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(8 * 12, 2)), (2, 12), "2"),
    "NCHW": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(4 * 6 * 6, 2)), (2, 6, 6), "2"),
    "NLD": (_Tokens, (5, 4), "block"),
}


def _parallel_blueprints() -> list[str]:
    from esper.blueprints import builtin_blueprints, slot_kinds
    from generated.esper.common.v1 import seed_pb2

    return [bp.name for bp in builtin_blueprints()
            if seed_pb2.SLOT_KIND_PARALLEL in slot_kinds(bp)]


def _host_for(bp_name: str) -> str:
    """The first of the hosts above whose layout the blueprint serves."""
    from esper.blueprints import builtin_blueprints
    from generated.esper.common.v1 import seed_pb2

    bp = next(b for b in builtin_blueprints() if b.name == bp_name)
    return next(name for name in _PARALLEL_HOSTS
                if seed_pb2.ActivationLayout.Value(f"ACTIVATION_LAYOUT_{name}") in bp.layouts)


def _parallel_worker(rank: int, port: int, out_dir: str, bp_name: str) -> None:
    from esper.blueprints import build_module, builtin_blueprints

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        factory, shape, site = _PARALLEL_HOSTS[_host_for(bp_name)]
        torch.manual_seed(0)
        host = factory()
        events: list = []
        mm = wrap(host, parallel=[site], example_input=torch.randn(4, *shape),
                  config=KasminaConfig(stats_interval=1, incubation=3, gate_interval=1,
                                       blend_duration=4),
                  event_sink=events.append)
        opt = torch.optim.SGD(host.parameters(), lr=0.05)
        mm.attach_optimizer(opt)
        ddp = DDP(mm, broadcast_buffers=False)
        data = torch.Generator().manual_seed(100 + rank)
        bp = next(b for b in builtin_blueprints() if b.name == bp_name)
        for step in range(STEPS):
            if step == GERMINATE_AT:
                decision: list = [None]
                if rank == 0:
                    decision[0] = {"slot": site, "blueprint": bp_name, "init_seed": 7}
                dist.broadcast_object_list(decision, src=0)
                d = decision[0]
                seed = build_module(bp, mm.site_signature(d["slot"]), seed=d["init_seed"])
                mm.germinate(d["slot"], seed, kernel_id=f"local:{bp.blueprint_id}",
                             blueprint_id=bp.blueprint_id, reason=f"rank 0 at step {step}")
                ddp = DDP(mm, broadcast_buffers=False)
            xb = torch.randn(16, *shape, generator=data)
            opt.zero_grad()
            ddp(xb).pow(2).mean().backward()
            mm.clip_grad_norms(1.0, 1.0)
            opt.step()
            mm.step()
        flat = torch.cat([p.detach().flatten() for p in mm.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        slot = mm.slots[site]
        seed_flat = torch.cat([p.detach().flatten() for p in slot.seed.parameters()])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "max_param_diff": max((g - flat).abs().max().item() for g in gathered),
            "seed_params": seed_flat.numel(),
            "seed_moved": float(seed_flat.abs().sum()),
            "stage": int(slot.current_stage),
            "alpha": slot.alpha,
            "transitions": [(e.step, int(e.to_stage)) for e in events if e.kind == "transition"],
        }))
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("bp_name", _parallel_blueprints())
def test_ddp_parallel_slot_germination_keeps_ranks_identical(tmp_path: Path, bp_name: str
                                                             ) -> None:
    mp.spawn(_parallel_worker, args=(_free_port(), str(tmp_path), bp_name), nprocs=WORLD,
             join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert r0["max_param_diff"] == 0.0 and r1["max_param_diff"] == 0.0
    assert r0["seed_params"] > 0 and r0["seed_moved"] > 0
    assert r0["transitions"] == r1["transitions"] == [
        [GERMINATE_AT, SeedStage.GERMINATED], [GERMINATE_AT, SeedStage.TRAINING],
        [GERMINATE_AT + 3, SeedStage.BLENDING], [GERMINATE_AT + 3 + 4, SeedStage.HOLDING],
    ]
    assert r0["stage"] == r1["stage"] == SeedStage.HOLDING
    assert r0["alpha"] == r1["alpha"] == 1.0
