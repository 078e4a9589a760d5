"""The whole training pipeline behind `esper tamiyo train`: field reports → imitation → AWR → policy file.

1. Field reports: in-process runs under the heuristic + ε-exploration (`collect_runs` per
   task, by the `collector` the caller passes: Tolaria's trainer runs them, so it
   lives on the top floor, `esper.experiments.fieldreports.collect_inprocess`) and/or
   everything a live platform published on JetStream (with Urza's kernel statistics as
   the candidates).
2. Stage 1: imitation of the heuristic on synthetic boundaries plus the field snapshots
   (value head fitted to the field returns).
3. Stage 2: advantage-weighted regression on the behaviour's actions (`gnn.awr`).
4. A versioned policy file `<name>-<version>.json` + `.safetensors`, signed with the
   operator's Ed25519 key (`io.signing_key_for`: the key Tezzeret signs kernels with), and
   `<name>.json` replaced atomically by a copy of it (same pinned weights file, same
   signature), so a service whose `gnn.policy_file` is `<out>/<name>.json` hot-reloads the
   new version once it verifies.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esper.blueprints.artifact import SigningKey
from esper.config import from_dict
from esper.errors import ConfigError
from esper.fsutil import atomic_write
from esper.tamiyo.fieldreports import RewardConfig, RunReport
from esper.tamiyo.gnn.awr import AwrConfig, behaviour_examples, teacher_examples, train_awr
from esper.tamiyo.gnn.io import save_policy
from esper.tamiyo.gnn.model import Ensemble, NetConfig
from esper.tamiyo.gnn.train import imitation_accuracy, synthetic_examples, train_imitation
from esper.tamiyo.heuristic import HeuristicConfig

TEACHER = HeuristicConfig(fossilize_epochs=1, warmup_epochs=3)
"""The heuristic the imitation stage copies (fresh per snapshot, hence fossilize_epochs=1)."""


@dataclass(kw_only=True, frozen=True)
class TrainSpec:
    """One training of the learned policy."""

    tasks: tuple[str, ...] = ("mnist1d", "spirals")
    """Tasks to collect field reports on in process."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """Run seeds of the in-process collection (every task)."""
    collect_runs: int = 0
    """In-process runs per task (the first `collect_runs` of `seeds`); 0: none."""
    epochs: int | None = None
    """Epochs per collected run (None: the task's benchmark default)."""
    epsilon: float = 0.2
    """Exploration rate of the behaviour policy."""
    synthetic: int = 600
    """Synthetic heuristic-labelled boundaries for the imitation stage."""
    imitation_steps: int = 200
    """Optimizer steps of the imitation stage (per member)."""
    net: NetConfig = field(default_factory=NetConfig)
    """Architecture of the members (hidden, heads, layers, blueprint_dim, members)."""
    awr: AwrConfig = field(default_factory=AwrConfig)
    """The advantage-weighted stage (beta, max_weight, steps, lr, value_folds)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Rewards of the field reports (contribution_scale, accuracy_weight, parameter_rent, gate_penalty)."""
    seed: int = 0
    """Seed of the synthetic data and the members' initialisation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if isinstance(self.collect_runs, bool) or not isinstance(self.collect_runs, int) or self.collect_runs < 0:
            raise ValueError(f"collect_runs={self.collect_runs!r} must be an integer >= 0")
        if self.collect_runs > len(self.seeds):
            raise ValueError(f"collect_runs={self.collect_runs} needs that many seeds; got seeds={list(self.seeds)}")
        if not (0.0 <= self.epsilon <= 1.0):
            raise ValueError(f"epsilon={self.epsilon!r} must be in [0, 1]")
        for name in ("synthetic", "imitation_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 2):
            raise ValueError(f"epochs={self.epochs!r} must be an integer >= 2 or None")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TrainSpec:
        return from_dict(cls, data, what="tamiyo train key(s)")


@dataclass(kw_only=True)
class Trained:
    path: Path
    """The versioned policy JSON."""
    current: Path
    """`<name>.json`, the copy a service loads and hot-reloads."""
    version: str
    training: dict[str, Any]


Collect = Callable[..., list[RunReport]]
"""`collect(task=, seeds=, epsilon=, epochs=, progress=)` → run reports of in-process runs
(`esper.experiments.fieldreports.collect_inprocess`)."""


def collect(spec: TrainSpec, run: Collect, progress: Callable[[str], None] = print) -> list[RunReport]:
    reports: list[RunReport] = []
    for task in spec.tasks:
        progress(f"collecting {spec.collect_runs} run(s) of {task} under heuristic + ε={spec.epsilon} exploration")
        reports += run(task=task, seeds=spec.seeds[: spec.collect_runs], epsilon=spec.epsilon,
                       epochs=spec.epochs, progress=progress)
    return reports


def train_policy(
    spec: TrainSpec,
    out_dir: Path,
    *,
    signing_key: SigningKey,
    name: str = "gnn",
    version: str = "",
    reports: Sequence[RunReport] = (),
    collector: Collect | None = None,
    progress: Callable[[str], None] = print,
) -> Trained:
    """Collect (if `spec.collect_runs`, with `collector`), train and write a versioned policy,
    signed with `signing_key`, under `out_dir`.

    `reports` adds field reports read elsewhere (JetStream). Without any report the policy
    is imitation only.

    Raises:
        ConfigError: a bad name, or `spec.collect_runs` without a `collector`.
    """
    if not name or Path(name).name != name or name.endswith(".json"):
        raise ConfigError(f"policy name={name!r} must be a bare file stem such as 'gnn'")
    if spec.collect_runs and collector is None:
        raise ConfigError(
            f"collect_runs={spec.collect_runs} needs a collector that runs them "
            "(esper.experiments.fieldreports.collect_inprocess)")
    torch.set_num_threads(1)
    t0 = time.monotonic()
    reports = list(reports) + (collect(spec, collector, progress) if spec.collect_runs else [])
    reward = spec.reward
    synthetic = synthetic_examples(spec.synthetic, seed=spec.seed * 2 + 1, teacher_config=TEACHER)
    held = synthetic_examples(max(spec.synthetic // 3, 50), seed=spec.seed * 2 + 2, teacher_config=TEACHER)
    field_teacher = teacher_examples(reports, TEACHER, reward)
    behaviour = behaviour_examples(reports, reward)
    vocab = sorted({k.blueprint_id for e in [*synthetic, *behaviour] for ks in e.candidates.values() for k in ks})
    ens = Ensemble(spec.net, vocab, seed=spec.seed)
    training: dict[str, Any] = {"spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()},
                                "synthetic_examples": len(synthetic)}
    if behaviour:
        progress(f"training: imitation on {len(synthetic)} synthetic + {len(field_teacher)} field boundaries, "
                 f"then AWR on {len(behaviour)} behaviour boundaries from {len(reports)} run(s)")
        result = train_awr(ens, behaviour, [*synthetic, *field_teacher], config=spec.awr,
                           imitation_steps=spec.imitation_steps, seed=spec.seed)
        weights = sorted(result.weights)
        training.update({
            "method": "imitation of the heuristic, then advantage-weighted regression on field reports",
            "runs": [{"run_id": r.run_id, "task": r.task, "boundaries": len(r.boundaries),
                      "explored": sum(b.explored for b in r.boundaries), "final_val_accuracy": r.final_val_accuracy,
                      "baseline_val_accuracy": r.baseline_val_accuracy,
                      "seeds": [[o.slot_id, o.fate, o.contribution, o.slot_kind] for o in r.seeds]} for r in reports],
            "behaviour_examples": len(behaviour),
            "mean_return": result.mean_return,
            "value_mse_untrained": result.value_mse_before,
            "value_mse": result.value_mse,
            "awr_weight_median": weights[len(weights) // 2],
            "awr_weight_max": weights[-1],
            "final_losses": result.awr_losses,
            "reward": asdict(reward),
            "awr": asdict(spec.awr),
        })
        progress(f"  value head MSE against returns: {result.value_mse_before:.3f} untrained → {result.value_mse:.3f}; "
                 f"AWR weights median {training['awr_weight_median']:.2f}, max {weights[-1]:.2f}")
        field_agree = imitation_accuracy(ens, field_teacher)
        training["field_agreement_with_heuristic"] = field_agree
    else:
        progress(f"training: imitation on {len(synthetic)} synthetic boundaries (no field reports)")
        training["method"] = "imitation of the heuristic (synthetic boundaries)"
        training["final_losses"] = train_imitation(ens, synthetic, steps=spec.imitation_steps, seed=spec.seed)
    training["heldout_agreement"] = imitation_accuracy(ens, held)
    training["seconds"] = round(time.monotonic() - t0, 1)
    version = version or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{random.Random().getrandbits(16):04x}"
    out_dir = Path(out_dir)
    path = save_policy(ens, out_dir / f"{name}-{version}.json", version=version, signing_key=signing_key,
                       training=training)
    # The stable name is a copy of the versioned config (it pins the same weights file), so
    # the service's reload sees one atomic change of its policy_file.
    current = out_dir / f"{name}.json"
    atomic_write(current, path.read_bytes(), mode=0o600)
    progress(f"wrote {path} (version {version}, signed by key {signing_key.key_id}); {current} now serves it; "
             "held-out agreement with the "
             f"heuristic {training['heldout_agreement']:.1%}")
    return Trained(path=path, current=current, version=version, training=json.loads(path.read_text())["training"])
