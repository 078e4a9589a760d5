"""A user's checkpoint (model + optimizer + scheduler + grower) resumes bit for bit."""

from __future__ import annotations

import io

import torch

from esper.grow import GrowthConfig, fixed_controller
from tests.unit.grow.growkit import FAST, cases, evaluate, loader, make_grower, train_epoch

CASE = cases()["batchnorm_cnn"]
EPOCHS, SPLIT = 8, 4


def _build():
    torch.manual_seed(0)
    model = CASE.build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=EPOCHS * 4)
    controller = fixed_controller(germinate_epochs=(1, 4), fossilize_after_epochs=1)
    grower = make_grower(CASE, model, opt, scheduler=sched, controller=controller, kasmina=FAST,
                         config=GrowthConfig(max_seeds=2, total_epochs=EPOCHS))
    return model, opt, sched, grower


def _epoch(model, opt, sched, grower, data) -> None:
    tl = train_epoch(model, grower, data, opt, CASE.loss_fn, sched)
    grower.end_epoch(train_loss=tl, val_loss=evaluate(model, CASE))


def _data(epoch: int):
    return loader(CASE, seed=epoch)  # the batch order of an epoch depends on the epoch only


def test_checkpoint_of_model_optimizer_scheduler_and_grower_continues_bit_for_bit() -> None:
    straight = _build()
    for e in range(EPOCHS):
        _epoch(*straight, _data(e))

    first = _build()
    for e in range(SPLIT):
        _epoch(*first, _data(e))
    model, opt, sched, grower = first
    assert grower.live(), "the checkpoint must hold a live seed for this test to mean anything"
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "grower": grower.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors and data: no pickle of code

    model2, opt2, sched2, grower2 = _build()
    grower2.load_state_dict(ckpt["grower"])
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    assert grower2.run_id == grower.run_id and grower2.live() == grower.live()
    for e in range(SPLIT, EPOCHS):
        _epoch(model2, opt2, sched2, grower2, _data(e))

    _, _, _, ref_grower = straight
    assert ref_grower.history.decisions == grower2.history.decisions
    assert any(d["kind"] == "DECISION_KIND_FOSSILIZE" for d in ref_grower.history.decisions)
    assert ref_grower.history.val_loss == grower2.history.val_loss
    a, b = ref_grower.model.state_dict(), grower2.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert ref_grower.events.sequence == grower2.events.sequence
