"""static-final gets exactly the grown topology: the folded modules of esper.grow's export,
output and parallel slots (a span too), present in a fresh host from step 0."""

from __future__ import annotations

import copy

import pytest
import torch

from esper.errors import ConfigError
from esper.experiments.baselines import GrownSeed, attach_grown_seeds
from esper.grow import BuiltinKernels, Grower, SeedParallel, SeedResidual, fixed_controller
from esper.grow.export import slot_kind
from tests.unit.grow.growkit import FAST, cases, evaluate, held_out, loader, train_epoch

CASE = cases()["tabular_mlp"]


def grown(*, sites=(), parallel=(), blueprint: str) -> Grower:
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    grower = Grower(model, sites=list(sites), parallel=list(parallel), example_input=CASE.x[:4],
                    optimizer=opt, loss_fn=CASE.loss_fn, held_out=held_out(CASE), kasmina=FAST,
                    controller=fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=1),
                    kernels=BuiltinKernels([blueprint]))
    data = loader(CASE)
    for _ in range(5):
        train_epoch(model, grower, data, opt, CASE.loss_fn)
        grower.end_epoch(val_loss=evaluate(model, CASE))
    assert grower.fossilized()
    return grower


@pytest.mark.parametrize(("where", "blueprint", "folded"), [
    ({"sites": ["1"]}, "bottleneck_mlp", SeedResidual),
    ({"parallel": ["2"]}, "lora_r4", SeedParallel),
    ({"parallel": ["0:1"]}, "width4_relu", SeedParallel),
], ids=["output", "parallel-linear", "parallel-span"])
def test_static_final_has_the_grown_modules_and_computes_what_the_grown_model_does(where, blueprint, folded):
    grower = grown(**where, blueprint=blueprint)
    mm = grower.model
    seeds = [(GrownSeed(slot_id=s, kind=slot_kind(mm.slots[s]), kernel_id=k), copy.deepcopy(mm.slots[s].seed))
             for s, k in grower.fossilized().items()]
    host = CASE.build()
    host.load_state_dict(mm.host.state_dict())  # the grown run's host weights, to compare outputs
    originals = dict(host.named_children())
    attach_grown_seeds(host, seeds)
    (grown_seed, seed), = seeds
    first, _, last = grown_seed.slot_id.partition(":")
    at = host.get_submodule(first)
    # The module esper.grow's export folds this slot kind into, around the original module
    # (a span's children as one Sequential, the rest Identity), holding the grown seed.
    assert type(at) is folded and at.seed is seed
    if last:
        assert [type(m) for m in at.module] == [type(originals[first]), type(originals[last])]
        assert isinstance(host.get_submodule(last), torch.nn.Identity)
    else:
        assert at.module is originals[first]
    x, _ = held_out(CASE)
    mm.eval()
    host.eval()
    with torch.no_grad():
        assert (host(x) - mm(x)).abs().max() <= 1e-6
    # Its seeds are host parameters: they train from step 0 with the host's optimizer.
    assert sum(p.numel() for p in host.parameters()) == grower.parameters()


def test_a_site_that_is_not_in_the_host_names_the_modules() -> None:
    with pytest.raises(ConfigError, match="'9' is not a module.*modules: 0, 1, 2"):
        attach_grown_seeds(CASE.build(), [(GrownSeed(slot_id="9", kind="output", kernel_id="k"),
                                           torch.nn.Identity())])
