"""`esper up` on a fresh data dir with no config file grows a run submitted with the CLI.

Nothing is prepared: Urza starts empty and must trust what the local Tezzeret signs, and
the kernels for the run's sites are compiled on demand when the run starts. The second
test does the same with the variables the k8s manifests set (trusted-keys dir, signing key
file, API-key file, Urza's blob dir), where they apply to `esper up`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.blueprints.artifact import SigningKey
from esper.tolaria.client import TolariaClient, find_platform

# Minutes each on 2 shared cores (a whole esper up, a 20-30 epoch run): CI runs them.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "OTEL_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _up(data_dir: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = data_dir.parent / "esper-up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "esper.cli", "up", "--data-dir", str(data_dir),
                                 "--log-level", "WARNING"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not (data_dir / "endpoints.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"esper up did not serve:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    try:
        yield proc
    finally:
        info = json.loads((data_dir / "endpoints.json").read_text()) \
            if (data_dir / "endpoints.json").exists() else {}
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        nats = info.get("nats_pid")
        if isinstance(nats, int):
            try:
                os.kill(nats, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cli(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "esper.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _grew(target: str, api_key: str | None, run_id: str) -> list[str]:
    """Stage names each seed went through, in order ("SEED_STAGE_GERMINATED", ...)."""
    from generated.esper.common.v1 import seed_pb2

    with TolariaClient(target, api_key) as tolaria:
        return [seed_pb2.SeedStage.Name(e.lifecycle.to_stage) for e in tolaria.watch(run_id)
                if e.HasField("lifecycle")]


def test_plain_esper_up_grows_the_default_job_submitted_with_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "state"
    env = _clean_env()
    for _ in _up(data, env):
        assert not list(tmp_path.glob("**/*.yaml")), "no config file anywhere"
        # The default job, from the CLI, found through <data-dir>/endpoints.json + api-keys.
        r = _cli("run", "submit", "--data-dir", str(data), "--epochs", "30", "--lr", "0.03",
                 "--watch", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "succeeded" in r.stderr and "job mnist1d" in r.stderr
        assert "kernels compiling" in r.stderr and "kernels recovered" in r.stderr, r.stderr
        run_id = r.stderr.split("run ", 1)[1].split(":", 1)[0]
        p = find_platform(data_dir=data, env={})
        stages = _grew(p.target, p.api_key, run_id)
        assert "SEED_STAGE_GERMINATED" in stages, stages
        after = stages[stages.index("SEED_STAGE_GERMINATED"):]
        assert {"SEED_STAGE_FOSSILIZED", "SEED_STAGE_PRUNED"} & set(after), stages
        got = _cli("run", "get", "--data-dir", str(data), run_id, "--json", env=env)
        run = json.loads(got.stdout)
        assert run["state"] == "RUN_STATE_SUCCEEDED" and run["config"]["job"] == "mnist1d"
        # Urza trusts the local Tezzeret: the kernels it compiled on demand are stored there.
        keys = list((data / "trusted_keys").glob("tezzeret-*.pub"))
        assert len(keys) == 1


def test_the_k8s_manifests_variables_grow_too(tmp_path: Path) -> None:
    """ESPER_TRUSTED_KEYS_DIR, ESPER_SIGNING_KEY_FILE, ESPER_API_KEYS_FILE and
    ESPER_URZA_BLOB_DIR as deploy/k8s sets them; the CLI then needs ESPER_API_KEY."""
    admin = "k8s-style-admin-key-0123456789"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "api-keys").write_text(f"{admin}=*\n")
    SigningKey.generate().save(secrets / "signing.pem")
    trusted = tmp_path / "trusted"
    env = _clean_env(ESPER_API_KEYS_FILE=str(secrets / "api-keys"),
                     ESPER_SIGNING_KEY_FILE=str(secrets / "signing.pem"),
                     ESPER_TRUSTED_KEYS_DIR=str(trusted),
                     ESPER_URZA_BLOB_DIR=str(tmp_path / "blobs"))
    data = tmp_path / "state"
    for _ in _up(data, env):
        cli_env = {**env, "ESPER_API_KEY": admin}
        r = _cli("run", "submit", "--data-dir", str(data), "--job", "spirals", "--epochs", "20",
                 "--lr", "0.03", "--watch", env=cli_env)
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = r.stderr.split("run ", 1)[1].split(":", 1)[0]
        target = json.loads((data / "endpoints.json").read_text())["endpoints"]["tolaria"]
        stages = _grew(target, admin, run_id)
        assert "SEED_STAGE_GERMINATED" in stages, stages
        assert {"SEED_STAGE_FOSSILIZED", "SEED_STAGE_PRUNED"} & set(stages), stages
        assert list(trusted.glob("tezzeret-*.pub")), "Tezzeret published into the named dir"
        assert any((tmp_path / "blobs").rglob("*")), "Urza stored the kernels in the named dir"
        # Without a key the CLI is refused, and says so with exit code 2.
        refused = _cli("run", "list", "--data-dir", str(data), env=env)
        assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr.upper()


def test_a_users_own_loop_grows_against_plain_esper_up_with_urza_kernels(tmp_path: Path) -> None:
    """The README's grower loop with only the constructor arguments changed: Tamiyo over
    gRPC and `UrzaKernels` (Urza's verified kernels, compiled on demand by Tezzeret for a
    site nobody compiled before)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from esper.grow import Grower, GrowthConfig
    from esper.tamiyo.client import TamiyoController
    from esper.urza.source import UrzaKernels

    data = tmp_path / "state"
    kinds: list[str] = []
    for _ in _up(data, _clean_env()):
        info = json.loads((data / "endpoints.json").read_text())
        key = find_platform(data_dir=data, env={}).api_key
        kernels = UrzaKernels.connect(info["endpoints"]["urza"], api_key=key,
                                      trusted_keys_dir=data / "trusted_keys",
                                      cache_dir=tmp_path / "kernel-cache",
                                      tezzeret=info["endpoints"]["tezzeret"],
                                      on_event=lambda kind, detail: kinds.append(kind))
        torch.manual_seed(0)
        x, y = torch.randn(2048, 20), torch.randint(0, 4, (2048,))
        x_val, y_val = torch.randn(256, 20), torch.randint(0, 4, (256,))
        model = nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 4))  # a site nobody compiled
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        grower = Grower(model, sites=["1"], example_input=x[:8], optimizer=opt,
                        loss_fn=F.cross_entropy, held_out=(x_val, y_val),
                        controller=TamiyoController(info["endpoints"]["tamiyo"], api_key=key,
                                                    timeout_s=2.0),
                        kernels=kernels, config=GrowthConfig(max_seeds=1, total_epochs=14))
        applied = []
        try:
            for _epoch in range(14):
                for xb, yb in zip(x.split(64), y.split(64), strict=True):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
                    grower.step()
                with torch.no_grad():
                    val_loss = F.cross_entropy(model(x_val), y_val).item()
                report = grower.end_epoch(train_loss=loss.item(), val_loss=val_loss)
                applied += [d for i, d in enumerate(report.decisions) if i not in report.rejected
                            and d.kernel_id.startswith("sha256:")]
        finally:
            kernels.close()
        assert kinds[:2] == ["compiling", "recovered"], kinds
        assert applied, "the controller germinated one of Urza's kernels"
        assert kernels.loader.stats.fetches >= 1  # fetched from Urza and verified
