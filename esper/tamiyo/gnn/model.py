"""The learned policy network (torch-geometric) and its deep ensemble.

One member: node features and broadcast global features → linear projection → GATv2
multi-head attention layers (residual, LayerNorm) → per-slot heads:

* action logits over ACTIONS (WAIT, GERMINATE, PRUNE, FOSSILIZE);
* a blueprint score per candidate kernel: MLP(slot embedding, blueprint embedding, kernel
  numbers), the blueprint embedding looked up by Urza blueprint id in the vocabulary the
  policy was trained with (unknown ids share index 0, so a new blueprint is judged on its
  numbers alone);
* a value head on the mean-pooled graph and global features (state value for the
  advantage-weighted objective; reported, not used to choose actions).

The ensemble holds K members trained from different initialisations; the spread of
their action distributions is the uncertainty reported with every decision.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch_geometric.nn import GATv2Conv, global_mean_pool
from torch_geometric.utils import softmax as segment_softmax

from esper.tamiyo.gnn.features import GLOBAL_FEATURES, NODE_FEATURES
from esper.tamiyo.policy import KernelCandidate

ACTIONS: tuple[str, ...] = ("wait", "germinate", "prune", "fossilize")
KERNEL_FEATURES = 5


@dataclass(kw_only=True, frozen=True)
class NetConfig:
    """Architecture of one ensemble member (stored in the policy file)."""

    hidden: int = 32
    """Width of node embeddings."""
    heads: int = 4
    """Attention heads per GATv2 layer (hidden must divide by it)."""
    layers: int = 2
    """Message-passing layers."""
    blueprint_dim: int = 8
    """Width of a blueprint embedding."""
    members: int = 4
    """Ensemble size."""

    def __post_init__(self) -> None:
        for name in ("hidden", "heads", "layers", "blueprint_dim", "members"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 1024):
                raise ValueError(f"gnn net {name}={v!r} must be an integer in [1, 1024]")
        if self.hidden % self.heads:
            raise ValueError(f"gnn net hidden={self.hidden} must be divisible by heads={self.heads}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def kernel_features(c: KernelCandidate, host_parameters: int) -> list[float]:
    n = c.outcomes
    return [
        math.log1p(c.parameters) / 12,
        min(c.parameters / max(host_parameters, 1), 4.0) / 4,
        math.log1p(n) / 5,
        (c.fossilized + 1) / (n + 2),
        math.tanh(c.mean_contribution / 0.05) if math.isfinite(c.mean_contribution) else 0.0,
    ]


class PolicyNet(nn.Module):
    """One ensemble member."""

    def __init__(self, cfg: NetConfig, vocab_size: int) -> None:
        super().__init__()
        h = cfg.hidden
        self.inp = nn.Linear(len(NODE_FEATURES) + len(GLOBAL_FEATURES), h)
        self.convs = nn.ModuleList(
            GATv2Conv(h, h // cfg.heads, heads=cfg.heads, concat=True, add_self_loops=False) for _ in range(cfg.layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.layers))
        self.slot = nn.Sequential(nn.Linear(h + len(GLOBAL_FEATURES), h), nn.ReLU())
        self.action = nn.Linear(h, len(ACTIONS))
        # Index 0: a blueprint id not in the training vocabulary.
        self.blueprint = nn.Embedding(vocab_size + 1, cfg.blueprint_dim)
        self.kernel = nn.Sequential(
            nn.Linear(h + cfg.blueprint_dim + KERNEL_FEATURES, h), nn.ReLU(), nn.Linear(h, 1)
        )
        self.value = nn.Sequential(nn.Linear(h + len(GLOBAL_FEATURES), h), nn.ReLU(), nn.Linear(h, 1))

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor, u: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.inp(torch.cat([x, u[batch]], dim=-1)))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            z = norm(z + torch.relu(conv(z, edge_index)))
        return z

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        u: torch.Tensor,
        batch: torch.Tensor,
        slot_nodes: torch.Tensor,
        slot_graph: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (slot embeddings [S, h], action logits [S, len(ACTIONS)], value [graphs])."""
        z = self.encode(x, edge_index, u, batch)
        s = self.slot(torch.cat([z[slot_nodes], u[slot_graph]], dim=-1))
        pooled = global_mean_pool(z, batch, size=u.shape[0])
        value = self.value(torch.cat([pooled, u], dim=-1)).squeeze(-1)
        return s, self.action(s), value

    def kernel_scores(self, slot_emb: torch.Tensor, bp_index: torch.Tensor, kfeat: torch.Tensor) -> torch.Tensor:
        """Scores [K] of K candidates for the slots `slot_emb` [K, h] (one row per candidate)."""
        return self.kernel(torch.cat([slot_emb, self.blueprint(bp_index), kfeat], dim=-1)).squeeze(-1)


class Ensemble(nn.Module):
    """K independently initialised members; predictions are averaged, their spread is the uncertainty."""

    def __init__(self, cfg: NetConfig, vocab: Sequence[str], *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = list(vocab)
        self._index = {b: i + 1 for i, b in enumerate(self.vocab)}
        members = []
        for k in range(cfg.members):
            torch.manual_seed(seed * 1000 + k)
            members.append(PolicyNet(cfg, len(self.vocab)))
        self.members = nn.ModuleList(members)

    def forward_all(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        u: torch.Tensor,
        batch: torch.Tensor,
        slot_nodes: torch.Tensor,
        slot_graph: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every member at once (vmap over stacked weights): [M, S, h], [M, S, A], [M, graphs].

        One vectorised pass instead of M sequential ones: on CPU the small graphs of a
        Decide are dominated by per-op overhead, which this divides by M.
        """
        params, buffers = self._stacked()
        return vmap(self._call_member, in_dims=(0, 0, None, None, None, None, None, None))(
            params, buffers, x, edge_index, u, batch, slot_nodes, slot_graph
        )

    def _call_member(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *args: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return functional_call(self._template, (params, buffers), args)

    def _stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Keyed on the parameters' in-place version counters, so training or editing a
        # member invalidates the stacked copy without anyone having to remember to.
        if not hasattr(self, "_template_holder"):
            # A weightless copy of one member's structure and the parameter list, both kept
            # outside the module tree (state_dict stays exactly the members' tensors).
            self._template_holder = [copy.deepcopy(self.members[0]).to("meta"), list(self.parameters())]
        key = tuple(p._version for p in self._template_holder[1])
        if getattr(self, "_stack_key", None) != key:
            params, buffers = stack_module_state(list(self.members))
            self._stack = ({k: v.detach() for k, v in params.items()}, buffers)
            self._stack_key = key
        return self._stack

    def infer(
        self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, u: torch.Tensor, slot_nodes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference on ONE graph for every member at once: slot embeddings [M, S, h], action logits [M, S, A].

        The same computation as `forward_all` (each member's `PolicyNet.forward`, GATv2 as
        torch-geometric defines it: x_l = W_l z, x_r = W_r z, e_ji = att · LeakyReLU_0.2(x_l[j]
        + x_r[i]), softmax over i's incoming edges, sum of e_ji x_l[j], + bias), written on
        the members' stacked weights as batched matmuls. On CPU a Decide's graphs are small
        enough that per-op dispatch dominates; this path issues a few dozen ops for the
        whole ensemble where the module path (vmap over functional_call through
        MessagePassing) costs several times more. `test_gnn` checks the two agree.
        """
        p, _ = self._stacked()
        cfg = self.cfg
        m, n = len(self.members), x.shape[0]
        heads, width = cfg.heads, cfg.hidden // cfg.heads
        z = torch.relu(_linear(torch.cat([x, u.expand(n, -1)], dim=-1), p["inp.weight"], p["inp.bias"]))
        for i in range(cfg.layers):
            c = f"convs.{i}."
            xl = _linear(z, p[c + "lin_l.weight"], p[c + "lin_l.bias"]).view(m, n, heads, width)
            xr = _linear(z, p[c + "lin_r.weight"], p[c + "lin_r.bias"]).view(m, n, heads, width)
            xj = xl[:, src]
            e = (torch.nn.functional.leaky_relu(xj + xr[:, dst], 0.2) * p[c + "att"]).sum(-1)
            alpha = segment_softmax(e, dst, num_nodes=n, dim=1)
            out = torch.zeros(m, n, heads, width, dtype=z.dtype).index_add_(1, dst, xj * alpha.unsqueeze(-1))
            out = out.view(m, n, cfg.hidden) + p[c + "bias"].unsqueeze(1)
            h = z + torch.relu(out)
            norm = f"norms.{i}."
            h = torch.nn.functional.layer_norm(h, (cfg.hidden,))
            z = h * p[norm + "weight"].unsqueeze(1) + p[norm + "bias"].unsqueeze(1)
        zs = z[:, slot_nodes]
        s = torch.relu(_linear(torch.cat([zs, u.expand(m, len(slot_nodes), -1)], dim=-1),
                               p["slot.0.weight"], p["slot.0.bias"]))
        return s, _linear(s, p["action.weight"], p["action.bias"])

    def infer_kernel_scores(self, slot_emb: torch.Tensor, bp_index: torch.Tensor, kfeat: torch.Tensor) -> torch.Tensor:
        """Every member's `kernel_scores` at once: slot_emb [M, K, h], bp_index [K], kfeat [K, F] → [M, K]."""
        p, _ = self._stacked()
        m, k = slot_emb.shape[0], bp_index.shape[0]
        bp = p["blueprint.weight"][:, bp_index]
        hidden = torch.relu(_linear(torch.cat([slot_emb, bp, kfeat.expand(m, k, -1)], dim=-1),
                                    p["kernel.0.weight"], p["kernel.0.bias"]))
        return _linear(hidden, p["kernel.2.weight"], p["kernel.2.bias"]).squeeze(-1)

    @property
    def _template(self) -> nn.Module:
        return self._template_holder[0]

    def blueprint_index(self, blueprint_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._index.get(b, 0) for b in blueprint_ids], dtype=torch.long)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-member linear layer: x [N, in] or [M, N, in], weight [M, out, in], bias [M, out] → [M, N, out]."""
    if x.dim() == 2:
        return torch.baddbmm(bias.unsqueeze(1), x.expand(weight.shape[0], -1, -1), weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
