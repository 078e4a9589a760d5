"""Learned policy: GATv2 deep ensemble over the model graph, with uncertainty-gated fallback.

Importing this package imports torch_geometric (seconds); the heuristic path never does.
"""

from esper.tamiyo.gnn.io import (
    PolicyFileError,
    PolicySignatureError,
    UntrustedPolicyKeyError,
    load_policy,
    save_policy,
    signing_key_for,
    trusted_keys_for,
)
from esper.tamiyo.gnn.model import ACTIONS, Ensemble, NetConfig
from esper.tamiyo.gnn.policy import GnnConfig, GnnPolicy, load_gnn_policy

__all__ = [
    "ACTIONS",
    "Ensemble",
    "GnnConfig",
    "GnnPolicy",
    "NetConfig",
    "PolicyFileError",
    "PolicySignatureError",
    "UntrustedPolicyKeyError",
    "load_gnn_policy",
    "load_policy",
    "save_policy",
    "signing_key_for",
    "trusted_keys_for",
]
