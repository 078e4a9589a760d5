"""GrowthCallback under a real lightning.Trainer: grows, steps the scheduler across germination,
and resumes from Lightning's own checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

lightning = pytest.importorskip("lightning")
pl = lightning.pytorch

from esper.errors import ConfigError
from esper.grow import BuiltinKernels, GrowthConfig, fixed_controller
from esper.grow.lightning import GrowthCallback
from tests.unit.grow.growkit import FAST, cases

CASE = cases()["tabular_mlp"]


class Module(pl.LightningModule):
    def __init__(self, log_val: bool = True) -> None:
        super().__init__()
        self.net = CASE.build()
        self.log_val = log_val

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        logits = self(x)
        if self.log_val:
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.98 ** s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders():
    train = DataLoader(TensorDataset(CASE.x[32:], CASE.y[32:]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(CASE.x[:32], CASE.y[:32]), batch_size=32)
    return train, val


def callback() -> GrowthCallback:
    return GrowthCallback(
        module="net", sites=CASE.sites, example_input=CASE.x[:4], held_out=(CASE.x[:32], CASE.y[:32]),
        loss_fn=F.cross_entropy, controller=fixed_controller(germinate_epochs=(1,), fossilize_after_epochs=1),
        kernels=BuiltinKernels(["bottleneck_mlp"]), kasmina=FAST, config=GrowthConfig(max_seeds=1))


def trainer(max_epochs: int, tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, num_sanity_val_steps=0, **kw)


def test_a_lightning_trainer_grows_the_module(tmp_path) -> None:
    torch.manual_seed(0)
    module, grow = Module(), callback()
    trainer(5, tmp_path, enable_checkpointing=False, callbacks=[grow]).fit(module, *loaders())
    g = grow.grower
    assert g is not None and list(g.fossilized()) == ["1"]
    assert [r.epoch for r in grow.reports] == [1, 2, 3, 4, 5]
    assert g.history.val_loss and len(g.history.train_loss) == 5
    opt = module.trainer.optimizers[0]
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
    assert g.global_step == module.trainer.global_step == 20
    plain = g.fold()
    x = CASE.x[:8]
    module.eval()
    plain.eval()
    with torch.no_grad():
        assert (plain(x) - module(x)).abs().max() <= 1e-6


def test_growth_resumes_from_a_lightning_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module, grow = Module(), callback()
    trainer(2, tmp_path, callbacks=[grow, ckpt]).fit(module, *loaders())
    live_before = grow.grower.live()
    assert live_before and "FOSSILIZED" not in live_before.values()  # a seed in flight
    module2, grow2 = Module(), callback()
    trainer(5, tmp_path, callbacks=[grow2]).fit(module2, *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    g = grow2.grower
    assert g.run_id == grow.grower.run_id and g.seeds_germinated == 1
    assert [r.epoch for r in grow2.reports] == [3, 4, 5]
    assert g.fossilized() == {"1": grow.grower.model.slots["1"].kernel_id}
    opt = module2.trainer.optimizers[0]
    assert len(opt.param_groups) == 2 and opt.state  # seeds' optimizer state came back


def test_a_missing_metric_is_named(tmp_path) -> None:
    module, grow = Module(log_val=False), callback()
    with pytest.raises(ConfigError, match=r"callback_metrics\['val_loss'\]"):
        trainer(1, tmp_path, enable_checkpointing=False, callbacks=[grow]).fit(module, *loaders())


def test_the_module_state_dict_keeps_its_keys(tmp_path) -> None:
    module, grow = Module(), callback()
    keys = set(module.state_dict())
    trainer(1, tmp_path, enable_checkpointing=False, callbacks=[grow]).fit(module, *loaders())
    assert set(module.state_dict()) == keys  # the slots live in the callback's state
    assert isinstance(grow.state_dict()["slots"], dict)
    assert isinstance(module.net, nn.Sequential)
