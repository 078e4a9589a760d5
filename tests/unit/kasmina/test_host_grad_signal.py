"""A parameterless site (an activation) still reports a host gradient signal: the norm of
the gradient arriving at its output, so the controller's slot choice has something to read."""

from __future__ import annotations

import torch
from torch import nn

import esper.kasmina as k


def test_activation_site_reports_output_gradient_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 4)
    mm = k.wrap(model, sites=["0", "1"], example_input=x,
                config=k.KasminaConfig(stats_interval=1))
    seen: list[torch.Tensor] = []
    model[1].register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].detach()))
    for _ in range(3):
        model.zero_grad()
        mm(x).pow(2).sum().backward()
        mm.step()
    health = {h.slot_id: h for h in mm.end_epoch()}
    expected = float(torch.stack([torch.linalg.vector_norm(g) for g in seen]).mean())
    assert health["1"].host_grad_norm > 0
    assert abs(health["1"].host_grad_norm - expected) < 1e-4 * max(1.0, expected)
    # A site with parameters keeps reporting its parameter-gradient norm.
    assert health["0"].host_grad_norm > 0
