"""Parallel slots, wrapping: how they are asked for, their signatures, their errors, and
that dormant parallel slots leave the host alone."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from esper.blueprints import site_key
from esper.errors import ConfigError
from esper.kasmina import KasminaConfig, Site, SlotKind, wrap
from generated.esper.common.v1 import seed_pb2
from tests.unit.kasmina.kasmina_hosts import HOSTS, PARALLEL_SITES, TinyTransformer, cnn1d, mlp


def named_mlp() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(), fc1=nn.Linear(40, 16), act1=nn.ReLU(), fc2=nn.Linear(16, 16),
        act2=nn.ReLU(), head=nn.Linear(16, 10)))


def test_parallel_signatures_and_order() -> None:
    mm = wrap(named_mlp(), sites=["act1", Site("head", kind="parallel")],
              parallel=["fc1:fc2", "fc1"], example_input=torch.randn(4, 40))
    assert list(mm.slots) == ["fc1", "act1", "fc1:fc2", "head"]  # data-flow order
    kinds = {sid: s.kind for sid, s in mm.slots.items()}
    assert kinds == {"fc1": SlotKind.PARALLEL, "act1": SlotKind.OUTPUT,
                     "fc1:fc2": SlotKind.PARALLEL, "head": SlotKind.PARALLEL}
    keys = {sid: site_key(sig) for sid, sig in mm.site_signatures().items()}
    assert list(keys) == list(mm.slots) and keys == {
        "fc1": "NC:40:-:FLOAT32->NC:16:-:FLOAT32",
        "act1": "NC:16:-:FLOAT32",
        "fc1:fc2": "NC:40:-:FLOAT32->NC:16:-:FLOAT32",
        "head": "NC:16:-:FLOAT32->NC:10:-:FLOAT32",
    }
    out = mm.site_signature("act1")
    assert out.kind == seed_pb2.SLOT_KIND_UNSPECIFIED and not out.HasField("input")
    span = mm.slots["fc1:fc2"]
    assert [type(m).__name__ for m in span.site_modules] == ["Linear", "ReLU", "Linear"]
    assert span.site_module is mm.host.fc2
    h = {x.slot_id: x for x in mm.health()}
    assert h["fc1:fc2"].host_parameters == 40 * 16 + 16 + 16 * 16 + 16
    assert h["fc1:fc2"].parallel and not h["act1"].parallel
    assert h["fc1:fc2"].to_proto().site.kind == seed_pb2.SLOT_KIND_PARALLEL


def test_spans_by_container_pattern_and_single_child_span() -> None:
    host = TinyTransformer()
    mm = wrap(host, parallel=["block.mlp.0:2", "*.mlp.0:0", "block"],
              example_input=torch.randn(2, 5, 4))
    assert list(mm.slots) == ["block.mlp.0", "block.mlp.0:2", "block"]
    sig = mm.site_signature("block.mlp.0:2")
    assert (sig.input.layout, sig.input.channels, list(sig.input.spatial)) == (
        seed_pb2.ACTIVATION_LAYOUT_NLD, 16, [5])
    assert (sig.layout, sig.channels) == (seed_pb2.ACTIVATION_LAYOUT_NLD, 16)
    inner = mm.site_signature("block.mlp.0")  # "0:0" is the single module block.mlp.0
    assert site_key(inner) == "NLD:16:5:FLOAT32->NLD:32:5:FLOAT32"
    assert site_key(mm.site_signature("block")) == "NLD:16:5:FLOAT32->NLD:16:5:FLOAT32"


def test_one_slot_per_module_output() -> None:
    with pytest.raises(ConfigError, match=r"'fc1:fc2' and 'fc2' would both change the output "
                                          r"of module 'fc2'"):
        wrap(named_mlp(), parallel=["fc1:fc2", nn.Linear], example_input=torch.randn(4, 40))
    with pytest.raises(ConfigError, match="both an output and a parallel site"):
        wrap(named_mlp(), sites=["fc1"], parallel=["fc1"], example_input=torch.randn(4, 40))
    # Overlapping spans that end at different children are fine: the MLP's two hidden
    # layers widened independently (the second reads the first's host units only).
    mm = wrap(named_mlp(), parallel=["fc1:fc2", "fc2:head"], example_input=torch.randn(4, 40))
    assert list(mm.slots) == ["fc1:fc2", "fc2:head"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sites": [], "parallel": []}, "ask for at least one slot.*available modules: flatten"),
    ({"parallel": "fc1"}, "must be a list"),
    ({"sites": ["fc1:fc2"]}, "spans are parallel slots only"),
    ({"parallel": [Site("fc1")]}, "its entries are parallel slots"),
    ({"parallel": ["fc9:fc2"]}, (r"matches no container with children 'fc9' and 'fc2'.*"
                                 r"\(model\): flatten, fc1, act1")),
    ({"parallel": ["fc2:fc1"]}, "comes before 'fc2'"),
    ({"parallel": ["nothing.*"]}, "'nothing.\\*' matches no module"),
    ({"parallel": [3]}, "neither a module-name pattern nor an nn.Module type"),
])
def test_bad_parallel_requests_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        wrap(named_mlp(), example_input=torch.randn(4, 40), **kwargs)


def test_site_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="Site.kind='side'"):
        Site("fc1", kind="side")


def test_module_whose_input_is_not_one_tensor_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"parallel site 'block.attn'.*called with "
                                          r"\(Tensor, Tensor, Tensor, need_weights=\).*exactly "
                                          r"one tensor"):
        wrap(TinyTransformer(), parallel=["block.attn"], example_input=torch.randn(2, 5, 4))

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(idx).mean(1))

    with pytest.raises(ConfigError, match="reads a torch.int64 tensor.*Embedding"):
        wrap(Tokens(), parallel=["emb"], example_input=torch.randint(0, 10, (2, 3)))


def test_span_that_is_not_a_chain_is_rejected() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x) + self.a(x)  # b runs first and neither feeds the other

    with pytest.raises(ConfigError, match="span 'a:b': child 'b' ran before 'a'"):
        wrap(Fork(), parallel=["a:b"], example_input=torch.randn(2, 4))

    class Parallel2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    with pytest.raises(ConfigError, match="'a:b' is not a chain: child 'b' does not take "
                                          "child 'a''s output"):
        wrap(Parallel2(), parallel=["a:b"], example_input=torch.randn(2, 4))


def test_layout_override_for_an_input_and_output_that_differ() -> None:
    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    host = nn.Sequential(Plain())
    with pytest.raises(ConfigError, match="its input.*'ncl->nc'"):
        wrap(host, parallel=["0"], example_input=torch.randn(2, 3, 5))
    mm = wrap(host, parallel=["0"], example_input=torch.randn(2, 3, 5),
              config=KasminaConfig(layouts={"0": "ncl->nc"}))
    assert site_key(mm.site_signature("0")) == "NCL:3:5:FLOAT32->NC:15:-:FLOAT32"
    with pytest.raises(ConfigError, match="'input->output' layouts are for parallel slots"):
        wrap(nn.Sequential(nn.Linear(3, 3)), sites=["0"], example_input=torch.randn(2, 3),
             config=KasminaConfig(layouts={"0": "nc->nc"}))
    with pytest.raises(ValueError, match="is not one of"):
        KasminaConfig(layouts={"0": "ncl->nc->nld"})


@pytest.mark.parametrize("host_name", list(HOSTS))
def test_dormant_parallel_slots_are_bit_identical_to_the_host(host_name: str) -> None:
    factory, example, sites = HOSTS[host_name]
    torch.manual_seed(1)
    ref = factory()
    torch.manual_seed(1)
    host = factory()
    x = example()
    mm = wrap(host, sites=sites, parallel=PARALLEL_SITES[host_name], example_input=x,
              config=KasminaConfig(stats_interval=1))  # armed: every hook attached
    assert any(s.kind is SlotKind.PARALLEL for s in mm.slots.values())
    mm.train()
    ref.train()
    y, y_ref = mm(x), ref(x)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for p, q in zip(host.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_dormant_span_has_no_hooks_between_sampled_steps() -> None:
    host = mlp()
    mm = wrap(host, parallel=["0:2"], example_input=torch.randn(4, 8),
              config=KasminaConfig(stats_interval=4))
    hooked = []
    for _ in range(8):
        hooked.append((len(host[0]._forward_pre_hooks), len(host[2]._forward_hooks)))
        mm.step()
    assert hooked == [(0, 0)] * 3 + [(1, 1)] + [(0, 0)] * 3 + [(1, 1)]
    mm.remove_hooks()
    assert not host[0]._forward_pre_hooks and not host[2]._forward_hooks


def test_span_statistics_and_host_gradient_cover_every_child() -> None:
    host = mlp()
    x = torch.randn(16, 8)
    mm = wrap(host, parallel=["0:2"], example_input=x, config=KasminaConfig(stats_interval=1))
    mm.train()
    mm(x).pow(2).mean().backward()
    mm.step()
    h = mm.end_epoch()[0]
    expected = torch.nn.utils.get_total_norm([host[0].weight.grad, host[0].bias.grad,
                                              host[2].weight.grad, host[2].bias.grad])
    assert h.host_grad_norm == pytest.approx(float(expected), rel=1e-6)
    assert h.activation_std > 0  # of the span's output (the activation the seed adds to)


def test_cnn_parallel_conv_site_signature() -> None:
    mm = wrap(cnn1d(), parallel=["2"], example_input=torch.randn(4, 1, 12))
    assert site_key(mm.site_signature("2")) == "NCL:8:12:FLOAT32->NCL:8:12:FLOAT32"
