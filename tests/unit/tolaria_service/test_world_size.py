"""RunConfig.world_size: the field, the torchrun command the local launcher runs, and the
Kubernetes launcher's refusal (it runs one process per run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from esper.errors import FailedPreconditionError
from esper.tolaria.config import RunConfig, RunConfigError
from esper.tolaria.launchers import LaunchSpec
from esper.tolaria.launchers.local import LocalLauncher, torchrun_command
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

from .fake_kube import FakeKube
from .test_kubernetes_launcher import Harness


def test_world_size_defaults_to_one_and_round_trips() -> None:
    assert RunConfig().world_size == 1
    assert RunConfig.from_proto(pb.RunConfig(task="spirals", host="mlp", controller="none", epochs=2, batch_size=8)).world_size == 1  # unset
    cfg = RunConfig.from_dict({"task": "spirals", "world_size": 4})
    assert RunConfig.from_proto(cfg.to_proto()).world_size == 4 and cfg.to_dict()["world_size"] == 4
    # Left out of the dict when 1, so checkpoints written before the field resume.
    assert "world_size" not in RunConfig().to_dict()


@pytest.mark.parametrize("bad", [0, 65, -1, 2.0, True])
def test_world_size_out_of_range_is_refused(bad) -> None:
    with pytest.raises(RunConfigError, match="world_size"):
        RunConfig.from_dict({"task": "spirals", "world_size": bad})
    if isinstance(bad, int) and not isinstance(bad, bool) and bad > 64:
        with pytest.raises(RunConfigError, match="world_size"):
            RunConfig.from_proto(pb.RunConfig(task="spirals", host="mlp", controller="none", epochs=2, batch_size=8, world_size=bad))


def test_the_local_launcher_runs_ranks_under_torchrun(tmp_path: Path) -> None:
    spec = LaunchSpec(run_id="r", run_dir=tmp_path, module="esper.tolaria.worker",
                      argv=("--run-dir", str(tmp_path)), world_size=3, restarts_left=2)
    cmd = torchrun_command(spec)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--standalone", "--nproc-per-node=3", "--max-restarts=2"} <= set(cmd)
    assert cmd[-4:] == ["-m", "esper.tolaria.worker", "--run-dir", str(tmp_path)]
    assert LocalLauncher.runs_ranks


async def test_the_kubernetes_launcher_refuses_more_than_one_rank(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeKube())
    with pytest.raises(FailedPreconditionError, match="world_size=2") as e:
        await h.start(world_size=2)
    assert e.value.metadata["field"] == "config.world_size"
    assert not [c for c in h.kube.calls if c.startswith("create job")]
    await h.start(world_size=1)  # one rank is a Job as before
    assert [c for c in h.kube.calls if c.startswith("create job")]
    await h.sup.close()
