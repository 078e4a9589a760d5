"""`esper tamiyo train` as a real process → TamiyoService serves its policy over gRPC, hot-reloads
the next version, GetPolicyInfo and Decide say which; `esper bench controllers --quick` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esper.tamiyo.gnn import load_policy, trusted_keys_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--synthetic", "60", "--steps", "10", "--awr-steps", "10", "--members", "2", "--hidden", "16",
        "--epochs", "5", "--tasks", "spirals", "--seeds", "0", "--collect-runs", "1"]


def esper(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "esper.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, check=False)


async def test_trained_policy_is_served_hot_reloaded_and_reported(tmp_path: Path) -> None:
    from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
    from tests.unit.tamiyo.snapshots import record
    from tests.unit.tamiyo.test_service import GOOD, CatalogUrza, Platform, plateau_snapshot

    out = tmp_path / "policies"
    # Signed with the platform data dir's Tezzeret key (created here), whose public key lands in
    # <data dir>/trusted_keys, where the Tamiyo service below (data dir tmp_path) looks.
    signing = ["--data-dir", str(tmp_path)]
    first = await asyncio.to_thread(esper, "tamiyo", "train", "--out", str(out), "--version", "v1", *TINY, *signing)
    assert first.returncode == 0, first.stderr
    assert "advantage" in first.stdout or "AWR" in first.stdout
    assert "signing with key" in first.stdout and (tmp_path / "tezzeret" / "signing_key.pem").is_file()
    trusted = trusted_keys_for(data_dir=tmp_path)
    ens, meta = load_policy(out / "gnn.json", trusted)
    assert meta["signature"]["key_id"] in trusted
    assert meta["version"] == "v1" and meta["weights_file"] == "gnn-v1.safetensors" and len(ens.members) == 2
    training = meta["training"]
    assert training["method"].startswith("imitation of the heuristic, then advantage-weighted")
    assert [r["run_id"] for r in training["runs"]] == ["collect-spirals-0"]
    assert training["behaviour_examples"] == 4 and training["runs"][0]["baseline_val_accuracy"] is not None
    assert (out / "gnn-v1.json").exists() and not list(out.glob("*.pkl"))

    settings = {"policy": "gnn", "gnn": {"policy_file": str(out / "gnn.json")}, "reload_check_s": 0.05}
    async with Platform(tmp_path, CatalogUrza([record(GOOD)]), settings) as p:
        info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
        assert (info.policy, info.policy_version) == ("gnn", "v1")
        second = await asyncio.to_thread(esper, "tamiyo", "train", "--out", str(out), "--version", "v2", *TINY,
                                         *signing)
        assert second.returncode == 0, second.stderr
        deadline = asyncio.get_running_loop().time() + 20
        while info.policy_version != "v2" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
            info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=5)
        assert info.policy_version == "v2" and "reload_error" not in info.settings
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=5)
        assert (resp.policy, resp.policy_version) == ("gnn", "v2")
        assert all(0.0 <= d.uncertainty <= 1.0 for d in resp.decisions)
    # The first version is still on disk and still verifies: versions are kept, not overwritten.
    assert load_policy(out / "gnn-v1.json", trusted)[1]["version"] == "v1"


def test_train_refuses_bad_arguments_with_a_typed_error(tmp_path: Path) -> None:
    bad = esper("tamiyo", "train", "--out", str(tmp_path), "--seeds", "4-1", timeout=60)
    assert bad.returncode == 2 and "ConfigError" in bad.stderr and "'4-1'" in bad.stderr
    bad = esper("tamiyo", "train", "--out", str(tmp_path), "--collect-runs", "3", "--seeds", "0", timeout=60)
    assert bad.returncode == 2 and "collect_runs=3" in bad.stderr


def test_bench_controllers_quick_writes_the_table_and_plot(tmp_path: Path) -> None:
    from esper.experiments import controllers as bench_controllers

    assert bench_controllers.main(["--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0
    table = (tmp_path / "controllers.md").read_text()
    for c in ("gnn", "heuristic", "random", "fixed"):
        assert f"| {c} |" in table
    assert "## spirals" in table and "## digits" in table and "Default controller by this table" in table
    assert (tmp_path / "controllers.png").stat().st_size > 1000
    runs = json.loads((tmp_path / "controllers.json").read_text())["runs"]
    assert len(runs) == 4 * 4 and {r["seed"] for r in runs} == {100, 101}
    assert all(0.0 < r["test_accuracy"] <= 1.0 for r in runs)
    gnn = [r for r in runs if r["controller"] == "gnn"]
    assert all(0 <= r["fallbacks"] <= r["slot_decisions"] for r in gnn)


def test_bench_controllers_refuses_to_evaluate_on_training_runs(tmp_path: Path) -> None:
    from esper.errors import ConfigError
    from esper.experiments import controllers as bench_controllers

    with pytest.raises(ConfigError, match=r"\('spirals', 0\)"):
        bench_controllers.main(["--quick", "--out", str(tmp_path), "--eval", "spirals:0-1", "--jobs", "1"])
