"""`esper export <run>` on a run of a plain `esper up`: Urza's verified kernels from the
platform's kernel cache, the job's model rebuilt through the registry, and the export
reloads to what the run's wrapped model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.platform.test_zero_config import _clean_env, _cli, _up

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_export_of_a_platform_run_reloads_to_the_wrapped_models_outputs(tmp_path: Path) -> None:
    from esper.experiments.demo import DemoConfig, benchmark_settings
    from esper.grow import load_exported
    from esper.tolaria.export import PlatformKernels, restore_run
    from esper.tolaria.trainer import build_job

    data = tmp_path / "state"
    # The demo's setup (the growth benchmark's heuristic and catalog): both seeds are
    # fossilized by epoch 15 of 30, nothing is in flight at the end.
    env = _clean_env(**benchmark_settings(DemoConfig(out_dir=tmp_path)))
    out = tmp_path / "grown"
    for _ in _up(data, env):
        r = _cli("run", "submit", "--data-dir", str(data), "--job", "mnist1d", "-p", "host=cnn",
                 "--epochs", "30", "--lr", "0.03", "--max-seeds", "2", "--watch", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = r.stderr.split("run ", 1)[1].split(":", 1)[0]
        # While the platform runs (Urza reachable) and with the same data dir.
        exported = _cli("export", run_id, "--data-dir", str(data), "--out", str(out), env=env)
        assert exported.returncode == 0, exported.stdout + exported.stderr
        assert "reloaded, max output difference" in exported.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "esper.grow.export/1"
    assert all(s["kernel_id"].startswith("sha256:") for s in manifest["sites"])  # Urza's kernels
    # With the platform gone, the run's wrapped model is rebuilt from its files alone (the
    # kernel cache, verified against the trusted keys), and the export computes the same.
    run_dir = data / "tolaria" / "runs" / run_id
    trainer = restore_run(run_dir, PlatformKernels(trusted_keys_dir=data / "trusted_keys",
                                                   cache_dir=data / "tolaria" / "kernel-cache", fetch=None))
    fossils = trainer.grower.fossilized()
    assert sorted(s["site"] for s in manifest["sites"]) == sorted(fossils)
    assert len(fossils) == 2 and trainer.grower.live() == {s: "FOSSILIZED" for s in fossils}
    plain = load_exported(build_job(trainer.config).model, out).eval()
    x = next(iter(trainer.job.val_loader))[0]
    trainer.model.eval()
    with torch.no_grad():
        assert (plain(x) - trainer.model(x)).abs().max() <= 1e-6
