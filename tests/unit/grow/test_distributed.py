"""esper.grow.distributed on two real gloo ranks (two processes, a file store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
