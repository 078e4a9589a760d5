"""One training run of a built-in task through `esper.grow`, in a plain user loop.

Every arm of an experiment goes through `train`: the same data split, host initialisation
(torch's RNG seeded with the run seed before the host is built), batch order, optimizer
(AdamW), and a cosine schedule that reaches 0 at the last step. What differs is only what
grows: nothing (static), a controller through a `Grower`, or seeds fixed into the host
from step 0 (`static_seeds`: the static-final baseline, the grown topology trained from
scratch).

FLOPs (`torch.utils.flop_counter`, matmuls and convolutions):
* training — forward + backward of every training step; the first step after each
  topology change (a lifecycle event) is measured and later steps are charged as much per
  sample, so seeds cost from germination on (the incubator runs them);
* decision — the grower's own boundary work: contribution forwards and probes
  (`Grower.decision_flops()`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.grow import Grower, GrowthConfig, KasminaConfig
from esper.kasmina import SlotKind
from esper.kasmina.sites import resolve_sites
from esper.tasks import Task, get_task


class FlopMeter:
    """Training FLOPs of a model whose topology changes now and then."""

    def __init__(self) -> None:
        self.total = 0.0
        self.per_sample: float | None = None

    def invalidate(self) -> None:
        self.per_sample = None

    @contextmanager
    def step(self, batch: int) -> Iterator[None]:
        if self.per_sample is None:
            with FlopCounterMode(display=False) as counter:
                yield
            self.per_sample = counter.get_total_flops() / batch
        else:
            yield
        self.total += self.per_sample * batch


class StaticSeeds(nn.Module):
    """`host` with seed modules fixed in at alpha 1 from step 0, wired exactly as Kasmina's
    slots wire them (output: `h + s(h)`; parallel: `m(x) + s(x)`, a span's seed reading its
    first child's input), so the parameter count and the function class are the grown
    model's."""

    def __init__(self, host: nn.Module, seeds: Sequence[tuple[str, str, nn.Module]]) -> None:
        super().__init__()
        self.host = host
        self.seeds = nn.ModuleList(m for _, _, m in seeds)
        modules = dict(host.named_modules())
        self._handles = []
        for (slot_id, kind, _), seed in zip(seeds, self.seeds, strict=True):
            out = [slot_id] if kind == "output" else []
            par = [slot_id] if kind == "parallel" else []
            (plan,) = resolve_sites(host, out, par)
            first, last = modules[plan.modules[0]], modules[plan.target]
            if plan.kind is SlotKind.OUTPUT:
                self._handles.append(last.register_forward_hook(
                    lambda _m, _a, h, s=seed: h + s(h)))
            else:
                stash: dict[str, torch.Tensor] = {}
                self._handles.append(first.register_forward_pre_hook(
                    lambda _m, a, st=stash: st.__setitem__("x", a[0])))
                self._handles.append(last.register_forward_hook(
                    lambda _m, _a, h, s=seed, st=stash: h + s(st.pop("x"))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.host(x)


@dataclass(kw_only=True, frozen=True)
class RunSpec:
    """The shared training setup of every arm."""

    task: str = "mnist1d"
    host: str = "mlp"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.03
    weight_decay: float = 0.01
    """AdamW's default."""


@dataclass(kw_only=True)
class RunResult:
    arm: str
    seed: int
    test_accuracy: float
    val_accuracy: list[float]
    parameters: int
    train_flops: float
    decision_flops: float
    wall_seconds: float
    grown: list[tuple[str, str, str]] = field(default_factory=list)
    """(slot id, slot kind, kernel id) of every fossilized seed: the grown topology."""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    germinated_epochs: list[int] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.decision_flops

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["total_flops"] = self.total_flops
        return d


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
    model.train(was)
    return loss, acc


def train(
    spec: RunSpec,
    arm: str,
    *,
    sites: Sequence[str] = (),
    parallel: Sequence[str] = (),
    controller: Any = None,
    kernels: Any = None,
    growth: GrowthConfig | None = None,
    kasmina: KasminaConfig | None = None,
    static_seeds: Sequence[tuple[str, str, str]] = (),
    build_host: Callable[[], nn.Module] | None = None,
    held_out_rows: int | None = None,
    probe_rows: int | None = None,
    task: Task | None = None,
) -> RunResult:
    """Train one arm for one seed; returns its figures.

    Args:
        controller, kernels: growth through a `Grower` at `sites`/`parallel` (None: static).
        static_seeds: (slot id, kind, kernel id) fixed in from step 0 (static-final), built
            fresh by `kernels.load`.
        build_host: builds the host instead of the task's `spec.host` (after seeding torch).
        held_out_rows: validation rows the grower measures on (None: all of them).
        probe_rows: training rows (a fixed random subset) the grower's probes fit on
            (None: the probes split the held-out rows).
        task: the task to train on instead of the built-in `spec.task` (e.g. an MNIST-1D
            variant from another generator seed).
    """
    t0 = time.perf_counter()
    task = task if task is not None else get_task(spec.task)
    data = task.load(spec.seed)
    torch.manual_seed(spec.seed)
    host = build_host() if build_host is not None else task.host(spec.host).build(1.0)
    model: nn.Module = host
    if static_seeds:
        with torch.random.fork_rng(devices=[]):
            seeds = [(sid, kind, kernels.load(kid, None)) for sid, kind, kid in static_seeds]
        model = StaticSeeds(host, seeds)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    n = len(data.y_train)
    steps = math.ceil(n / spec.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs * steps, eta_min=0.0)
    meter = FlopMeter()
    grower = None
    if controller is not None:
        def sink(env: Any) -> None:
            if env.WhichOneof("payload") == "lifecycle":
                meter.invalidate()

        probe_batch = None
        if probe_rows:
            pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(
                spec.seed + 7919))[:probe_rows]
            probe_batch = (data.x_train[pick], data.y_train[pick])
        grower = Grower(host, sites=list(sites), parallel=list(parallel), probe_batch=probe_batch,
                        example_input=data.x_train[:8], optimizer=opt, scheduler=sched,
                        loss_fn=F.cross_entropy,
                        held_out=(data.x_val[:held_out_rows], data.y_val[:held_out_rows]),
                        controller=controller, kernels=kernels,
                        config=growth or GrowthConfig(total_epochs=spec.epochs),
                        kasmina=kasmina or KasminaConfig(), event_sink=sink,
                        run_id=f"{arm}-{spec.seed}")
    order = torch.Generator().manual_seed(spec.seed)
    val_acc: list[float] = []
    model.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=order)
        total, seen = 0.0, 0
        for i in range(steps):
            idx = perm[i * spec.batch_size:(i + 1) * spec.batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            with meter.step(len(idx)):
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
            opt.step()
            sched.step()
            if grower is not None:
                grower.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        vl, va = _evaluate(model, data.x_val, data.y_val)
        val_acc.append(va)
        if grower is not None:
            grower.end_epoch(train_loss=total / seen, val_loss=vl, val_accuracy=va,
                             train_flops=meter.total)
    _, test_acc = _evaluate(model, data.x_test, data.y_test)
    result = RunResult(
        arm=arm, seed=spec.seed, test_accuracy=test_acc, val_accuracy=val_acc,
        parameters=sum(p.numel() for p in model.parameters()),
        train_flops=meter.total, decision_flops=grower.decision_flops() if grower else 0.0,
        wall_seconds=time.perf_counter() - t0,
    )
    if grower is not None:
        result.parameters = grower.parameters()
        result.grown = [(sid, "parallel" if s.kind is SlotKind.PARALLEL else "output", s.kernel_id)
                        for sid, s in grower.model.slots.items() if sid in grower.fossilized()]
        result.decisions = list(grower.history.decisions)
        result.probes = list(grower.history.probes)
        result.germinated_epochs = [d["epoch"] for d in grower.history.decisions
                                    if d["kind"] == "DECISION_KIND_GERMINATE" and not d["rejected"]]
    return result


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
