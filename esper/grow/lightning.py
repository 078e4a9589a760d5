"""Growth under a PyTorch Lightning `Trainer`: one Callback (`pip install esper[lightning]`).

    from esper.grow.lightning import GrowthCallback
    grow = GrowthCallback(sites=["net.1", "net.3"], example_input=xb, held_out=(xv, yv),
                          loss_fn=F.cross_entropy, controller=heuristic_controller(),
                          kernels=BuiltinKernels())
    lightning.Trainer(max_epochs=20, callbacks=[grow]).fit(module, train_loader, val_loader)

What it does, hook by hook:
* `on_fit_start` (optimizers exist, the module is on its device): wraps the module (or its
  submodule `module=`) in a `Grower` over the trainer's optimizer and schedulers; a state
  restored from a checkpoint is loaded here, *before* Lightning restores the optimizer and
  schedulers (whose param groups then include the seeds);
* `on_train_batch_end`: `grower.step()` once per optimizer step (gradient accumulation is
  fine: it follows `trainer.global_step`);
* `on_validation_start/end`: the slots follow the module into eval mode and back;
* `on_train_epoch_end` (after the epoch's validation): `grower.end_epoch` with the losses
  the module logged (`train_loss`, `val_loss`, `val_acc` by default);
* `state_dict`/`load_state_dict`: the grower's state rides in Lightning's checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("esper.grow.lightning needs Lightning: pip install 'esper[lightning]'") from e

from esper.errors import ConfigError
from esper.grow.config import GrowthConfig
from esper.grow.events import EventSink
from esper.grow.grower import EpochReport, Grower
from esper.grow.protocols import Controller, KernelSource
from esper.kasmina import KasminaConfig


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _metric(metrics: Mapping[str, Any], key: str | None, what: str) -> float | None:
    if key is None:
        return None
    if key not in metrics:
        raise ConfigError(
            f"GrowthCallback reads the {what} from trainer.callback_metrics[{key!r}], which the "
            f"module did not log (logged: {sorted(metrics) or 'nothing'}); log it with "
            f"self.log({key!r}, ...) or pass {what.replace(' ', '_')}_key=<name> (None: not read)")
    return float(metrics[key])


class GrowthCallback(pl.Callback):
    """Grows the LightningModule (or its submodule `module`) while the Trainer fits it.

    Args:
        sites, example_input, held_out, loss_fn, controller, kernels, config, kasmina,
            event_sink, run_id: as for `esper.grow.Grower` (sites relative to the grown module).
        module: attribute path of the submodule to grow ("net"); None: the LightningModule.
        train_loss_key, val_loss_key, val_accuracy_key: names the module logs with
            `self.log`; None: not read.

    The `grower` attribute is the `Grower` once fitting started (export from it).
    """

    def __init__(
        self,
        *,
        sites: Sequence[str | type[nn.Module]],
        example_input: Any,
        held_out: tuple[Any, Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        controller: Controller | None = None,
        kernels: KernelSource | None = None,
        config: GrowthConfig | None = None,
        kasmina: KasminaConfig | None = None,
        event_sink: EventSink | None = None,
        run_id: str | None = None,
        module: str | None = None,
        train_loss_key: str | None = "train_loss",
        val_loss_key: str | None = "val_loss",
        val_accuracy_key: str | None = "val_acc",
    ) -> None:
        self.sites = sites
        self.example_input = example_input
        self.held_out = held_out
        self.loss_fn = loss_fn
        self.controller = controller
        self.kernels = kernels
        self.config = config or GrowthConfig()
        self.kasmina = kasmina
        self.event_sink = event_sink
        self.run_id = run_id
        self.module = module
        self.keys = (train_loss_key, val_loss_key, val_accuracy_key)
        self.grower: Grower | None = None
        self.reports: list[EpochReport] = []
        self._restored: Mapping[str, Any] | None = None
        self._last_global_step = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grower is not None:
            return  # a second fit() on the same module and callback continues growing
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"GrowthCallback needs exactly one optimizer; configure_optimizers returned "
                f"{len(trainer.optimizers)}")
        host = pl_module if self.module is None else pl_module.get_submodule(self.module)
        config = self.config
        if config.total_epochs is None and trainer.max_epochs and trainer.max_epochs > 0:
            config = dataclasses.replace(config, total_epochs=trainer.max_epochs)
        device = pl_module.device
        self.grower = Grower(
            host, sites=self.sites, example_input=_to(self.example_input, device),
            optimizer=trainer.optimizers[0],
            scheduler=[c.scheduler for c in trainer.lr_scheduler_configs],
            loss_fn=self.loss_fn, held_out=_to(self.held_out, device), controller=self.controller,
            kernels=self.kernels, config=config, kasmina=self.kasmina, event_sink=self.event_sink,
            run_id=self.run_id,
        )
        if self._restored is not None:
            # Before Lightning restores the optimizer and schedulers: their saved param
            # groups include the seeds', which must exist by then.
            self.grower.load_state_dict(self._restored)
            self._restored = None
        self._last_global_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        assert self.grower is not None
        while self._last_global_step < trainer.global_step:
            self.grower.step()
            self._last_global_step += 1

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grower is not None:
            self.grower.model.seed_slots.eval()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.grower is not None:
            self.grower.model.seed_slots.train(pl_module.training)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.grower is not None
        m = trainer.callback_metrics
        train_key, val_key, acc_key = self.keys
        report = self.grower.end_epoch(
            train_loss=_metric(m, train_key, "train loss"),
            val_loss=_metric(m, val_key, "val loss"),
            val_accuracy=_metric(m, acc_key, "val accuracy"),
        )
        self.reports.append(report)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.grower is None else self.grower.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.grower is not None:
            self.grower.load_state_dict(state_dict)
        else:
            self._restored = state_dict
