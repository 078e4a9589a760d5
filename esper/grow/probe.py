"""Cold-start probes: what would each offered kernel buy at a slot, measured before choosing.

With no outcome history a controller has nothing to tell kernels apart but their cost, so
it would pick the cheapest (for the full catalog at a CNN's activation, `norm_scale`: 8
parameters that change nothing). A probe measures instead. For each kernel offered at an
open slot:

1. a fresh seed of it is attached to the model *as it is now*, fully blended in
   (`y = h + s(h)` or `y = m(x) + s(x)`; zero-initialised output side, so the model's
   function is unchanged at step 0), through a temporary hook, the slot untouched;
2. the seed alone is trained for `steps` full-batch Adam steps on the grower's probe batch
   (training rows the caller gives, `Grower(probe_batch=...)`; without one, the first
   part of the held-out batch), the host frozen: no host gradient is computed, no host
   statistic or optimizer state changes; the whole model runs in eval mode;
3. its **gain** is the loss on the held-out batch (without a probe batch: the rest of it)
   without the seed minus with it: a counterfactual contribution in the same unit as
   `SlotHealth.contribution`, measured on rows the probe did not fit (a seed that only
   memorises does not gain). The loss is taken on 8 equal parts of those rows, so the gain
   comes with a standard error (`KernelProbe.gain_stderr`): kernels whose gains differ by
   less than it are ones this probe cannot tell apart.

That is a short germinate-and-measure, small enough to run at a boundary: `steps`
forwards and backwards over a few hundred rows per kernel. Its FLOPs are counted
(`torch.utils.flop_counter`) and reported with the grower's other decision FLOPs. The
grower probes only at boundaries where its controller wanted to germinate (see
`Grower`), then asks again with the results in `HealthSnapshot.probes`.

Probes draw no random numbers from the caller's streams (`torch.random.fork_rng`) and
leave the model exactly as they found it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esper.kasmina import MorphogeneticModel, SlotKind
from esper.kasmina.sites import call
from esper.tamiyo.policy import KernelCandidate
from generated.esper.common.v1 import health_pb2


def rows(batch: Any) -> int:
    """Rows (dim 0) of the first tensor in a batch: a tensor, or a tuple/list/dict of them."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        n = rows(v) if isinstance(v, torch.Tensor | tuple | list | dict) else None
        if n is not None:
            return n
    return 0


def take(batch: Any, part: slice) -> Any:
    """The same rows of every tensor in a batch (other values as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[part]
    if isinstance(batch, dict):
        return {k: take(v, part) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(take(v, part) for v in batch)
    return batch


@dataclass(kw_only=True, frozen=True)
class ProbeSettings:
    """How a probe fits (from `GrowthConfig`)."""

    steps: int
    lr: float


class _Attached:
    """`seed` added to slot `slot_id`'s site by temporary hooks (removed on exit)."""

    def __init__(self, mm: MorphogeneticModel, slot_id: str, seed: nn.Module) -> None:
        self.slot = mm.slots[slot_id]
        self.seed = seed
        self._stash: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        slot, seed = self.slot, self.seed
        site = slot.site_module
        if slot.kind is SlotKind.OUTPUT:
            self._handles.append(site.register_forward_hook(
                lambda _m, _a, out: out + seed(out.detach())))
        elif len(slot.site_modules) == 1:
            self._handles.append(site.register_forward_hook(
                lambda _m, args, out: out + seed(args[0].detach())))
        else:
            def stash(_m: nn.Module, args: Any) -> None:
                self._stash = args[0]

            def add(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
                x, self._stash = self._stash, None
                return out + seed(x.detach())

            self._handles.append(slot.site_modules[0].register_forward_pre_hook(stash))
            self._handles.append(site.register_forward_hook(add))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._stash = None


def split_rows(batch: tuple[Any, Any], fraction: float) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """(the first `fraction` of the rows, the rest), each at least one row."""
    x, y = batch
    n = rows(x)
    cut = max(1, min(n - 1, round(n * fraction)))
    return (take(x, slice(0, cut)), take(y, slice(0, cut))), (take(x, slice(cut, n)),
                                                              take(y, slice(cut, n)))


def probe_slot(
    mm: MorphogeneticModel,
    slot_id: str,
    kernels: Sequence[tuple[KernelCandidate, nn.Module]],
    fit: tuple[Any, Any],
    evaluate: tuple[Any, Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    settings: ProbeSettings,
) -> list[health_pb2.KernelProbe]:
    """One `KernelProbe` per (candidate, fresh seed module) at `slot_id`, in order: each
    seed fitted on `fit`, its gain measured on `evaluate`.

    A seed that fails (raises inside torch, or gives a non-finite loss) is reported with
    gain 0 and the steps it managed, so it is never preferred on a broken measurement.
    """
    fit_x, fit_y = fit
    eval_x, eval_y = evaluate
    slot = mm.slots[slot_id]
    probe = slot.probe
    modes = [(m, m.training) for m in mm.modules()]
    out: list[health_pb2.KernelProbe] = []
    try:
        mm.eval()
        with torch.random.fork_rng(devices=[]):
            with FlopCounterMode(display=False) as base_counter, torch.no_grad():
                base = chunk_losses(mm, (eval_x, eval_y), loss_fn)
            base_flops = float(base_counter.get_total_flops())
            for candidate, seed in kernels:
                seed = seed.to(device=probe.device, dtype=probe.dtype) if any(
                    p.is_floating_point() for p in seed.parameters()) else seed.to(probe.device)
                seed.train()
                gain, stderr, steps, flops = _fit_and_measure(
                    mm, slot_id, seed, (fit_x, fit_y), (eval_x, eval_y), loss_fn, settings, base)
                out.append(health_pb2.KernelProbe(kernel_id=candidate.kernel_id, slot_id=slot_id, gain=gain,
                                                  gain_stderr=stderr, steps=steps, flops=flops))
    finally:
        for m, mode in modes:
            m.training = mode
    if out:
        # The shared base forward is charged to the first probe.
        out[0].flops += base_flops
    return out


CHUNKS = 8
"""Equal parts of the held-out rows a gain is measured on separately (its standard error)."""


def chunk_losses(mm: nn.Module, batch: tuple[Any, Any],
                 loss_fn: Callable[[Any, Any], torch.Tensor]) -> list[tuple[int, float]]:
    """(rows, loss) of each of up to `CHUNKS` consecutive parts of `batch`: one forward,
    the caller's loss on each part of its output (an output that is not row-aligned
    tensors is measured whole)."""
    x, y = batch
    out = call(mm, x)
    n = rows(y) if isinstance(y, torch.Tensor | tuple | list | dict) else 0
    if n < 2 or rows(out) != n:
        return [(max(n, 1), float(loss_fn(out, y)))]
    k = min(CHUNKS, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(b - a, float(loss_fn(take(out, slice(a, b)), take(y, slice(a, b)))))
            for a, b in itertools.pairwise(bounds)]


def gain_of(base: list[tuple[int, float]], after: list[tuple[int, float]]) -> tuple[float, float]:
    """Row-weighted mean of the per-chunk loss decrease, and its standard error."""
    n = sum(r for r, _ in base)
    diffs = [(r, b - a) for (r, b), (_, a) in zip(base, after, strict=True)]
    mean = sum(r * d for r, d in diffs) / n
    if len(diffs) < 2:
        return mean, 0.0
    var = sum((d - mean) ** 2 for _, d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def _fit_and_measure(mm: MorphogeneticModel, slot_id: str, seed: nn.Module,
                     fit: tuple[Any, Any], evaluate: tuple[Any, Any],
                     loss_fn: Callable[[Any, Any], torch.Tensor], settings: ProbeSettings,
                     base: list[tuple[int, float]]) -> tuple[float, float, int, float]:
    params = [p for p in seed.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr) if params else None
    steps, step_flops, eval_flops = 0, 0.0, 0.0

    def step() -> bool:
        loss = loss_fn(call(mm, fit[0]), fit[1])
        if not torch.isfinite(loss):
            return False
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        return True

    with _Attached(mm, slot_id, seed):
        try:
            for i in range(settings.steps if opt is not None else 0):
                # Every step runs the same ops on the same shapes: count the first, charge
                # each step as much (the counter's dispatch costs several times the step).
                if i == 0:
                    with FlopCounterMode(display=False) as counter:
                        ok = step()
                    step_flops = float(counter.get_total_flops())
                else:
                    ok = step()
                if not ok:
                    break
                opt.step()
                steps += 1
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                after = chunk_losses(mm, evaluate, loss_fn)
            eval_flops = float(counter.get_total_flops())
        except (RuntimeError, ValueError, TypeError, IndexError):
            # A kernel that cannot run here (offered for the site, but failing in torch)
            # is measured as worthless rather than stopping the boundary.
            after = base
    flops = step_flops * max(steps, 1 if step_flops else 0) + eval_flops
    gain, stderr = gain_of(base, after)
    if not (math.isfinite(gain) and math.isfinite(stderr)):
        return 0.0, 0.0, steps, flops
    return gain, stderr, steps, flops
