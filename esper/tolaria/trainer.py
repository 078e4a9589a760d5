"""Tolaria's training loop: a job's model, grown by `esper.grow`, epoch by epoch.

The loop is the story:

    for each epoch:
        train_epoch()       # pure torch; the governor watches every step's loss
        evaluate()          # validation loss and metric
        maybe_control()     # the grower's boundary: snapshot → controller → germinate / prune / fossilize
        maybe_checkpoint()  # atomic, pickle-free, resumable bit for bit

Control runs before the checkpoint (not after) so that a checkpoint holds the effects of
the decisions taken at its boundary, and a resumed run never asks the controller twice.

Tolaria's trainer is a client of `esper.grow` like any user's loop: the `Grower` wraps the
job's model, builds the health snapshot, asks the controller, applies its decisions and
emits the lifecycle events; the trainer owns what is around it. Every part is a component
given to it, each saving its own state: the `Job` (model, loaders, loss, metric, example
input, sites), the optimizer and LR scheduler (`esper.tolaria.optim`), the `Checkpointer`,
the `Governor`, the `FlopMeter`, the controller and the kernel source (in process:
`esper.grow.heuristic_controller()`, `BuiltinKernels`; under the service:
`esper.tamiyo.client.TamiyoController`, `esper.urza.source.UrzaKernels`).
`build_trainer(config, ...)` builds the components a `RunConfig` describes.

Data-parallel (a run with `world_size` > 1, each rank a process under torchrun): pass
`distributed=esper.grow.distributed.DistributedGrowth()`. Every rank runs this same loop on
its shard of the training loader; gradients (with the step's loss and the stop flag) are
averaged by one all-reduce per step; the controller and the kernel catalog are asked on
rank 0 and their answers broadcast; every rank evaluates the whole validation set (equal
weights give equal numbers, so the governor and the grower judge alike without another
collective); only rank 0 writes checkpoints, and every rank resumes from the one it names.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esper.errors import ConfigError, FailedPreconditionError
from esper.grow import (
    Controller,
    EpochReport,
    EventSink,
    Grower,
    GrowthConfig,
    GrowthHistory,
    KernelSource,
)
from esper.grow.distributed import DistributedGrowth
from esper.jobs.registry import JobRegistry, default_registry
from esper.jobs.sites import resolve_sites
from esper.jobs.spec import Job
from esper.kasmina import KasminaConfig
from esper.tolaria.checkpoint import CheckpointConfig, Checkpointer, read_state
from esper.tolaria.config import RunConfig
from esper.tolaria.flops import FlopMeter
from esper.tolaria.governor import Governor, GovernorConfig
from esper.tolaria.optim import build_optimizer, build_scheduler
from generated.esper.common.v1 import health_pb2
from generated.esper.oona.v1 import events_pb2

CONTRIBUTION_ROWS = 256
"""Validation rows the counterfactual contribution is measured on (a fixed held-out batch)."""


@dataclass(kw_only=True)
class RunResult:
    """How a run ended."""

    completed: bool
    """False when it stopped early on request (a checkpoint holds where it was)."""
    epochs: int
    global_step: int
    test_loss: float
    test_accuracy: float
    val_accuracy: float
    parameters: int
    """Trainable parameters at the end (host + live and fossilized seeds)."""
    train_flops: float
    wall_seconds: float
    rollbacks: int
    fossilized: dict[str, str]
    """slot id → kernel id of every fossilized seed (the grown topology)."""
    history: GrowthHistory
    """The grower's per-boundary records (finite losses, parameters, decisions, ...)."""


def build_job(config: RunConfig, registry: JobRegistry | None = None) -> Job:
    """The run's job, built by its registered function under the run's seed.

    torch's global RNG is seeded with `config.seed` first, so the job's model starts from
    the same weights every time the run (or its resumed worker) builds it.

    Raises:
        JobConfigError: the job is not registered or a parameter is bad (field named).
        JobBuildError: the job function raised or returned no `Job`.
    """
    name, params = config.job_spec()
    torch.manual_seed(config.seed)
    return (registry or default_registry()).build(
        name, params, run={"seed": config.seed, "batch_size": config.batch_size})


def steps_per_epoch(job: Job) -> int:
    """Batches in one pass over the job's training loader.

    Raises:
        ConfigError: the loader has no length or yields no batches.
    """
    try:
        n = len(job.train_loader)
    except TypeError:
        raise ConfigError(
            f"job {job.name!r}: its train_loader has no length; the schedule needs the number "
            "of batches per epoch (give the dataset a __len__)") from None
    if n < 1:
        raise ConfigError(f"job {job.name!r}: its train_loader yields no batches")
    return n


def build_trainer(
    config: RunConfig,
    *,
    run_id: str,
    job: Job | None = None,
    registry: JobRegistry | None = None,
    controller: Controller | None = None,
    kernels: KernelSource | None = None,
    event_sink: EventSink | None = None,
    checkpoint_dir: Path | None = None,
    keep_checkpoints: int = 2,
    kasmina: KasminaConfig | None = None,
    governor: GovernorConfig | None = None,
    stop: threading.Event | None = None,
    distributed: DistributedGrowth | None = None,
) -> Trainer:
    """A `Trainer` with the components `config` describes.

    Args:
        job: what to train; None: `build_job(config, registry)`.
        controller, kernels: decide growth / supply seed modules (None: the host as it is).
        checkpoint_dir: where checkpoints go (None: none are written).
        distributed: the process group of a data-parallel run (None: one process); the
            job's training loader is replaced by this rank's shard of it.
    """
    job = job if job is not None else build_job(config, registry)
    if distributed is not None and distributed.active:
        # Before the schedule is built: an epoch is this rank's batches, not the whole set's.
        job = dataclasses.replace(job, train_loader=distributed.shard(job.train_loader, seed=config.seed))
    optimizer = build_optimizer(config.optimizer, job.model.parameters())
    scheduler = build_scheduler(config.optimizer, optimizer, steps_per_epoch=steps_per_epoch(job),
                                epochs=config.epochs)
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = CheckpointConfig(directory=checkpoint_dir, every=config.checkpoint_every,
                                        keep=keep_checkpoints).build()
    return Trainer(job, config, run_id=run_id, optimizer=optimizer, scheduler=scheduler,
                   controller=controller, kernels=kernels, checkpointer=checkpointer,
                   governor=Governor(governor), kasmina=kasmina, event_sink=event_sink, stop=stop,
                   distributed=distributed)


class Trainer:
    """One training run. Build it (`build_trainer`), optionally `resume()`, then `run()`.

    Args:
        job: the model, loaders, loss, metric, example input and sites.
        config: the run (epochs, budget, seed sites, clipping, checkpoint interval).
        run_id: identifies the run in events and snapshots.
        optimizer: over the host's parameters (seeds join it at germination).
        scheduler: a torch LR scheduler of `optimizer`, stepped once per batch position of
            the run: its `last_epoch` is epoch × steps per epoch + batch index, so steps
            a governor rollback skips do not shift the schedule.
        controller: decides growth; None trains the host as it is.
        kernels: where seed modules come from (needed with a controller).
        checkpointer: writes and finds checkpoints (None: none are written).
        governor: divergence detection and rollback.
        flops: counts training FLOPs.
        kasmina: seed-slot behaviour (incubation, blending, gates).
        event_sink: receives every event envelope.
        stop: set from any thread to stop at the next step boundary.
        distributed: the process group of a data-parallel run (see the module docstring);
            None: one process. Give it the job with its training loader sharded
            (`build_trainer` does).
    """

    def __init__(
        self,
        job: Job,
        config: RunConfig,
        *,
        run_id: str,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        controller: Controller | None = None,
        kernels: KernelSource | None = None,
        checkpointer: Checkpointer | None = None,
        governor: Governor | None = None,
        flops: FlopMeter | None = None,
        kasmina: KasminaConfig | None = None,
        event_sink: EventSink | None = None,
        stop: threading.Event | None = None,
        distributed: DistributedGrowth | None = None,
    ) -> None:
        self.job, self.config = job, config
        self.ddp = distributed if distributed is not None and distributed.active else None
        self._stop_agreed = False
        if self.ddp is not None:
            self.ddp.broadcast_module(job.model)  # every rank starts from rank 0's host
            controller, kernels = self.ddp.controller(controller), self.ddp.kernels(kernels)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.checkpointer = checkpointer
        self.governor = governor or Governor()
        self.flops = flops or FlopMeter()
        self.event_sink = event_sink
        self.stop = stop or threading.Event()
        self.steps_per_epoch = steps_per_epoch(job)
        self.total_steps = config.epochs * self.steps_per_epoch
        budget = config.budget
        self.grower = Grower(
            job.model,
            sites=resolve_sites(job.model, config.sites or job.sites),
            example_input=job.example_input,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=job.loss_fn,
            held_out=_head(next(iter(job.val_loader)), CONTRIBUTION_ROWS),
            controller=controller,
            kernels=kernels,
            config=GrowthConfig(max_seeds=budget.max_seeds,
                                max_added_parameters=budget.max_added_parameters or None,
                                total_epochs=config.epochs, task=config.job_name),
            kasmina=kasmina,
            event_sink=self._on_event,
            run_id=run_id,
            event_source="tolaria",
        )
        self.model = self.grower.model
        self._step_in_epoch = 0
        self._epoch_acc = {"loss_sum": 0.0, "seen": 0}
        self._last_lr = float(optimizer.param_groups[0]["lr"])
        self._train_loss: float | None = None
        self._val: tuple[float, float] = (math.nan, math.nan)
        self._rolled_back = False
        self._started = time.perf_counter()
        self._elapsed_before = 0.0
        self._remember_good()

    # ----- the story -----

    def run(self) -> RunResult:
        """Train until the last epoch or a stop request; returns the outcome."""
        self._started = time.perf_counter()
        while self.epoch < self.config.epochs:
            if not self.train_epoch():
                self.save_checkpoint()
                return self._result(completed=False)
            self.evaluate()
            self.maybe_control()
            self.maybe_checkpoint()
        test = self._eval_on(self.job.test_loader) if self.job.test_loader is not None else None
        return self._result(completed=True, test=test)

    def train_epoch(self) -> bool:
        """One pass over the training set in this epoch's order.

        Returns False when a stop was requested (the model is at a step boundary).
        """
        self.model.train()
        batches = iter(_epoch_batches(self.job.train_loader, self.epoch))
        for _ in range(self._step_in_epoch):  # resumed mid-epoch: replay up to where it was
            next(batches)
        for x, y in batches:
            if self._stopping():
                return False
            loss = self._train_step(x, y)
            self._step_in_epoch += 1
            why = self.governor.check(loss)
            if why is not None:
                self._roll_back(why)
                break
            n = _rows(y)
            self._epoch_acc["loss_sum"] += loss * n
            self._epoch_acc["seen"] += n
        if self.ddp is not None:  # the epoch's loss over every rank's rows
            self._epoch_acc["loss_sum"], self._epoch_acc["seen"] = self.ddp.all_reduce_sum(
                [self._epoch_acc["loss_sum"], self._epoch_acc["seen"]])
        seen = self._epoch_acc["seen"]
        self._train_loss = self._epoch_acc["loss_sum"] / seen if seen else None
        self._step_in_epoch = 0
        self._epoch_acc = {"loss_sum": 0.0, "seen": 0}
        # A rollback ends the epoch early; the schedule is by position, so it skips ahead.
        while self.scheduler.last_epoch < (self.epoch + 1) * self.steps_per_epoch:
            self.scheduler.step()
        return True

    def evaluate(self) -> tuple[float, float]:
        """Validation loss and metric of the epoch just trained."""
        self._val = self._eval_on(self.job.val_loader)
        return self._val

    def maybe_control(self) -> EpochReport:
        """The grower's epoch boundary: Kasmina closes the epoch and, before the last one,
        the controller decides and its decisions are applied; events and history follow."""
        val_loss, val_accuracy = self._val
        report = self.grower.end_epoch(
            train_loss=self._train_loss, val_loss=_finite(val_loss), val_accuracy=_finite(val_accuracy),
            learning_rate=self._last_lr, train_flops=self.flops.total, stepped=not self._rolled_back)
        self._rolled_back = False
        self._remember_good()
        return report

    def maybe_checkpoint(self) -> Path | None:
        if self.checkpointer is not None and self.checkpointer.due(
                self.epoch, last=self.epoch == self.config.epochs):
            return self.save_checkpoint()
        return None

    # ----- one step -----

    def _train_step(self, x: Any, y: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.flops.step(_rows(y)):
            loss = self.job.loss_fn(_forward(self.model, x), y)
            loss.backward()
        value = float(loss.detach())
        if self.ddp is not None:
            # One all-reduce: gradients, this step's loss (every rank's governor sees the
            # mean, so a divergence is everyone's) and whether any rank was asked to stop.
            value, stop = self.ddp.all_reduce_grads(self.optimizer, value, stop=self.stop.is_set())
            self._stop_agreed = self._stop_agreed or stop
        if not math.isfinite(value):
            # Do not let a non-finite step touch the weights; the governor rolls back.
            self.optimizer.zero_grad(set_to_none=True)
            return value
        clip = self.config.optimizer.clip_grad_norm
        if clip > 0:
            self.model.clip_grad_norms(clip, clip)
        self._last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.grower.step()
        return value

    @torch.no_grad()
    def _eval_on(self, loader: Any) -> tuple[float, float]:
        """(loss, metric) over `loader`, each the row-weighted mean of its batch values
        (metric NaN when the job has none)."""
        was = self.model.training
        self.model.eval()
        batches: list[tuple[float, float, int]] = []
        metric_fn = self.job.metric_fn
        try:
            for x, y in loader:
                out = _forward(self.model, x)
                metric = float(metric_fn(out, y)) if metric_fn is not None else float("nan")
                batches.append((float(self.job.loss_fn(out, y)), metric, _rows(y)))
        finally:
            self.model.train(was)
        if not batches:
            raise ConfigError(f"job {self.job.name!r}: an evaluation loader yielded no batches")
        if len(batches) == 1:  # as it is: x * n / n need not round back to x
            return batches[0][0], batches[0][1]
        rows = sum(n for _, _, n in batches)
        return (sum(v * n for v, _, n in batches) / rows,
                sum(m * n for _, m, n in batches) / rows)

    # ----- the governor -----

    def _roll_back(self, why: str) -> None:
        """Restore the last good state, prune every live seed, reset optimizer state."""
        good = self.governor.begin_rollback(why)
        self.model.load_state_dict(good.model)
        pruned = self.grower.prune_live(f"governor rollback: {why}")
        self.optimizer.state.clear()
        self.flops.invalidate()
        self._rolled_back = True
        self.grower.record_degradation(
            "governor", "rollback",
            f"{why}; rolled back to the state after epoch {good.epoch}, pruned "
            f"{pruned or 'no seeds'}, optimizer state reset (rollback {self.governor.rollbacks})")

    def _remember_good(self) -> None:
        self.governor.remember(self.epoch, self.model.state_dict(), self.optimizer.state_dict())

    # ----- checkpoints -----

    def state_dict(self) -> dict[str, Any]:
        """Every component's state, at a step boundary: what a checkpoint holds."""
        np_state = np.random.get_state()
        return {
            "run": {"run_id": self.run_id, "config": self.config.to_dict()},
            "model": self.model.host.state_dict(),
            "grower": self.grower.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "flops": self.flops.state_dict(),
            "governor": self.governor.state_dict(),
            "loop": {"step_in_epoch": self._step_in_epoch, "epoch_acc": dict(self._epoch_acc),
                     "last_lr": self._last_lr,
                     "elapsed": self._elapsed_before + time.perf_counter() - self._started},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                              int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`: the same run resumes bit for bit.

        Raises:
            FailedPreconditionError: the state is of a run with another config.
        """
        saved, current = state["run"]["config"], self.config.to_dict()
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            raise FailedPreconditionError(
                f"the checkpoint is of a run with a different config ({', '.join(differ)} "
                "differ); resume it with the config it was written with")
        self.model.host.load_state_dict(state["model"])
        # The grower first: seeds are rebuilt and rejoin the optimizer, whose state (and the
        # scheduler's per-group lists) then fit.
        self.grower.load_state_dict(state["grower"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.flops.load_state_dict(state["flops"])
        self.governor.load_state_dict(state["governor"])
        loop = state["loop"]
        self._step_in_epoch, self._epoch_acc = int(loop["step_in_epoch"]), dict(loop["epoch_acc"])
        self._last_lr, self._elapsed_before = float(loop["last_lr"]), float(loop["elapsed"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        n = rng["numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
        self._remember_good()

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the run as it is now (at a step boundary); rank 0 alone
        writes (every rank holds the same state)."""
        if self.checkpointer is None or (self.ddp is not None and not self.ddp.is_main):
            return None
        return self.checkpointer.save(self.epoch, self.state_dict())

    def resume(self, path: Path | None = None) -> bool:
        """Load `path` (default: the checkpointer's latest); False if there is none."""
        if path is None:
            path = self.checkpointer.latest() if self.checkpointer is not None else None
            if self.ddp is not None:
                # Rank 0's choice for all: every rank continues from the same state.
                named = self.ddp.broadcast_text(str(path) if path is not None else "")
                path = Path(named) if named else None
            if path is None:
                return False
        self.load_state_dict(read_state(path))
        return True

    def _stopping(self) -> bool:
        """Stop before the next step? Data-parallel ranks stop at the same step: at the one
        after the all-reduce that carried some rank's stop request."""
        return self._stop_agreed if self.ddp is not None else self.stop.is_set()

    # ----- views -----

    @property
    def run_id(self) -> str:
        return self.grower.run_id

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.grower.epoch

    @property
    def global_step(self) -> int:
        return self.grower.global_step

    @property
    def controller(self) -> Controller | None:
        return self.grower.controller

    @property
    def kernels(self) -> KernelSource | None:
        return self.grower.kernels

    @property
    def history(self) -> GrowthHistory:
        return self.grower.history

    @property
    def host_parameters(self) -> int:
        return self.grower.host_parameters

    @property
    def seeds_germinated(self) -> int:
        return self.grower.seeds_germinated

    def snapshot(self) -> health_pb2.HealthSnapshot:
        """What the controller would see now, contribution measured on the held-out batch."""
        held_out = self.grower.held_out
        assert held_out is not None
        return self.grower.snapshot(self.model.measure_contribution(*held_out, self.job.loss_fn))

    def _result(self, *, completed: bool, test: tuple[float, float] | None = None) -> RunResult:
        test_loss, test_acc = test if test is not None else (math.nan, math.nan)
        history = self.history
        return RunResult(
            completed=completed,
            epochs=self.epoch,
            global_step=self.global_step,
            test_loss=test_loss,
            test_accuracy=test_acc,
            val_accuracy=history.val_accuracy[-1] if history.val_accuracy else math.nan,
            parameters=self.grower.parameters(),
            train_flops=self.flops.total,
            wall_seconds=self._elapsed_before + time.perf_counter() - self._started,
            rollbacks=self.governor.rollbacks,
            fossilized=self.grower.fossilized(),
            history=history,
        )

    # ----- events -----

    def emit(self, payload: str, message: Any, *, source: str | None = None, epoch: int | None = None,
             step: int | None = None) -> events_pb2.EventEnvelope:
        """An event in the run's own sequence (`<run id>/<sequence>` ids, repeated after a
        resume so that JetStream's `Nats-Msg-Id` dedup drops the repeats)."""
        return self.grower.emit(payload, message, source=source, epoch=epoch, step=step)

    def _on_event(self, env: events_pb2.EventEnvelope) -> None:
        if env.WhichOneof("payload") == "lifecycle":
            self.flops.invalidate()  # the topology changed: the next step is measured again
        if self.event_sink is not None:
            self.event_sink(env)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _epoch_batches(loader: Any, epoch: int) -> Any:
    """`loader`, its sampler told the epoch (`set_epoch`, as DistributedSampler and
    `esper.jobs.data.ShuffledBatches` have) so that a resume replays the epoch's order."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    return loader


def _forward(model: nn.Module, x: Any) -> Any:
    """Call the model on one batch's inputs: a tensor, positional inputs, or keyword inputs."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


def _rows(y: Any) -> int:
    """Examples in a batch, read from its target (a tensor, or a sequence of them)."""
    if isinstance(y, torch.Tensor):
        return int(y.shape[0]) if y.dim() else 1
    if isinstance(y, Mapping):
        return _rows(next(iter(y.values())))
    if isinstance(y, tuple | list):
        return _rows(y[0]) if y and isinstance(y[0], torch.Tensor | Mapping | tuple | list) else len(y)
    raise ConfigError(f"batch target of type {type(y).__name__} has no row count; targets must "
                      "be tensors (or tuples/dicts of tensors)")


def _head(batch: Any, rows: int) -> tuple[Any, Any]:
    """The first `rows` rows of an (input, target) batch (the contribution batch)."""
    x, y = batch

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[:rows] if v.dim() else v
        if isinstance(v, Mapping):
            return {k: cut(t) for k, t in v.items()}
        if isinstance(v, tuple | list):
            return type(v)(cut(t) for t in v)
        return v

    return cut(x), cut(y)
