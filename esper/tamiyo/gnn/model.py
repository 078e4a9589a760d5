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

from esper.errors import ConfigError
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
                raise ConfigError(f"gnn net {name}={v!r} must be an integer in [1, 1024]")
        if self.hidden % self.heads:
            raise ConfigError(f"gnn net hidden={self.hidden} must be divisible by heads={self.heads}")

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

    @property
    def _template(self) -> nn.Module:
        return self._template_holder[0]

    def blueprint_index(self, blueprint_ids: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._index.get(b, 0) for b in blueprint_ids], dtype=torch.long)
