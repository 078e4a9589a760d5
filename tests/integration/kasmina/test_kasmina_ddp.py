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
