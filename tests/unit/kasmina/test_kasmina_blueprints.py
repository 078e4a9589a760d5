"""Every builtin blueprint × every host site it supports (output and parallel slots):
function-preserving, trainable."""

from __future__ import annotations

import pytest
import torch

from esper.blueprints import build_module, builtin_blueprints, supports
from esper.kasmina import SeedStage, wrap
from tests.unit.kasmina.kasmina_hosts import HOSTS, PARALLEL_SITES

BLUEPRINTS = builtin_blueprints()


def _wrapped(host_name: str):
    factory, example, sites = HOSTS[host_name]
    torch.manual_seed(0)
    host = factory()
    x = example()
    return host, wrap(host, sites=sites, parallel=PARALLEL_SITES[host_name], example_input=x), x


def _signatures(host_name: str) -> list:
    mm = _wrapped(host_name)[1]
    return [mm.site_signature(s) for s in mm.slots]


# Only the (host, blueprint) pairs where the blueprint fits at least one site.
CASES = [(host, bp) for host in HOSTS for bp in BLUEPRINTS
         if any(supports(bp, sig) for sig in _signatures(host))]


def test_every_blueprint_fits_some_host_site() -> None:
    assert {bp.name for _, bp in CASES} == {bp.name for bp in BLUEPRINTS}
    assert len(BLUEPRINTS) >= 6


@pytest.mark.parametrize(("host_name", "bp"), CASES, ids=[f"{h}-{b.name}" for h, b in CASES])
def test_germinating_a_builtin_blueprint_is_function_preserving_and_trainable(
    host_name: str, bp
) -> None:
    host, mm, x = _wrapped(host_name)
    slots = [s for s in mm.slots if supports(bp, mm.site_signature(s))]
    mm.eval()
    with torch.no_grad():
        before = mm(x)
    for slot_id in slots:
        seed = build_module(bp, mm.site_signature(slot_id), seed=1)
        mm.germinate(slot_id, seed, kernel_id=f"sha256:{bp.name}", blueprint_id=bp.blueprint_id)
        assert mm.slots[slot_id].current_stage is SeedStage.TRAINING
    with torch.no_grad():
        assert (mm(x) - before).abs().max().item() <= 1e-6
    mm.train()
    y = mm(x)
    mm.remove_hooks()
    assert torch.equal(y, host(x))  # TRAINING: the host's forward, bit for bit
    y.pow(2).mean().backward()
    for slot_id in slots:
        grads = [p.grad for p in mm.slots[slot_id].seed.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), slot_id
