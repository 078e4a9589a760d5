"""Policies by name. The learned policy is imported only when asked for (torch_geometric is slow to import)."""

from __future__ import annotations

from pathlib import Path

from esper.tamiyo.config import TamiyoConfig
from esper.tamiyo.policy import Policy


def make_policy(config: TamiyoConfig, *, data_dir: Path | None = None) -> Policy:
    """The policy `config.policy` names, built from its own settings section.

    `data_dir` is the platform's: a GNN policy file is verified under the keys in its
    `trusted_keys` directory unless `gnn.trusted_keys_dir` or ESPER_TRUSTED_KEYS_DIR says otherwise.
    """
    if config.policy == "heuristic":
        from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy

        return HeuristicPolicy(HeuristicConfig.from_dict(config.heuristic))
    if config.policy == "random":
        from esper.tamiyo.baselines import RandomConfig, RandomPolicy

        return RandomPolicy(RandomConfig.from_dict(config.random))
    if config.policy == "fixed":
        from esper.tamiyo.baselines import FixedConfig, FixedPolicy

        return FixedPolicy(FixedConfig.from_dict(config.fixed))
    if config.policy == "gnn":
        from esper.tamiyo.gnn import load_gnn_policy

        return load_gnn_policy(config, data_dir=data_dir)
    # TamiyoConfig.__post_init__ admits only the names above.
    raise AssertionError(config.policy)
