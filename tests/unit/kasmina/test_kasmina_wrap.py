"""Wrapping: site selection, signatures, no copies, dormant slots leave the host alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper.errors import ConfigError, NotFoundError
from esper.kasmina import KasminaConfig, MorphogeneticModel, wrap
from generated.esper.common.v1 import seed_pb2
from tests.unit.kasmina.kasmina_hosts import HOSTS, TinyTransformer, cnn1d, mlp


def test_wrap_uses_the_host_in_place_without_copying_parameters() -> None:
    host = mlp()
    keys_before = list(host.state_dict())
    mm = wrap(host, sites=["1"], example_input=torch.randn(4, 8))
    assert isinstance(mm, MorphogeneticModel) and mm.host is host
    assert {id(p) for p in mm.parameters()} == {id(p) for p in host.parameters()}
    assert list(host.state_dict()) == keys_before
    mm_keys = [k for k in mm.state_dict() if k.startswith("host.")]
    assert mm_keys == [f"host.{k}" for k in keys_before]


def test_unknown_pattern_lists_the_available_modules() -> None:
    with pytest.raises(ConfigError) as info:
        wrap(mlp(), sites=["body.*"], example_input=torch.randn(4, 8))
    msg = str(info.value)
    assert "'body.*'" in msg and "0 (Linear)" in msg and "3 (ReLU)" in msg


def test_unmatched_module_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'Conv2d' matches no module"):
        wrap(mlp(), sites=[nn.Conv2d], example_input=torch.randn(4, 8))


def test_sites_by_type_and_pattern_are_ordered_by_data_flow() -> None:
    mm = wrap(mlp(), sites=["3", nn.Linear], example_input=torch.randn(4, 8))
    assert list(mm.slots) == ["0", "2", "3", "4"]
    assert [s.depth for s in mm.slots.values()] == [0, 1, 2, 3]


def test_unknown_slot_id_lists_the_slots() -> None:
    mm = wrap(mlp(), sites=["1", "3"], example_input=torch.randn(4, 8))
    with pytest.raises(NotFoundError, match=r"'9'.*slots: 1, 3"):
        mm.site_signature("9")


def test_site_that_does_not_run_is_an_error() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(ConfigError, match="'unused'.*did not run"):
        wrap(Skip(), sites=["unused"], example_input=torch.randn(2, 4))


@pytest.mark.parametrize(
    ("host", "slot", "layout", "channels", "spatial"),
    [
        ("mlp", "1", seed_pb2.ACTIVATION_LAYOUT_NC, 16, []),
        ("cnn1d", "1", seed_pb2.ACTIVATION_LAYOUT_NCL, 8, [12]),  # ReLU after a Conv1d
        ("cnn1d", "4", seed_pb2.ACTIVATION_LAYOUT_NCL, 8, [12]),
        ("cnn2d", "3", seed_pb2.ACTIVATION_LAYOUT_NCHW, 4, [6, 6]),
        ("transformer", "block.ln2", seed_pb2.ACTIVATION_LAYOUT_NLD, 16, [5]),
        ("transformer", "block.mlp", seed_pb2.ACTIVATION_LAYOUT_NLD, 16, [5]),
    ],
)
def test_site_signatures(host: str, slot: str, layout: int, channels: int, spatial: list) -> None:
    factory, example, sites = HOSTS[host]
    mm = wrap(factory(), sites=sites, example_input=example())
    sig = mm.site_signature(slot)
    assert (sig.layout, sig.channels, list(sig.spatial), sig.dtype) == (
        layout, channels, spatial, seed_pb2.D_TYPE_FLOAT32)


def test_layout_override_and_ambiguous_rank3() -> None:
    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    host = nn.Sequential(Plain())
    with pytest.raises(ConfigError, match="NCL or NLD"):
        wrap(host, sites=["0"], example_input=torch.randn(2, 3, 5))
    mm = wrap(host, sites=["0"], example_input=torch.randn(2, 3, 5),
              config=KasminaConfig(layouts={"0": "ncl"}))
    assert mm.site_signature("0").layout == seed_pb2.ACTIVATION_LAYOUT_NCL


def test_non_tensor_site_output_is_rejected() -> None:
    host = TinyTransformer()
    with pytest.raises(ConfigError, match="returns tuple"):
        wrap(host, sites=["block.attn"], example_input=torch.randn(2, 5, 4))


def test_example_run_leaves_batchnorm_statistics_and_modes_alone() -> None:
    host = cnn1d()
    host.train()
    bn = host[3]
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    wrap(host, sites=["4"], example_input=torch.randn(16, 1, 12) * 5 + 3)
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert all(m.training for m in host.modules())


@pytest.mark.parametrize("host_name", list(HOSTS))
def test_dormant_model_is_bit_identical_to_the_host(host_name: str) -> None:
    factory, example, sites = HOSTS[host_name]
    torch.manual_seed(1)
    ref = factory()
    torch.manual_seed(1)
    host = factory()
    x = example()
    mm = wrap(host, sites=sites, example_input=x)
    mm.train()
    ref.train()
    y, y_ref = mm(x), ref(x)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    for p, q in zip(host.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_dormant_slots_have_no_hook_between_sampled_steps() -> None:
    host = mlp()
    mm = wrap(host, sites=["1", "3"], example_input=torch.randn(4, 8),
              config=KasminaConfig(stats_interval=4))
    hooked = []
    for _ in range(8):
        hooked.append(len(host[1]._forward_hooks))
        mm.step()
    # armed only for the forward that precedes every 4th step
    assert hooked == [0, 0, 0, 1, 0, 0, 0, 1]
    mm.remove_hooks()
    assert not host[1]._forward_hooks and not host[3]._forward_hooks
