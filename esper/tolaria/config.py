"""A training run's configuration: frozen dataclasses mirroring `esper.tolaria.v1.RunConfig`.

`RunConfig.from_dict` is what YAML/JSON configs go through (`esper.config.from_dict`:
unknown keys are an error naming the key); `from_proto`/`to_proto` convert to and from the
wire message by field name (`esper.config.from_message`/`to_message`), so a field added to
both the dataclass and the message needs no conversion code. Proto3 zero values of
optional knobs (`width`, `world_size`, an unset `optimizer`, `budget` or `decide_timeout`) mean "the
default", so a client may leave them out.

Every validation failure through `from_dict`/`from_proto`/`replace` is a `RunConfigError`:
a `ConfigError` that also carries the dotted `field` it is about, so the service can answer
INVALID_ARGUMENT naming it. Direct construction raises the plain `ValueError`
(`esper.config.FieldError`, naming the field).

What a run trains is a registered job (`job` + `job_params`, see `esper.jobs.registry`).
The older `task`/`host`/`width` fields still work, for clients written before jobs: with
`job` empty they name the built-in job `task` with parameters `host` and `width`
(`RunConfig.job_spec()` gives the effective pair either way).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from esper import config as _config
from esper.config import FieldError
from esper.jobs.errors import JobConfigError
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
CONTROLLERS = ("heuristic", "gnn", "random", "fixed", "none")


MAX_JOB_PARAMS = 32
MAX_JOB_PARAM_KEY = 64
MAX_JOB_PARAM_VALUE = 1024
LEGACY_FIELDS = ("task", "host", "width")
"""Superseded by `job`/`job_params`; only meaningful while `job` is empty."""
WIRE_NAMES = {"decide_timeout_s": "decide_timeout"}
"""RunConfig fields whose `esper.tolaria.v1.RunConfig` field has another name."""
WHAT = "RunConfig key(s)"


class RunConfigError(JobConfigError):
    """A run configuration value or key is invalid; `field` is its dotted path."""


def _error(message: str, key: str) -> RunConfigError:
    """`esper.config`'s error factory for run configs: the dotted key becomes `field`."""
    return RunConfigError(message, field=key or "RunConfig")


def _bound(key: str, value: float, *, lo: float, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> None:
    """Range check of a number (its type is `from_dict`'s to check)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(key, f"{value!r} must be a finite number")
    if (value <= lo if lo_open else value < lo) or (
            hi is not None and (value >= hi if hi_open else value > hi)):
        bound = f"{'>' if lo_open else '>='} {lo}" + (
            "" if hi is None else f" and {'<' if hi_open else '<='} {hi}")
        raise FieldError(key, f"{value!r} must be {bound}")


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FieldError(key, f"{value!r} is not one of: {', '.join(allowed)}")


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule; the same for every arm of a comparison."""

    name: str = "adamw"
    """"sgd" (with `momentum`) or "adamw"."""
    learning_rate: float = 3e-3
    """Peak learning rate (> 0, <= 10)."""
    weight_decay: float = 0.0
    """Decoupled (adamw) or L2 (sgd) weight decay, in [0, 1]."""
    momentum: float = 0.9
    """SGD momentum in [0, 1); ignored by adamw."""
    schedule: str = "cosine"
    """"cosine": per step from the peak down to exactly 0 at the last step of the last
    epoch (after `warmup_epochs` of linear warm-up); "constant": the peak throughout."""
    warmup_epochs: int = 0
    """Epochs of linear warm-up from 0 to the peak (>= 0, fewer than the run's epochs)."""
    clip_grad_norm: float = 0.0
    """Clip host and seed gradients to this L2 norm, each group separately; 0 disables."""

    def __post_init__(self) -> None:
        _one_of("name", self.name, OPTIMIZERS)
        _bound("learning_rate", self.learning_rate, lo=0, hi=10, lo_open=True)
        _bound("weight_decay", self.weight_decay, lo=0, hi=1)
        _bound("momentum", self.momentum, lo=0, hi=1, hi_open=True)
        _one_of("schedule", self.schedule, SCHEDULES)
        _bound("warmup_epochs", self.warmup_epochs, lo=0)
        _bound("clip_grad_norm", self.clip_grad_norm, lo=0)


@dataclass(kw_only=True, frozen=True)
class GrowthBudget:
    """How much a run may grow."""

    max_seeds: int = 4
    """Seeds that may be germinated over the run (0 <= n <= 1024)."""
    max_added_parameters: int = 0
    """Parameters growth may add (>= 0; 0: no bound)."""

    def __post_init__(self) -> None:
        _bound("max_seeds", self.max_seeds, lo=0, hi=1024)
        _bound("max_added_parameters", self.max_added_parameters, lo=0)


@dataclass(kw_only=True, frozen=True)
class RunResources:
    """What the run's worker asks of the machine (the kubernetes launcher's pod requests)."""

    gpus: int = 0
    """GPUs the worker pod requests (0 <= n <= 16); the local launchers refuse any."""
    cpu_millis: int = 0
    """CPU requested, in millicores (0 <= n <= 512000); 0: the launcher's default."""
    memory_mib: int = 0
    """Memory requested and limited to, in MiB (0 <= n <= 4194304); 0: the launcher's default."""

    def __post_init__(self) -> None:
        _bound("gpus", self.gpus, lo=0, hi=16)
        _bound("cpu_millis", self.cpu_millis, lo=0, hi=512_000)
        _bound("memory_mib", self.memory_mib, lo=0, hi=4_194_304)


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything that defines one training run (mirrors `esper.tolaria.v1.RunConfig`)."""

    job: str = ""
    """Registered job to train (`esper.jobs.registry`); empty: the built-in job named by the
    deprecated `task`, with `host` and `width` as its parameters."""
    job_params: Mapping[str, str] = field(default_factory=dict)
    """The job's parameters as strings (at most 32; keys <= 64, values <= 1024 characters),
    coerced to the job function's parameter types by the registry."""
    task: str = "mnist1d"
    """Deprecated (use `job`): built-in task ("mnist1d", "digits", "spirals"); used only
    while `job` is empty."""
    host: str = "mlp"
    """Deprecated (use `job_params.host`): host model of `task` ("mlp", "cnn")."""
    sites: tuple[str, ...] = ()
    """Seed sites as module-name patterns (fnmatch); empty: the job's own sites."""
    controller: str = "heuristic"
    """Growth controller: "heuristic", "gnn", "random", "fixed" or "none"."""
    budget: GrowthBudget = field(default_factory=GrowthBudget)
    """Seeds and parameters growth may add."""
    epochs: int = 20
    """Training epochs (1 <= n <= 10000); the schedule decays to 0 at the last one."""
    seed: int = 0
    """Seed of data splits, initialisation, batch order and controllers (>= 0)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    batch_size: int = 64
    """Training batch size (1 <= n <= 65536)."""
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs; 0: only at the end (>= 0)."""
    decide_timeout_s: float = 0.5
    """Deadline of each controller call, in seconds (> 0)."""
    width: float = 1.0
    """Deprecated (use `job_params.width`): host width multiplier of `task` (> 0, <= 64)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free-form labels (at most 32), shown by ListRuns."""
    resources: RunResources = field(default_factory=RunResources)
    """Machine resources for the run's worker (GPUs, CPU, memory)."""
    world_size: int = 1
    """Data-parallel training processes on one node (1 <= n <= 64): the worker runs under
    torchrun (gloo on CPU, NCCL on GPU). Several nodes would take torchrun's
    `--nnodes`/`--rdzv-endpoint` (see docs/ARCHITECTURE.md); not configurable here."""

    def __post_init__(self) -> None:
        if len(self.job) > 64:
            raise FieldError("job", f"{self.job!r} must be a job name of at most 64 characters")
        if not self.job and not self.task:
            raise FieldError("job", "no job given: name a registered job (`esper jobs list`)")
        for name in ("task", "host", "controller"):
            value = getattr(self, name)
            if not 1 <= len(value) <= 64:
                raise FieldError(name, f"{value!r} must be a non-empty string of at most 64 characters")
        if len(self.job_params) > MAX_JOB_PARAMS:
            raise FieldError("job_params", f"{self.job_params!r} must map at most {MAX_JOB_PARAMS} "
                             "parameter names to string values")
        for key, value in self.job_params.items():
            if not 1 <= len(key) <= MAX_JOB_PARAM_KEY:
                raise FieldError("job_params", f"parameter name {key!r} must be a string of 1-"
                                 f"{MAX_JOB_PARAM_KEY} characters")
            if len(value) > MAX_JOB_PARAM_VALUE:
                raise FieldError(f"job_params.{key}", f"{value!r} must be a string of at most "
                                 f"{MAX_JOB_PARAM_VALUE} characters")
        if self.job_params and not self.job:
            raise FieldError("job_params", "job parameters need a job: set job as well (the "
                             "deprecated task takes host and width instead)")
        object.__setattr__(self, "job_params", dict(self.job_params))
        _one_of("controller", self.controller, CONTROLLERS)
        if isinstance(self.sites, str) or not all(s for s in self.sites):
            raise FieldError("sites", f"{self.sites!r} must be a list of non-empty module-name patterns")
        object.__setattr__(self, "sites", tuple(self.sites))
        if len(self.sites) > 64:
            raise FieldError("sites", f"{len(self.sites)} sites given; at most 64 are allowed")
        _bound("epochs", self.epochs, lo=1, hi=10000)
        _bound("world_size", self.world_size, lo=1, hi=64)
        _bound("seed", self.seed, lo=0, hi=2**63 - 1)
        _bound("batch_size", self.batch_size, lo=1, hi=65536)
        _bound("checkpoint_every", self.checkpoint_every, lo=0)
        _bound("decide_timeout_s", self.decide_timeout_s, lo=0, hi=3600, lo_open=True)
        _bound("width", self.width, lo=0, hi=64, lo_open=True)
        if self.optimizer.warmup_epochs >= self.epochs:
            raise FieldError(
                "optimizer.warmup_epochs",
                f"{self.optimizer.warmup_epochs} must be fewer than epochs={self.epochs}",
            )
        if len(self.labels) > 32:
            raise FieldError("labels", f"{self.labels!r} must map strings to strings (at most 32 pairs)")
        object.__setattr__(self, "labels", dict(self.labels))

    def job_spec(self) -> tuple[str, dict[str, str]]:
        """(job name, string parameters) this run trains, whichever fields named it."""
        if self.job:
            return self.job, dict(self.job_params)
        return self.task, {"host": self.host, "width": repr(float(self.width))}

    @property
    def job_name(self) -> str:
        return self.job_spec()[0]

    # ----- plain mappings (YAML / JSON) -----

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from a plain mapping; unknown keys at any level raise `RunConfigError`."""
        if isinstance(data, Mapping) and data.get("job"):
            _no_legacy_with_job([k for k in LEGACY_FIELDS if k in data])
        return _config.from_dict(cls, data, what=WHAT, error=_error)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping that `from_dict` accepts."""
        out: dict[str, Any] = _config.to_dict(self)
        if self.job:
            for k in LEGACY_FIELDS:
                del out[k]
        if self.resources == RunResources():
            # Left out when default: checkpoints written before the field existed compare
            # equal to the run's config on resume.
            del out["resources"]
        if self.world_size == 1:
            del out["world_size"]  # likewise: older checkpoints compare equal on resume
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """`dataclasses.replace`, validated like `from_dict` (failures are `RunConfigError`)."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _config.from_dict(type(self), {**current, **changes}, what=WHAT, error=_error)

    # ----- the wire message -----

    @classmethod
    def from_proto(cls, msg: pb.RunConfig) -> RunConfig:
        """From `esper.tolaria.v1.RunConfig`; zero values of optional knobs take defaults."""
        data = _config.message_to_dict(cls, msg, names=WIRE_NAMES,
                                       zero_is_default=("width", "world_size"))
        if msg.job:
            _no_legacy_with_job([k for k in LEGACY_FIELDS if getattr(msg, k)])
            for k in LEGACY_FIELDS:
                data.pop(k, None)
        return _config.from_dict(cls, data, what=WHAT, error=_error)

    def to_proto(self) -> pb.RunConfig:
        msg = _config.to_message(self, pb.RunConfig(), names=WIRE_NAMES)
        if self.job:
            for k in LEGACY_FIELDS:
                msg.ClearField(k)
        return msg


def _no_legacy_with_job(given: list[str]) -> None:
    if given:
        raise RunConfigError(f"{given[0]}: {', '.join(given)} (deprecated) cannot be combined with "
                             "job; give the job's parameters in job_params instead", field=given[0])
