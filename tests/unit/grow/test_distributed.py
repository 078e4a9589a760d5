"""esper.grow.distributed on two real gloo ranks (two processes, a file store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import BatchSampler

from generated.esper.common.v1 import decision_pb2

RANKS = Path(__file__).with_name("ddp_ranks.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(RANKS), str(tmp / "store"), str(r), str(tmp / f"r{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return [json.loads((tmp / f"r{r}.json").read_text()) for r in range(2)]


def test_rank0_decisions_reach_every_rank_without_asking_it(ranks):
    # Rank 1's controller raises if asked; it returns rank 0's scripted decision anyway.
    for r in ranks:
        (d,) = [decision_pb2.Decision.FromString(bytes.fromhex(h)) for h in r["decisions"]]
        assert (d.kind, d.slot_id, d.kernel_id, d.reason) == (
            decision_pb2.DECISION_KIND_GERMINATE, "s1", "k", "because")


def test_rank0_controller_error_is_raised_alike_on_every_rank(ranks):
    for r in ranks:
        kind, reason, message = r["error"]
        assert kind == "UnavailableError" and reason == "UNAVAILABLE"
        assert "tamiyo is down" in message


def test_user_loop_grows_and_ends_bit_identical_on_both_ranks(ranks):
    r0, r1 = ranks
    # Rank 1 started from other host weights and builds seeds with other initial weights:
    # equal digests mean rank 0's host and seeds were broadcast and grads averaged.
    assert r0["germinated"] == r1["germinated"] >= 1
    assert r0["stages"] == r1["stages"] and any(s != "DORMANT" for s in r0["stages"].values())
    assert r0["digest"] == r1["digest"]
    # Each rank trains its own half of the 64 rows: 4 batches of 8 per epoch, not 8.
    assert r0["batches"] == r1["batches"] == 4 and r0["steps"] == r1["steps"] == 16


def test_shard_loader_splits_every_epoch_between_ranks_with_equal_lengths() -> None:
    import torch
    from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

    from esper.errors import FailedPreconditionError
    from esper.grow.distributed import shard_loader
    from esper.jobs.data import tensor_loader

    x = torch.arange(50).float()
    # An auto-batching loader: a DistributedSampler, shuffled by epoch like the original.
    base = DataLoader(TensorDataset(x), batch_size=8, shuffle=True)
    shards = [shard_loader(base, rank=r, world_size=2, seed=1) for r in range(2)]
    for epoch in (0, 1):
        rows = []
        for s in shards:
            s.sampler.set_epoch(epoch)
            rows.append(torch.cat([b[0] for b in s]).tolist())
        assert len(rows[0]) == len(rows[1]) == 25 and set(rows[0]) | set(rows[1]) == set(x.tolist())
    assert rows[0] != sorted(rows[0])  # still shuffled
    # The built-in jobs' batch sampler: every other index batch, the odd tail dropped.
    built_in = tensor_loader(x, x, batch_size=8, shuffle=True, seed=2)  # 7 batches
    parts = [shard_loader(built_in, rank=r, world_size=2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]
    for p in parts:
        p.sampler.set_epoch(3)
    got = [[b[0].tolist() for b in p] for p in parts]
    built_in.sampler.set_epoch(3)
    whole = [b[0].tolist() for b in built_in]
    assert got[0] == whole[0:6:2] and got[1] == whole[1:6:2]
    custom = DataLoader(TensorDataset(x), batch_sampler=_Custom(SequentialSampler(x), 8, False))
    with pytest.raises(FailedPreconditionError, match="custom batch_sampler"):
        shard_loader(custom, rank=0, world_size=2)


class _Custom(BatchSampler):
    """A user's own batch sampler (a subclass): its batches cannot be split safely."""


def test_without_a_process_group_everything_is_the_one_process_path() -> None:
    import torch

    from esper.grow.distributed import DistributedGrowth

    ddp = DistributedGrowth()
    assert not ddp.active and ddp.is_main
    sentinel = object()
    assert ddp.controller(sentinel) is sentinel and ddp.kernels(sentinel) is sentinel
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert ddp.all_reduce_grads(torch.optim.SGD([p], lr=0.1), torch.tensor(1.5), stop=True) == (1.5, True)
    assert p.grad.tolist() == [3.0, 3.0] and ddp.first_failure("x") == "x"
