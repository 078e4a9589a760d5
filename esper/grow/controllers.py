"""In-process controllers: Tamiyo's policies run in the training process, under Tamiyo's rules.

    from esper.grow import heuristic_controller
    controller = heuristic_controller(warmup_epochs=2, plateau_window=2)

`PolicyController` wraps any `esper.tamiyo.policy.Policy`; whatever the rules refuse
(`esper.tamiyo.policy.check_decisions`: legality, embargo, budget, an offered kernel, one
germination per boundary) is withheld and said in the boundary's WAIT, exactly as the
Tamiyo service does, so the same policy decides the same here and over gRPC.

The learned policy (`gnn_controller`) imports torch_geometric when it is built, never
when `esper.grow` is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esper.errors import ConfigError
from esper.tamiyo.baselines import FixedConfig, FixedPolicy, RandomConfig, RandomPolicy
from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
from esper.tamiyo.policy import (
    KernelCandidate,
    Policy,
    check_decisions,
    finish_decisions,
    withheld_note,
)
from generated.esper.common.v1 import decision_pb2, health_pb2

_log = logging.getLogger(__name__)

STATE_FORMAT = 1


class PolicyController:
    """`Controller` running a Tamiyo policy in this process.

    Args:
        policy: any `esper.tamiyo.policy.Policy`.

    `withheld` lists, in words, every decision the rules refused so far. The policy's
    per-run memory (the heuristic's contribution history) is in `state_dict()`, so a
    grower checkpoint resumes its decisions exactly.
    """

    component = "controller"

    @property
    def uses_probes(self) -> bool:
        """Whether the policy reads `HealthSnapshot.probes` (the grower probes only for those)."""
        return bool(getattr(self.policy, "uses_probes", False))

    def __init__(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise ConfigError(
                f"policy must be an esper.tamiyo.policy.Policy, got {type(policy).__name__}")
        self.policy = policy
        self.withheld: list[str] = []

    def decide(self, snapshot: health_pb2.HealthSnapshot,
               candidates: Mapping[str, Sequence[KernelCandidate]]) -> list[decision_pb2.Decision]:
        offered = {k: list(v) for k, v in candidates.items()}
        proposed = self.policy.decide(snapshot, offered)
        decisions, withheld = check_decisions(snapshot, proposed, offered)
        for w in withheld:
            _log.info("policy %s: withheld %s %s: %s", self.policy.name,
                      decision_pb2.DecisionKind.Name(w.decision.kind), w.decision.slot_id, w.why)
            self.withheld.append(w.why)
        return finish_decisions(decisions, [withheld_note(w) for w in withheld],
                                policy=self.policy.name)

    def _histories(self) -> dict[str, Any]:
        out = {}
        for name, owner in (("policy", self.policy), ("fallback", getattr(self.policy, "fallback", None))):
            history = getattr(owner, "history", None)
            if history is not None and hasattr(history, "state_dict"):
                out[name] = history
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "policy": self.policy.name,
            "histories": {k: h.state_dict() for k, h in self._histories().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the policy's memory.

        Raises:
            ConfigError: the state is of another format or another policy.
        """
        if state.get("format") != STATE_FORMAT or state.get("policy") != self.policy.name:
            raise ConfigError(
                f"controller state is of format {state.get('format')!r} for policy "
                f"{state.get('policy')!r}; this controller runs {self.policy.name!r} "
                f"(format {STATE_FORMAT})"
            )
        histories = self._histories()
        for name, h in state.get("histories", {}).items():
            if name in histories:
                histories[name].load_state_dict(h)


def _config(cls: type, config: Any, overrides: Mapping[str, Any]) -> Any:
    if config is not None and overrides:
        raise ConfigError(f"pass either a {cls.__name__} or keyword settings, not both")
    if config is None:
        return cls.from_dict(dict(overrides))
    if isinstance(config, Mapping):
        return cls.from_dict(config)
    if not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__} or a mapping, got {type(config).__name__}")
    return config


def heuristic_controller(config: HeuristicConfig | Mapping[str, Any] | None = None,
                         **settings: Any) -> PolicyController:
    """Tamiyo's heuristic: plateau → germinate; contribution → prune/fossilize.

    Args:
        config: a `HeuristicConfig` or a mapping of its keys; or give the keys as keywords.

    Raises:
        ConfigError: an unknown key or a bad value (the message names it).
    """
    return PolicyController(HeuristicPolicy(_config(HeuristicConfig, config, settings)))


def random_controller(config: RandomConfig | Mapping[str, Any] | None = None,
                      **settings: Any) -> PolicyController:
    """Random legal actions under the same rules (the baseline a policy must beat)."""
    return PolicyController(RandomPolicy(_config(RandomConfig, config, settings)))


def fixed_controller(config: FixedConfig | Mapping[str, Any] | None = None,
                     **settings: Any) -> PolicyController:
    """Germinate at fixed epochs, fossilize after a fixed time in HOLDING."""
    return PolicyController(FixedPolicy(_config(FixedConfig, config, settings)))


def gnn_controller(policy_file: str | Path, *, trusted_keys: Any = None, uncertainty_threshold: float = 0.2,
                   heuristic: HeuristicConfig | Mapping[str, Any] | None = None) -> PolicyController:
    """The learned policy from a policy file (`esper tamiyo train` writes one, signed).

    Imports torch_geometric (seconds). Where the ensemble is unsure the heuristic
    (`heuristic` settings) decides. The file must be signed by one of `trusted_keys`
    (an `esper.blueprints.artifact.TrustedKeys`, or a directory of Ed25519 public keys;
    None: ESPER_TRUSTED_KEYS_DIR), like a kernel.

    Raises:
        PolicyFileError: the file or its weights fail verification (`UntrustedPolicyKeyError`,
            `PolicySignatureError` for its signature).
        ConfigError: bad settings, or no trusted keys.
    """
    from esper.blueprints.artifact import TrustedKeys
    from esper.tamiyo.gnn import GnnConfig, GnnPolicy, load_policy, trusted_keys_for

    gcfg = GnnConfig.from_dict({"policy_file": str(policy_file),
                                "uncertainty_threshold": uncertainty_threshold})
    trusted = (trusted_keys if isinstance(trusted_keys, TrustedKeys)
               else trusted_keys_for(trusted_keys, data_dir=None))
    ensemble, meta = load_policy(Path(gcfg.policy_file), trusted)
    fallback = HeuristicPolicy(_config(HeuristicConfig, heuristic, {}))
    return PolicyController(GnnPolicy(ensemble, uncertainty_threshold=gcfg.uncertainty_threshold,
                                      fallback=fallback, version=str(meta["version"])))
