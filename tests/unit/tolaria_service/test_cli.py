"""`esper run ...` / `esper jobs list` against a real TolariaService (scripted workers), where
they find the platform, and the exit codes scripts rely on; `esper up`'s shared trust dir."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from esper import cli
from esper.errors import ConfigError, UnavailableError
from esper.runtime.cli import shared_trust
from esper.runtime.config import PlatformConfig
from esper.tolaria.client import TolariaClient, find_platform
from esper.tolaria.commands import run_config_from_args
from esper.tolaria.runs import RunStore


def _esper(*argv: str) -> int:
    return cli.main(list(argv))


async def test_cli_submit_watch_get_list_stop_and_exit_codes(tmp_path, capsys):
    from esper.runtime.auth import AuthConfig
    from esper.runtime.host import Host
    from esper.runtime.spec import PlatformContext
    from esper.tolaria.service import create_service

    ctx = PlatformContext(data_dir=tmp_path, settings={"tolaria": {
        "supervisor": {"worker_module": "tests.unit.tolaria_service.scripted_worker",
                       "poll_interval_s": 0.02, "max_restarts": 0, "launcher": "spawn"},
        "worker_args": ["--epoch-seconds", "0.05"]}})
    host = Host([create_service(ctx)], auth=AuthConfig(disabled=True))
    port = await host.start()
    ep = ["--endpoint", f"127.0.0.1:{port}"]
    try:
        # submit --watch: exit 0 when the run succeeded
        rc = await asyncio.to_thread(_esper, "run", "submit", *ep, "--job", "mnist1d", "-p",
                                     "host=mlp", "--epochs", "3", "--watch")
        assert rc == 0
        out = capsys.readouterr()
        run_id = out.err.split("run ", 1)[1].split(":", 1)[0]
        assert f"run {run_id} succeeded" in out.err
        # get --json is the Run message
        assert await asyncio.to_thread(_esper, "run", "get", *ep, run_id, "--json") == 0
        got = json.loads(capsys.readouterr().out)
        assert got["run_id"] == run_id and got["config"]["job_params"] == {"host": "mlp"}
        # submit without --watch prints only the id
        assert await asyncio.to_thread(_esper, "run", "submit", *ep, "--epochs", "400") == 0
        long_id = capsys.readouterr().out.strip()
        assert long_id.startswith("run-")
        # stop --wait: exit 0; watching the stopped run: exit 3
        assert await asyncio.to_thread(_esper, "run", "stop", *ep, long_id, "--wait") == 0
        assert await asyncio.to_thread(_esper, "run", "watch", *ep, long_id, "--quiet") == 3
        # a run whose worker dies (max_restarts 0): watch exits 1
        assert await asyncio.to_thread(_esper, "run", "submit", *ep, "--epochs", "400") == 0
        dying = capsys.readouterr().out.strip()
        with TolariaClient(f"127.0.0.1:{port}") as tolaria:
            for _ in range(200):
                run = await asyncio.to_thread(tolaria.get_run, dying)  # the server shares this loop
                if run.state == 2:  # running: its worker is up
                    break
                await asyncio.sleep(0.05)
        store = RunStore(tmp_path / "tolaria")  # the run's record holds its worker's pid
        os.kill(store.get(dying).worker_pid, signal.SIGKILL)
        store.close()
        assert await asyncio.to_thread(_esper, "run", "watch", *ep, dying, "--quiet") == 1
        # list shows all three; an unknown run and an unregistered job are exit 2
        assert await asyncio.to_thread(_esper, "run", "list", *ep) == 0
        listing = capsys.readouterr().out
        assert all(r in listing for r in (run_id, long_id, dying)) and "failed" in listing
        assert await asyncio.to_thread(_esper, "run", "get", *ep, "run-000000000000") == 2
        assert "NotFoundError" in capsys.readouterr().err
        assert await asyncio.to_thread(_esper, "run", "submit", *ep, "--job", "imagenet") == 2
        assert "registered jobs: digits, mnist1d, spirals" in capsys.readouterr().err
        assert await asyncio.to_thread(_esper, "jobs", "list", *ep, "--json") == 0
        assert [j["name"] for j in json.loads(capsys.readouterr().out)] == ["digits", "mnist1d", "spirals"]
    finally:
        await host.stop()


def test_submit_flags_build_the_run_config(tmp_path) -> None:
    ns = argparse.Namespace(config=None, job=None, param=["width=2"], epochs=5, seed=None,
                            batch_size=None, controller="random", lr=0.02, max_seeds=1,
                            sites="act1,act2", label=["who=me"])
    cfg = run_config_from_args(ns)
    assert cfg.job_spec() == ("mnist1d", {"width": "2"})  # the default job
    assert (cfg.epochs, cfg.controller, cfg.optimizer.learning_rate, cfg.budget.max_seeds) == \
        (5, "random", 0.02, 1)
    assert cfg.sites == ("act1", "act2") and cfg.labels == {"launched_by": "esper run submit", "who": "me"}
    file = tmp_path / "run.yaml"
    file.write_text("task: digits\nhost: cnn\nepochs: 3\n")
    legacy = run_config_from_args(argparse.Namespace(**{**vars(ns), "config": file, "param": [],
                                                        "sites": None, "epochs": None}))
    assert legacy.job_spec() == ("digits", {"host": "cnn", "width": "1.0"}) and legacy.epochs == 3
    with pytest.raises(ConfigError, match="cannot be combined with job"):
        run_config_from_args(argparse.Namespace(**{**vars(ns), "config": file, "job": "spirals"}))


def test_find_platform_prefers_flags_then_env_then_the_local_platform(tmp_path) -> None:
    data = tmp_path / "state"
    data.mkdir()
    (data / "api-keys").write_text("local-admin-key-0123456789=*\n")
    (data / "endpoints.json").write_text(json.dumps({
        "endpoints": {"tolaria": "127.0.0.1:1111"}, "auth": True,
        "api_keys_file": str(data / "api-keys")}))
    local = find_platform(data_dir=data, env={})
    assert (local.target, local.api_key) == ("127.0.0.1:1111", "local-admin-key-0123456789")
    env = {"ESPER_ENDPOINTS": "urza=h:1,tolaria=10.0.0.5:50051", "ESPER_API_KEY": "env-key-0123456789abc"}
    assert find_platform(data_dir=data, env=env).target == "10.0.0.5:50051"
    # a flag wins; the local admin key is never sent to another address
    flagged = find_platform(endpoint="remote:50051", data_dir=data, env={})
    assert (flagged.target, flagged.api_key) == ("remote:50051", None)
    with pytest.raises(ConfigError, match="no tolaria=host:port entry"):
        find_platform(env={"ESPER_ENDPOINTS": "urza=h:1"})
    with pytest.raises(UnavailableError, match="esper up --data-dir"):
        find_platform(data_dir=tmp_path / "nothing", env={})


def test_esper_up_gives_every_part_one_trusted_keys_dir(tmp_path) -> None:
    bare = shared_trust(PlatformConfig(data_dir=tmp_path / "d"), env={})
    keys = str((tmp_path / "d" / "trusted_keys").resolve())
    assert bare.settings["tezzeret"]["trusted_keys_dir"] == bare.settings["urza"]["trusted_keys_dir"] == keys
    assert bare.settings["tolaria"]["worker_args"] == ["--trusted-keys", keys]
    assert Path(keys).is_dir()  # Urza opens it before Tezzeret publishes into it
    from_env = shared_trust(PlatformConfig(data_dir=tmp_path / "d"), env={"ESPER_TRUSTED_KEYS_DIR": str(tmp_path / "k")})
    assert from_env.settings["urza"]["trusted_keys_dir"] == str(tmp_path / "k")
    # a dir the config names for one part is the one the others get
    cfg = PlatformConfig(data_dir=tmp_path / "d", settings={"urza": {"trusted_keys_dir": str(tmp_path / "u")},
                                                            "tolaria": {"worker_args": ["--torch-threads", "2"]}})
    one = shared_trust(cfg, env={})
    assert one.settings["tezzeret"]["trusted_keys_dir"] == str(tmp_path / "u")
    assert one.settings["tolaria"]["worker_args"] == ["--torch-threads", "2", "--trusted-keys", str(tmp_path / "u")]
