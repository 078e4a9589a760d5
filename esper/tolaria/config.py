"""A training run's configuration: frozen dataclasses mirroring `esper.tolaria.v1.RunConfig`.

`RunConfig.from_dict` is what YAML/JSON configs go through (unknown keys are an error
naming the key); `from_proto`/`to_proto` convert to and from the wire message. Proto3
zero values of optional knobs (`width`, an unset `optimizer`, `budget` or
`decide_timeout`) mean "the default", so a client may leave them out.

Every validation failure is a `RunConfigError`: a `ConfigError` that also carries the
dotted `field` it is about, so the service can answer INVALID_ARGUMENT naming it.

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


class RunConfigError(JobConfigError):
    """A run configuration value or key is invalid; `field` is its dotted path."""


def _fail(field_name: str, message: str) -> RunConfigError:
    return RunConfigError(f"{field_name}: {message}", field=field_name)


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    if not isinstance(data, Mapping):
        raise _fail(where or cls.__name__, f"expects a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        first = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RunConfigError(
            f"unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}"
            f"{' in ' + where if where else ''}; allowed: {', '.join(sorted(known))}",
            field=first,
        )


def _number(name: str, value: Any, *, lo: float, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, f"{value!r} must be a finite number")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        lo_s = f"{'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi == math.inf else f" and {'<' if hi_open else '<='} {hi}"
        raise _fail(name, f"{value!r} must be {lo_s}{hi_s}")


def _integer(name: str, value: Any, *, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, f"{value!r} must be an integer")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" + ("" if hi is None else f" and <= {hi}")
        raise _fail(name, f"{value!r} must be {bound}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _fail(name, f"{value!r} is not one of: {', '.join(allowed)}")


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
        _one_of("optimizer.name", self.name, OPTIMIZERS)
        _number("optimizer.learning_rate", self.learning_rate, lo=0, hi=10, lo_open=True)
        _number("optimizer.weight_decay", self.weight_decay, lo=0, hi=1)
        _number("optimizer.momentum", self.momentum, lo=0, hi=1, hi_open=True)
        _one_of("optimizer.schedule", self.schedule, SCHEDULES)
        _integer("optimizer.warmup_epochs", self.warmup_epochs, lo=0)
        _number("optimizer.clip_grad_norm", self.clip_grad_norm, lo=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizerConfig:
        _check_keys(cls, data, "optimizer")
        return cls(**dict(data))


@dataclass(kw_only=True, frozen=True)
class GrowthBudget:
    """How much a run may grow."""

    max_seeds: int = 4
    """Seeds that may be germinated over the run (0 <= n <= 1024)."""
    max_added_parameters: int = 0
    """Parameters growth may add (>= 0; 0: no bound)."""

    def __post_init__(self) -> None:
        _integer("budget.max_seeds", self.max_seeds, lo=0, hi=1024)
        _integer("budget.max_added_parameters", self.max_added_parameters, lo=0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthBudget:
        _check_keys(cls, data, "budget")
        return cls(**dict(data))


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
        _integer("resources.gpus", self.gpus, lo=0, hi=16)
        _integer("resources.cpu_millis", self.cpu_millis, lo=0, hi=512_000)
        _integer("resources.memory_mib", self.memory_mib, lo=0, hi=4_194_304)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResources:
        _check_keys(cls, data, "resources")
        return cls(**dict(data))


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
        if not isinstance(self.job, str) or len(self.job) > 64:
            raise _fail("job", f"{self.job!r} must be a job name of at most 64 characters")
        if not self.job and not self.task:
            raise _fail("job", "no job given: name a registered job (`esper jobs list`)")
        for name in ("task", "host", "controller"):
            value = getattr(self, name)
            if not isinstance(value, str) or not 1 <= len(value) <= 64:
                raise _fail(name, f"{value!r} must be a non-empty string of at most 64 characters")
        if not isinstance(self.job_params, Mapping) or len(self.job_params) > MAX_JOB_PARAMS:
            raise _fail("job_params", f"{self.job_params!r} must map at most {MAX_JOB_PARAMS} "
                        "parameter names to string values")
        for key, value in self.job_params.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_JOB_PARAM_KEY:
                raise _fail("job_params", f"parameter name {key!r} must be a string of 1-"
                            f"{MAX_JOB_PARAM_KEY} characters")
            if not isinstance(value, str) or len(value) > MAX_JOB_PARAM_VALUE:
                raise _fail(f"job_params.{key}", f"{value!r} must be a string of at most "
                            f"{MAX_JOB_PARAM_VALUE} characters")
        if self.job_params and not self.job:
            raise _fail("job_params", "job parameters need a job: set job as well (the "
                        "deprecated task takes host and width instead)")
        object.__setattr__(self, "job_params", dict(self.job_params))
        _one_of("controller", self.controller, CONTROLLERS)
        if isinstance(self.sites, str) or not all(isinstance(s, str) and s for s in self.sites):
            raise _fail("sites", f"{self.sites!r} must be a list of non-empty module-name patterns")
        object.__setattr__(self, "sites", tuple(self.sites))
        if len(self.sites) > 64:
            raise _fail("sites", f"{len(self.sites)} sites given; at most 64 are allowed")
        if not isinstance(self.budget, GrowthBudget):
            raise _fail("budget", f"{self.budget!r} must be a GrowthBudget")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise _fail("optimizer", f"{self.optimizer!r} must be an OptimizerConfig")
        if not isinstance(self.resources, RunResources):
            raise _fail("resources", f"{self.resources!r} must be a RunResources")
        _integer("epochs", self.epochs, lo=1, hi=10000)
        _integer("world_size", self.world_size, lo=1, hi=64)
        _integer("seed", self.seed, lo=0, hi=2**63 - 1)
        _integer("batch_size", self.batch_size, lo=1, hi=65536)
        _integer("checkpoint_every", self.checkpoint_every, lo=0)
        _number("decide_timeout_s", self.decide_timeout_s, lo=0, hi=3600, lo_open=True)
        _number("width", self.width, lo=0, hi=64, lo_open=True)
        if self.optimizer.warmup_epochs >= self.epochs:
            raise _fail(
                "optimizer.warmup_epochs",
                f"{self.optimizer.warmup_epochs} must be fewer than epochs={self.epochs}",
            )
        if not isinstance(self.labels, Mapping) or len(self.labels) > 32 or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise _fail("labels", f"{self.labels!r} must map strings to strings (at most 32 pairs)")
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
        _check_keys(cls, data, "")
        if data.get("job"):
            _no_legacy_with_job([k for k in LEGACY_FIELDS if k in data])
        kwargs = dict(data)
        if "budget" in kwargs and not isinstance(kwargs["budget"], GrowthBudget):
            kwargs["budget"] = GrowthBudget.from_dict(kwargs["budget"])
        if "optimizer" in kwargs and not isinstance(kwargs["optimizer"], OptimizerConfig):
            kwargs["optimizer"] = OptimizerConfig.from_dict(kwargs["optimizer"])
        if "resources" in kwargs and not isinstance(kwargs["resources"], RunResources):
            kwargs["resources"] = RunResources.from_dict(kwargs["resources"])
        if "sites" in kwargs and isinstance(kwargs["sites"], list):
            kwargs["sites"] = tuple(kwargs["sites"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping that `from_dict` accepts."""
        out = dataclasses.asdict(self)
        out["sites"] = list(self.sites)
        out["labels"] = dict(self.labels)
        out["job_params"] = dict(self.job_params)
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
        return dataclasses.replace(self, **changes)

    # ----- the wire message -----

    @classmethod
    def from_proto(cls, msg: pb.RunConfig) -> RunConfig:
        """From `esper.tolaria.v1.RunConfig`; zero values of optional knobs take defaults."""
        d = cls()
        kwargs: dict[str, Any] = {"sites": tuple(msg.sites)}
        if msg.job:
            _no_legacy_with_job([k for k in LEGACY_FIELDS if getattr(msg, k)])
            kwargs.update(job=msg.job, job_params=dict(msg.job_params))
        else:
            if msg.job_params:
                raise _fail("job_params", "job parameters need a job: set job as well (the "
                            "deprecated task takes host and width instead)")
            kwargs.update(task=msg.task, host=msg.host,
                          width=float(msg.width) if msg.width else d.width)
        kwargs.update({
            "controller": msg.controller,
            "epochs": int(msg.epochs),
            "seed": int(msg.seed),
            "batch_size": int(msg.batch_size),
            "checkpoint_every": int(msg.checkpoint_every),
            "labels": dict(msg.labels),
        })
        if msg.HasField("budget"):
            kwargs["budget"] = GrowthBudget(
                max_seeds=int(msg.budget.max_seeds),
                max_added_parameters=int(msg.budget.max_added_parameters),
            )
        if msg.HasField("optimizer"):
            o = msg.optimizer
            kwargs["optimizer"] = OptimizerConfig(
                name=o.name,
                learning_rate=float(o.learning_rate),
                weight_decay=float(o.weight_decay),
                momentum=float(o.momentum),
                schedule=o.schedule,
                warmup_epochs=int(o.warmup_epochs),
                clip_grad_norm=float(o.clip_grad_norm),
            )
        if msg.HasField("decide_timeout"):
            kwargs["decide_timeout_s"] = msg.decide_timeout.ToTimedelta().total_seconds()
        if msg.HasField("resources"):
            r = msg.resources
            kwargs["resources"] = RunResources(gpus=int(r.gpus), cpu_millis=int(r.cpu_millis),
                                               memory_mib=int(r.memory_mib))
        kwargs["world_size"] = int(msg.world_size) or 1  # proto3 zero: unset, one process
        return cls(**kwargs)

    def to_proto(self) -> pb.RunConfig:
        msg = pb.RunConfig(
            sites=list(self.sites),
            controller=self.controller,
            budget=pb.GrowthBudget(
                max_seeds=self.budget.max_seeds,
                max_added_parameters=self.budget.max_added_parameters,
            ),
            epochs=self.epochs,
            seed=self.seed,
            optimizer=pb.OptimizerConfig(
                name=self.optimizer.name,
                learning_rate=self.optimizer.learning_rate,
                weight_decay=self.optimizer.weight_decay,
                momentum=self.optimizer.momentum,
                schedule=self.optimizer.schedule,
                warmup_epochs=self.optimizer.warmup_epochs,
                clip_grad_norm=self.optimizer.clip_grad_norm,
            ),
            batch_size=self.batch_size,
            checkpoint_every=self.checkpoint_every,
            labels=dict(self.labels),
            world_size=self.world_size,
        )
        if self.job:
            msg.job = self.job
            msg.job_params.update(self.job_params)
        else:
            msg.task, msg.host, msg.width = self.task, self.host, self.width
        msg.decide_timeout.FromNanoseconds(round(self.decide_timeout_s * 1e9))
        msg.resources.CopyFrom(pb.RunResources(gpus=self.resources.gpus,
                                               cpu_millis=self.resources.cpu_millis,
                                               memory_mib=self.resources.memory_mib))
        return msg


def _no_legacy_with_job(given: list[str]) -> None:
    if given:
        raise _fail(given[0], f"{', '.join(given)} (deprecated) cannot be combined with job; "
                    "give the job's parameters in job_params instead")
