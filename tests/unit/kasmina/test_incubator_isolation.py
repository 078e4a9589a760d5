"""The incubator (TRAINING) isolates the host from a seed that is already learning.

Right after germination a zero-initialised output layer makes the seed's output and its
input gradient exactly zero, so a check there cannot tell an isolated seed from one that
leaks into the host. These tests train the seed first, until its output is clearly
non-zero, and only then compare the host with an untouched copy of itself.
"""

from __future__ import annotations

import torch
from torch import nn

from esper.kasmina import KasminaConfig, SeedStage, wrap
from tests.unit.kasmina.kasmina_hosts import ZeroOutSeed, mlp

# Long incubation: the slot stays in TRAINING for the whole test.
_CFG = KasminaConfig(stats_interval=1, incubation=1000, gate_interval=1)


class _InputRecorder(nn.Module):
    """Wraps a seed and keeps the tensor it was last called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.inputs.append(h)
        return self.inner(h)


def _incubating_model():
    torch.manual_seed(11)
    host = mlp()
    x = torch.randn(32, 8)
    mm = wrap(host, sites=["1", "3"], example_input=x, config=_CFG)
    mm.train()
    seed = _InputRecorder(ZeroOutSeed(mm.site_signature("3")))
    mm.germinate("3", seed, kernel_id="sha256:k", blueprint_id="bp-1", reason="test")
    assert mm.slots["3"].current_stage is SeedStage.TRAINING
    # Train host and seed together for a few steps: the seed's output layer leaves zero.
    opt = torch.optim.SGD(mm.host.parameters(), lr=0.1)
    mm.attach_optimizer(opt)
    for _ in range(5):
        opt.zero_grad()
        (mm(x) - 1.0).pow(2).mean().backward()
        opt.step()
        mm.step()
    assert mm.slots["3"].current_stage is SeedStage.TRAINING
    return host, mm, seed, x


def _host_copy(host: nn.Module) -> nn.Module:
    ref = mlp()
    ref.load_state_dict(host.state_dict())  # the host's own keys: no slot, no hook
    return ref


def test_trained_seed_in_training_leaves_host_output_and_gradients_bit_identical() -> None:
    host, mm, seed, x = _incubating_model()
    ref = _host_copy(host)
    with torch.no_grad():
        s = seed.inner(ref[:4](x))  # the seed's output on the site's activation h
    # The precondition the first-backward test lacked: the seed really does something now,
    # so its output and its input gradient are non-zero.
    assert s.abs().max() > 1e-3
    for p in (*host.parameters(), *seed.parameters()):
        p.grad = None
    y, y_ref = mm(x), ref(x)
    assert torch.equal(y, y_ref)  # TRAINING's value is the host's, bit for bit
    (y - 1.0).pow(2).mean().backward()
    (y_ref - 1.0).pow(2).mean().backward()
    for (name, p), q in zip(host.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), f"host gradient of {name} changed by the seed"
    # The seed still learns from dL/dy.
    assert seed.inner.out.weight.grad.abs().sum() > 0
    assert seed.inner.inp.weight.grad.abs().sum() > 0


def test_seed_input_in_training_is_detached_from_the_host() -> None:
    _host, mm, seed, x = _incubating_model()
    seed.inputs.clear()
    mm(x)
    (h,) = seed.inputs
    assert not h.requires_grad and h.grad_fn is None
