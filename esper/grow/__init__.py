"""esper.grow: grow your own model in your own training loop.

    from esper.grow import Grower, GrowthConfig, BuiltinKernels, heuristic_controller

    grower = Grower(model, sites=["body.*"], example_input=xb, optimizer=opt, scheduler=sched,
                    loss_fn=loss_fn, held_out=(x_val, y_val),
                    controller=heuristic_controller(), kernels=BuiltinKernels(),
                    config=GrowthConfig(max_seeds=2, total_epochs=20))
    ...  loss.backward(); opt.step(); sched.step(); grower.step()
    ...  report = grower.end_epoch(train_loss=..., val_loss=..., val_accuracy=...)

Modules, each readable alone:

* `grower` — `Grower`: the step / boundary logic (snapshot → decide → apply → events);
* `snapshot` — the health snapshot, the model graph, the kernels on offer;
* `schedulers` — LR schedulers kept right as seed param groups join and leave;
* `controllers` — Tamiyo's policies in process (`heuristic_controller`, ...);
* `kernels` — `BuiltinKernels`, the built-in blueprint catalog in process;
* `protocols` — `Controller`, `KernelSource` (what remote implementations satisfy);
* `events` — `EventEnvelope`s numbered per run;
* `export` — fold fossilized seeds into a plain module; safetensors + manifest;
* `lightning` — a PyTorch Lightning `Callback` (needs `esper[lightning]`).

Library layer: no gRPC, no NATS, no service modules. Remote controllers and kernel
sources (`esper.tamiyo.client.TamiyoController`, `esper.urza.source.UrzaKernels`) satisfy
the same protocols; only the constructor argument changes.
"""

from esper.grow.config import GrowthConfig
from esper.grow.controllers import (
    PolicyController,
    fixed_controller,
    gnn_controller,
    heuristic_controller,
    random_controller,
)
from esper.grow.events import EventSink, EventStream
from esper.grow.export import (
    ExportError,
    FoldRule,
    SeedParallel,
    SeedResidual,
    export,
    fold,
    load_exported,
    register_fold_rule,
)
from esper.grow.grower import EpochReport, Grower, GrowthHistory
from esper.grow.kernels import BuiltinKernels
from esper.grow.protocols import (
    Controller,
    Decision,
    HealthSnapshot,
    KernelCandidate,
    KernelSource,
    SiteSignature,
    Stateful,
)
from esper.grow.schedulers import register_scheduler
from esper.kasmina import KasminaConfig

__all__ = [
    "BuiltinKernels",
    "Controller",
    "Decision",
    "EpochReport",
    "EventSink",
    "EventStream",
    "ExportError",
    "FoldRule",
    "Grower",
    "GrowthConfig",
    "GrowthHistory",
    "HealthSnapshot",
    "KasminaConfig",
    "KernelCandidate",
    "KernelSource",
    "PolicyController",
    "SeedParallel",
    "SeedResidual",
    "SiteSignature",
    "Stateful",
    "export",
    "fixed_controller",
    "fold",
    "gnn_controller",
    "heuristic_controller",
    "load_exported",
    "random_controller",
    "register_fold_rule",
    "register_scheduler",
]
