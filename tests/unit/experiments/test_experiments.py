"""The experiments' small configurations: every arm trains, FLOPs are counted (training and
decision), static-final has exactly the grown topology, the size-matched arm keeps its
bound, and the cold start with the full catalog probes instead of taking the cheapest."""

from __future__ import annotations

import json

import pytest
import torch

from esper.experiments import cold_start, growth_mlp
from esper.experiments.loop import RunSpec, train


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_growth_mlp_small_configuration(tmp_path) -> None:
    cfg = growth_mlp.GrowthMLPConfig(seeds=(0, 1), epochs=4, jobs=1)
    results = growth_mlp.run(cfg, progress=lambda s: None)
    assert set(results) == set(growth_mlp.ARMS)
    for arm, rs in results.items():
        assert [r["seed"] for r in rs] == [0, 1], arm
        for r in rs:
            assert len(r["val_accuracy"]) == 4 and r["train_flops"] > 0
            assert r["total_flops"] == r["train_flops"] + r["decision_flops"]
    assert all(r["parameters"] == growth_mlp.HOST_PARAMETERS for r in results["static-initial"])
    assert all(r["parameters"] == 1_638 for r in results["mlp-22x22"])
    for grown_arm, final_arm in (("heuristic", "static-final"),
                                 ("heuristic-matched", "static-final-matched")):
        for g, f in zip(results[grown_arm], results[final_arm], strict=True):
            assert g["grown"], g  # something was grown and fossilized in 4 epochs
            assert g["decision_flops"] > 0 and f["decision_flops"] == 0
            # Exactly the grown (fossilized) topology; a seed still in flight when the
            # short run ended counts in the grower's parameters only.
            kinds = [d["kind"][len("DECISION_KIND_"):] for d in g["decisions"]]
            in_flight = kinds.count("GERMINATE") - kinds.count("FOSSILIZE") - kinds.count("PRUNE")
            assert growth_mlp.HOST_PARAMETERS < f["parameters"] <= g["parameters"]
            assert (f["parameters"] == g["parameters"]) == (in_flight == 0)
            # Seeds cost from germination on; static-final pays for them from step 0.
            assert f["train_flops"] > g["train_flops"] > results["static-initial"][0]["train_flops"]
    assert all(r["parameters"] <= growth_mlp.MATCHED_PARAMETERS for r in results["heuristic-matched"])
    text = growth_mlp.table(results)
    assert "| heuristic |" in text and "±" in text
    assert any("target" in line for line in growth_mlp.verdict(results))


def test_growth_mlp_cli_writes_the_result_file(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"arms": ["static-initial"], "jobs": 1}))
    assert growth_mlp.main(["--quick", "--config", str(cfg), "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "growth-mlp.json").read_text())
    assert doc["tuning_seeds"] == list(growth_mlp.TUNING_SEEDS)
    assert not set(doc["tuning_seeds"]) & set(doc["reported_seeds"])
    assert "| static-initial |" in capsys.readouterr().out
    with pytest.raises(Exception, match="arms"):
        growth_mlp.GrowthMLPConfig(arms=("static-final",))


def test_static_final_wires_seeds_like_the_slots() -> None:
    from esper.experiments.loop import StaticSeeds
    from esper.tasks import hosts

    kernels = growth_mlp.catalog((8,), init_seed=0)
    torch.manual_seed(0)
    host = hosts.mlp(40, 10, hidden=16, width=1.0)
    x = torch.randn(4, 1, 40)
    before = host(x)
    sites = {sid: kernels.candidates(sig)[0].kernel_id for sid, sig in (
        ("fc1:fc2", _sig(host, "fc1:fc2", x)), ("fc2:head", _sig(host, "fc2:head", x)))}
    model = StaticSeeds(host, [(sid, "parallel", kernels.load(k)) for sid, k in sites.items()])
    assert torch.equal(model(x), before)  # zero-initialised output sides
    assert sum(p.numel() for p in model.parameters()) == 1_098 + (40 * 8 + 8 + 8 * 16 + 16) + (
        16 * 8 + 8 + 8 * 10 + 10)


def _sig(host, slot_id, x):
    from esper.kasmina import KasminaConfig, wrap

    return wrap(host, parallel=[slot_id], example_input=x, config=KasminaConfig()).site_signature(slot_id)


def test_cold_start_small_configuration_probes_instead_of_taking_the_cheapest() -> None:
    cfg = cold_start.ColdStartConfig(
        task="mnist1d", seeds=(0,), epochs=4, jobs=1, singles=("norm_scale",),
        only=("single:norm_scale", "catalog", "catalog+probe"), probe_rows=64, probe_steps=5,
        heuristic={**cold_start.HEURISTIC, "warmup_epochs": 1, "plateau_window": 1,
                   "plateau_threshold": 1.0})
    results = cold_start.run(cfg, progress=lambda s: None)
    (cheap,), (old,), (probed,) = (results[a] for a in cfg.only)
    assert cheap["germinated_names"] and set(old["germinated_names"]) == {"norm_scale"}
    assert old["decision_flops"] == cheap["decision_flops"]  # no probes: same forwards
    assert probed["probes"] and probed["decision_flops"] > old["decision_flops"]
    assert "norm_scale" not in probed["germinated_names"][:1]
    assert cold_start.fitting_blueprints("mnist1d") == [
        "bottleneck_mlp", "lowrank_adapter", "conv3_residual_1d", "dwsep_conv1d",
        "squeeze_excite", "norm_scale"]
    assert "| catalog+probe |" in cold_start.table(results)


def test_a_run_spec_trains_the_same_host_for_every_arm() -> None:
    a = train(RunSpec(seed=3, epochs=1), "a")
    b = train(RunSpec(seed=3, epochs=1), "b")
    assert a.test_accuracy == b.test_accuracy and a.train_flops == b.train_flops


def test_esper_bench_growth_mlp_reaches_the_mlp_benchmark(capsys) -> None:
    # The MLP row against GroMo is an `esper bench` like the others: its own parser and help.
    from esper.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "growth-mlp", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: esper bench growth-mlp") and "--tuning" in out
