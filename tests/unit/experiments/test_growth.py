"""The growth benchmark end to end on a tiny task: every arm, the table, the plot."""

from __future__ import annotations

import json

import pytest

from esper.errors import ConfigError
from esper.experiments.growth import ARMS, GrowthBenchConfig, main


@pytest.mark.slow
def test_bench_runs_every_arm_and_static_final_gets_the_grown_topology(tmp_path, capsys) -> None:
    config = {
        "blueprints": ["bottleneck_mlp"], "batch_size": 128,
        "kasmina": {"incubation": 5, "gate_interval": 2, "blend_duration": 10},
        # Germinate at the first boundary and keep a seed after one good HOLDING epoch, so
        # a 5-epoch run grows something for static-final to copy.
        "heuristic": {"warmup_epochs": 0, "plateau_window": 1, "plateau_threshold": 10.0,
                      "fossilize_epochs": 1, "fossilize_threshold": 0.0},
        "fixed": {"germinate_epochs": [1]},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    rc = main(["--task", "spirals", "--seeds", "2", "--epochs", "5", "--jobs", "1",
               "--config", str(tmp_path / "cfg.json"), "--out", str(out)])
    assert rc == 0
    table = (out / "growth.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in table
    assert (out / "growth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "growth.json").read_text())["runs"]
    assert len(runs) == len(ARMS) * 2
    by = {(r["arm"], r["seed"]): r for r in runs}
    for seed in (0, 1):
        heuristic, final, initial = by["heuristic", seed], by["static-final", seed], by["static-initial", seed]
        assert heuristic["fossilized"], "the heuristic grew nothing to copy"
        # static-final trains the kept seeds (a bottleneck MLP 8→4→8 has 76 parameters)
        # from step 0; the heuristic may also end with a seed still in flight.
        assert final["parameters"] == initial["parameters"] + 76 * len(heuristic["fossilized"])
        assert heuristic["parameters"] >= final["parameters"]
        assert final["train_flops"] > initial["train_flops"]
        assert heuristic["train_flops"] > initial["train_flops"]
    printed = capsys.readouterr().out
    assert "| heuristic |" in printed and "Targets (MNIST-1D)" not in printed


def test_bench_config_rejects_unknown_keys_and_bad_sub_configs() -> None:
    with pytest.raises(ConfigError, match="'epoch'"):
        GrowthBenchConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="plateau"):
        GrowthBenchConfig.from_dict({"heuristic": {"plateau": 1}})
    with pytest.raises(ConfigError, match="unknown blueprint.*'nope'.*conv3_residual_1d"):
        GrowthBenchConfig.from_dict({"blueprints": ("nope",)})
    with pytest.raises(ConfigError, match="epochs=0"):
        GrowthBenchConfig.from_dict({"epochs": 0})
