"""One rank of tests/unit/grow/test_distributed.py: ``python ddp_ranks.py <store> <rank> <out>``.

Two of these form a gloo group through a file store. Rank 1 is given controllers that
fail if asked and a kernel source with other initial weights, so what it ends with can
only be rank 0's decisions and seeds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import growkit

from esper.errors import UnavailableError
from esper.grow import BuiltinKernels, Grower, GrowthConfig, fixed_controller
from esper.grow.distributed import DistributedGrowth
from generated.esper.common.v1 import decision_pb2

WORLD = 2


class Scripted:
    """A controller that answers from a script (rank 0) or must never be asked (rank 1)."""

    component = "scripted"

    def __init__(self, answer, rank: int) -> None:
        self.answer, self.rank = answer, rank

    def decide(self, snapshot, candidates):
        if self.rank != 0:
            raise AssertionError("a rank other than 0 asked the controller")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class NeverAsked:
    def __init__(self, inner, rank: int) -> None:
        self.inner, self.rank = inner, rank
        self.component = inner.component
        self.blueprints = inner.blueprints

    def candidates(self, site):
        if self.rank != 0:
            raise AssertionError("a rank other than 0 asked the kernel catalog")
        return self.inner.candidates(site)

    def load(self, kernel_id, site=None):
        return self.inner.load(kernel_id, site)


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    # Parameters and persistent buffers (what a checkpoint holds); the slots' non-persistent
    # statistics windows are each rank's own data (gates all-reduce them when they read them).
    for name, t in sorted((k, v) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    store, rank, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    result: dict = {}
    ddp = DistributedGrowth()

    # 1. decisions: rank 0's, on every rank
    wanted = [decision_pb2.Decision(kind=decision_pb2.DECISION_KIND_GERMINATE, slot_id="s1",
                                    kernel_id="k", reason="because")]
    got = ddp.controller(Scripted(wanted, rank)).decide(None, {})
    result["decisions"] = [d.SerializeToString().hex() for d in got]
    # 2. an error of rank 0's controller, raised alike on every rank
    try:
        ddp.controller(Scripted(UnavailableError("tamiyo is down"), rank)).decide(None, {})
        result["error"] = None
    except UnavailableError as e:
        result["error"] = [type(e).__name__, e.reason, str(e)]

    # 3. a user's loop: rank 1 starts from other weights and builds seeds with other weights
    case = growkit.cases()["tabular_mlp"]
    torch.manual_seed(100 + rank)
    model = case.build()
    ddp = DistributedGrowth(model)  # rank 0's weights everywhere
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    events: list = []
    kernels = BuiltinKernels(list(case.blueprints), init_seed=rank)
    grower = Grower(
        model, sites=case.sites, example_input=case.x[:4], optimizer=opt, loss_fn=case.loss_fn,
        held_out=growkit.held_out(case), controller=ddp.controller(_fixed(rank)),
        kernels=ddp.kernels(NeverAsked(kernels, rank)), kasmina=growkit.FAST,
        config=GrowthConfig(max_seeds=2, probe_steps=0), event_sink=events.append)
    data = ddp.shard(DataLoader(TensorDataset(case.x[32:], case.y[32:]), batch_size=8, shuffle=True))
    steps = 0
    for epoch in range(4):
        data.sampler.set_epoch(epoch)
        for xb, yb in data:
            opt.zero_grad()
            loss = case.loss_fn(model(xb), yb)
            loss.backward()
            ddp.all_reduce_grads(opt, loss)
            opt.step()
            grower.step()
            steps += 1
        grower.end_epoch(val_loss=growkit.evaluate(model, case))
    result.update(digest=digest(grower.model), stages={k: s.current_stage.name
                                                       for k, s in grower.model.slots.items()},
                  germinated=grower.seeds_germinated, steps=steps,
                  batches=len(data))
    out.write_text(json.dumps(result))
    dist.destroy_process_group()


def _fixed(rank: int):
    ctrl = fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=1)
    if rank == 0:
        return ctrl

    class Refuses:
        component = ctrl.component if hasattr(ctrl, "component") else "controller"
        uses_probes = False

        def decide(self, snapshot, candidates):
            raise AssertionError("a rank other than 0 asked the controller")

    return Refuses()


if __name__ == "__main__":
    main()
