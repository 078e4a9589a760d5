"""One seed slot: the lifecycle, the blend and the statistics of one site of the host.

A slot never becomes a child of the host. The wrapper attaches it to the site module with
a forward hook that maps the site's output `h` to the slot's output, so the host's module
names and `state_dict` keys stay as they were. While nothing needs it (a dormant slot
between sampled steps) the hook is removed, so a dormant slot costs the host nothing.

The seed's input `x` depends on the slot's kind (`SlotKind`): an output slot's seed reads
`h` itself; a parallel slot's reads the input of the wrapped module (the forward hook's
`args[0]`), or, for a span of children, the first child's input (kept by a forward
pre-hook on that child until the last child's forward hook uses it).

Forward by stage (`s = seed(x)`, shaped like `h`):

* DORMANT, PRUNED, EMBARGOED, RESETTING: `y = h`.
* GERMINATED, TRAINING: `y = h + (s - s.detach())` with input `x.detach()`: the value is
  exactly `h` (bit for bit) while the seed receives `dL/dy` as its output gradient and
  the host's gradient is untouched. With autograd off the seed is not run at all.
* BLENDING: `y = h + alpha * s` through the fused blend, alpha from the controller;
  input detached unless `KasminaConfig.isolate_blending_input` is False.
* HOLDING, FOSSILIZED: `y = h + s` (alpha = 1), gradients flow into the host.

State for checkpoints lives in registered buffers (`stage`, `counters`, `contribution`,
the alpha controller's buffers) plus `kernel_id`/`blueprint_id` strings in the slot's
extra state (a dict of strings: JSON-friendly, never pickled by Kasmina). Python mirrors of
the buffers drive the per-step logic so it never reads device memory; the buffers are
refreshed at every transition and before every `state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esper.errors import FailedPreconditionError, InvalidArgumentError
from esper.kasmina.alpha import AlphaController, AlphaCurve, ScheduleUnit
from esper.kasmina.backends import select_blend
from esper.kasmina.config import KasminaConfig
from esper.kasmina.events import KasminaEvent
from esper.kasmina.sites import SlotKind
from esper.kasmina.stages import (
    LIVE_STAGES,
    PRUNABLE_STAGES,
    SeedStage,
    check_transition,
    legal_actions,
)
from generated.esper.common.v1 import seed_pb2

# Columns of the on-device accumulators: sums of per-forward means of the activation, of
# its square and of the seed output's square, then sums of per-step gradient norms.
_ACT_MEAN, _ACT_SQ, _SEED_SQ, _HOST_GN, _SEED_GN = range(5)
_N_ACC = 5
# Rows: the epoch window (reset at each epoch boundary) and the stage window (reset at
# each transition; gates read it).
_EPOCH, _STAGE = 0, 1
# Python-side sample counts per window: activation forwards, host grad steps, seed grad steps.
_N_ACT, _N_HOST, _N_SEED = range(3)

_EXTRA_STATE_FORMAT = 1

Emit = Callable[[KasminaEvent], None]
Resolver = Callable[[str], nn.Module]


# Plain Python state of a slot. nn.Module.__setattr__ checks parameters, buffers and
# submodules on every assignment (tens of microseconds); these names are never any of
# those, so they bypass it — they are written on every step.
_PLAIN_ATTRS = frozenset({
    "_stage", "_steps_in_stage", "_epochs_in_stage", "_embargo_left", "_germination_index",
    "_contribution", "kernel_id", "blueprint_id", "_armed", "_force_zero", "_stats_suspended",
    "_hook_handle", "_counts", "_last_epoch", "_resolver", "_stash",
})


class SeedSlot(nn.Module):
    """A seed slot at one site of the host. Created by `esper.kasmina.wrap`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __init__(
        self,
        *,
        slot_id: str,
        site: nn.Module | Sequence[nn.Module],
        depth: int,
        signature: seed_pb2.SiteSignature,
        probe: torch.Tensor,
        config: KasminaConfig,
        emit: Emit,
        clock: Callable[[], tuple[int, int]],
        kind: SlotKind = SlotKind.OUTPUT,
        out_shape: tuple[int, ...] | None = None,
    ) -> None:
        """Args (beyond the obvious):
            site: the site module, or for a parallel slot over a span its children in order.
            probe: rows of what the seed reads on `example_input` (the germination probe).
            out_shape: shape the seed must return on `probe`; None = `probe`'s shape.
        """
        super().__init__()
        self.slot_id = slot_id
        self.depth = depth
        self.config = config
        self.kind = SlotKind(kind)
        # A list, not an attribute, so the host's site is not registered as a child
        # (that would duplicate the host's parameters under the wrapper).
        self._site = [site] if isinstance(site, nn.Module) else list(site)
        if len(self._site) > 1 and self.kind is not SlotKind.PARALLEL:
            raise InvalidArgumentError(
                f"slot {slot_id!r}: a span of modules needs a parallel slot", field="site")
        # A site without parameters (an activation) has no parameter gradient to report;
        # its host gradient signal is then the gradient arriving at its output.
        self._site_has_params = any(True for m in self._site for _ in m.parameters())
        self._out_shape = tuple(probe.shape) if out_shape is None else tuple(out_shape)
        self._stash: torch.Tensor | None = None
        self._signature = signature
        self._emit_fn = emit
        self._clock = clock
        self._resolver: Resolver | None = None
        self.register_module("seed", None)
        self.alpha_ctl = AlphaController()
        self.register_buffer("stage", torch.tensor(int(SeedStage.DORMANT), dtype=torch.int64))
        # steps_in_stage, epochs_in_stage, embargo_epochs_left, germination_index
        self.register_buffer("counters", torch.zeros(4, dtype=torch.int64))
        # contribution value, measured flag
        self.register_buffer("contribution", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("probe", probe.detach().clone(), persistent=False)
        self.register_buffer(
            "acc", torch.zeros(2, _N_ACC, dtype=torch.float32, device=probe.device),
            persistent=False,
        )
        self._counts = [[0, 0, 0], [0, 0, 0]]
        self._last_epoch: dict[str, float] | None = None
        self._stage = SeedStage.DORMANT
        self._steps_in_stage = 0
        self._epochs_in_stage = 0
        self._embargo_left = 0
        self._germination_index = 0
        self._contribution: float | None = None
        self.kernel_id = ""
        self.blueprint_id = ""
        self._armed = False
        self._force_zero = False
        self._stats_suspended = False
        self._hook_handle: tuple[torch.utils.hooks.RemovableHandle, ...] | None = None

    # ---- read-only views --------------------------------------------------------------

    @property
    def current_stage(self) -> SeedStage:
        return self._stage

    @property
    def alpha(self) -> float:
        """The blend weight in effect: 0 outside BLENDING, 1 in HOLDING and FOSSILIZED."""
        if self._stage in (SeedStage.HOLDING, SeedStage.FOSSILIZED):
            return 1.0
        if self._stage is SeedStage.BLENDING:
            return self.alpha_ctl.value
        return 0.0

    @property
    def steps_in_stage(self) -> int:
        return self._steps_in_stage

    @property
    def epochs_in_stage(self) -> int:
        return self._epochs_in_stage

    @property
    def embargo_epochs_left(self) -> int:
        return self._embargo_left

    @property
    def germination_index(self) -> int:
        return self._germination_index

    @property
    def contribution_value(self) -> float | None:
        """Last measured counterfactual contribution in this stage, None if not measured."""
        return self._contribution

    @property
    def site_module(self) -> nn.Module:
        """The module whose output the slot changes (a span's last child)."""
        return self._site[-1]

    @property
    def site_modules(self) -> tuple[nn.Module, ...]:
        """Every host module the slot covers: the site, or a span's children in order."""
        return tuple(self._site)

    def site_parameters(self) -> list[nn.Parameter]:
        """The host parameters inside the site (all of a span's children)."""
        return [p for m in self._site for p in m.parameters()]

    def site_signature(self) -> seed_pb2.SiteSignature:
        out = seed_pb2.SiteSignature()
        out.CopyFrom(self._signature)
        return out

    def legal_actions(self) -> set[str]:
        """Strategic actions the controller may take on this slot now."""
        return set(legal_actions(self._stage))

    # ---- forward ----------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        return self.forward(output)

    def _hook_parallel(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        return self.forward(output, args[0])

    def _pre_hook_span(self, module: nn.Module, args: Any) -> None:
        self._stash = args[0]

    def _hook_span(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        x, self._stash = self._stash, None
        if x is None:
            raise FailedPreconditionError(
                f"slot {self.slot_id!r}: the span's last child ran without its first child "
                "running before it in this forward; a span must run as a chain every time"
            )
        return self.forward(output, x)

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The slot's output for the site's output `h`; `x` is a parallel slot's input."""
        stage = self._stage
        record = self._armed and self.training and not self._stats_suspended
        s: torch.Tensor | None = None
        src = h if x is None else x
        if self._force_zero or stage not in LIVE_STAGES:
            y = h
        elif stage is SeedStage.TRAINING or stage is SeedStage.GERMINATED:
            if torch.is_grad_enabled() or record:
                s = self.seed(src.detach())
                y = h + (s - s.detach())
            else:
                y = h
        elif stage is SeedStage.BLENDING:
            s = self.seed(src.detach() if self.config.isolate_blending_input else src)
            blend = select_blend(h.device, h.dtype, self.config.blend_backend)
            y = blend(h, s, self.alpha_ctl.alpha)
        else:
            s = self.seed(src)
            y = h + s
        if record:
            self._record_activation(h, s)
            if not self._site_has_params and h.requires_grad:
                h.register_hook(self._record_output_gradient)
        return y

    def _record_output_gradient(self, grad: torch.Tensor) -> None:
        # Runs in backward, on the device: the norm is accumulated, never read here.
        self.acc[:, _HOST_GN] += torch.linalg.vector_norm(grad.detach().float()).to(self.acc.device)
        for w in (_EPOCH, _STAGE):
            self._counts[w][_N_HOST] += 1

    def _record_activation(self, h: torch.Tensor, s: torch.Tensor | None) -> None:
        # Sums and L2 norms are single passes that allocate nothing of the activation's
        # size; scaling by 1/n turns them into the per-forward mean and mean square.
        hf = h.detach().float()
        n = max(hf.numel(), 1)
        norm = torch.linalg.vector_norm
        if s is None:
            vals = torch.stack((hf.sum(), norm(hf).square()))
            self.acc[:, _ACT_MEAN : _ACT_SQ + 1].add_(vals, alpha=1.0 / n)
        else:
            sf = s.detach().float()
            vals = torch.stack((hf.sum(), norm(hf).square(), norm(sf).square()))
            self.acc[:, _ACT_MEAN : _SEED_SQ + 1].add_(vals, alpha=1.0 / n)
        for w in (_EPOCH, _STAGE):
            self._counts[w][_N_ACT] += 1

    def record_gradients(self) -> None:
        """Add this step's host-site and seed gradient norms to the accumulators (no sync)."""
        host = [p.grad for m in self._site for p in m.parameters() if p.grad is not None]
        if host:
            self.acc[:, _HOST_GN] += torch.nn.utils.get_total_norm(host).to(self.acc.device)
            for w in (_EPOCH, _STAGE):
                self._counts[w][_N_HOST] += 1
        if self.seed is not None:
            seed = [p.grad for p in self.seed.parameters() if p.grad is not None]
            if seed:
                self.acc[:, _SEED_GN] += torch.nn.utils.get_total_norm(seed).to(self.acc.device)
                for w in (_EPOCH, _STAGE):
                    self._counts[w][_N_SEED] += 1

    # ---- hook management --------------------------------------------------------------

    def set_armed(self, armed: bool) -> None:
        """Gather statistics on the coming forwards (training mode only) or not."""
        self._armed = armed
        self.update_hook()

    def update_hook(self) -> None:
        """Attach the forward hook(s) iff the slot changes the output or gathers statistics."""
        needed = self._armed or self._stage in LIVE_STAGES
        if needed and self._hook_handle is None:
            if self.kind is SlotKind.OUTPUT:
                self._hook_handle = (self.site_module.register_forward_hook(self._hook),)
            elif len(self._site) == 1:
                self._hook_handle = (self.site_module.register_forward_hook(self._hook_parallel),)
            else:
                self._hook_handle = (
                    self._site[0].register_forward_pre_hook(self._pre_hook_span),
                    self.site_module.register_forward_hook(self._hook_span),
                )
        elif not needed and self._hook_handle is not None:
            self.remove_hook()

    def remove_hook(self) -> None:
        if self._hook_handle is not None:
            for handle in self._hook_handle:
                handle.remove()
            self._hook_handle = None
            self._stash = None

    # ---- lifecycle --------------------------------------------------------------------

    def _event(self, **kw: Any) -> None:
        step, epoch = self._clock()
        self._emit_fn(
            KasminaEvent(
                slot_id=self.slot_id,
                step=step,
                epoch=epoch,
                alpha=self.alpha,
                kernel_id=self.kernel_id,
                blueprint_id=self.blueprint_id,
                **kw,
            )
        )

    def _transition(self, dst: SeedStage, reason: str) -> None:
        src = self._stage
        check_transition(self.slot_id, src, dst)
        self._stage = dst
        self._steps_in_stage = 0
        self._epochs_in_stage = 0
        self._contribution = None
        self._reset_window(_STAGE)
        self.stage.fill_(int(dst))
        self.update_hook()
        self._event(kind="transition", from_stage=src, to_stage=dst, reason=reason)

    def _gate(self, gate: str, checks: list[tuple[bool, str]], measurements: dict[str, float]) -> bool:
        failed = [why for ok, why in checks if not ok]
        passed = not failed
        reason = "; ".join(failed) if failed else "; ".join(why for _, why in checks)
        self._event(kind="gate", gate=gate, passed=passed, reason=reason,
                    measurements=measurements)
        return passed

    def germinate(
        self, seed: nn.Module, *, kernel_id: str, blueprint_id: str, index: int, reason: str
    ) -> None:
        """DORMANT → GERMINATED after the germination gate; the caller then calls `start_training`."""
        if self._stage is not SeedStage.DORMANT:
            check_transition(self.slot_id, self._stage, SeedStage.GERMINATED)
        probe = self.probe
        if any(t.is_floating_point() for t in seed.parameters()):
            seed = seed.to(device=probe.device, dtype=probe.dtype)
        else:
            seed = seed.to(device=probe.device)
        seed.train(self.training)
        # Ids first, so the germination gate's event names the kernel it judged.
        self.kernel_id, self.blueprint_id = kernel_id, blueprint_id
        try:
            self._germination_gate(seed)
        except BaseException:
            # Whatever refused the seed, the slot stays an untouched DORMANT slot.
            self.kernel_id = self.blueprint_id = ""
            raise
        self.seed = seed
        self._germination_index = index
        self.alpha_ctl.hold(0.0)
        self._transition(SeedStage.GERMINATED, reason or "germinate requested")

    def _germination_gate(self, seed: nn.Module) -> None:
        probe = self.probe
        was_training = seed.training
        seed.eval()
        try:
            with torch.no_grad():
                out = seed(probe)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # A seed built for another site fails inside torch (e.g. a width mismatch);
            # that is a bad argument to germinate, not a crash of the training process.
            what = "module input" if self.kind is SlotKind.PARALLEL else "activation"
            why = f"seed raised {type(e).__name__} on the site's {what}: {e}"
            self._gate("germination", [(False, why)], {})
            raise InvalidArgumentError(
                f"slot {self.slot_id!r}: seed cannot run on the site's {what} "
                f"{tuple(probe.shape)} {probe.dtype}: {type(e).__name__}: {e}",
                field="seed_module",
            ) from e
        finally:
            seed.train(was_training)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != self._out_shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            why = f"seed output {shape} != site activation {self._out_shape}"
            self._gate("germination", [(False, why)], {})
            raise InvalidArgumentError(
                f"slot {self.slot_id!r}: seed maps {tuple(probe.shape)} to {shape}; a seed must "
                f"return a tensor shaped like the site's activation {self._out_shape}",
                field="seed_module",
            )
        max_abs = float(out.detach().abs().max()) if out.numel() else 0.0
        checks = [(math.isfinite(max_abs), f"seed output finite on probe (max |s| = {max_abs:.3g})")]
        if self.config.verify_function_preserving:
            tol = self.config.function_preserving_tol
            checks.append(
                (max_abs <= tol, f"function-preserving: max |s| = {max_abs:.3g} vs tol {tol:.3g}")
            )
        if not self._gate("germination", checks, {"max_abs_seed_output": max_abs}):
            raise InvalidArgumentError(
                f"slot {self.slot_id!r}: seed is not function-preserving: max |seed(h)| = "
                f"{max_abs:.6g} on the probe, allowed <= {self.config.function_preserving_tol:g} "
                "(zero-initialise the seed's output side)",
                field="seed_module",
            )

    def start_training(self) -> None:
        self._transition(SeedStage.TRAINING, "germination gate passed; incubating")

    def prune(self, reason: str) -> list[nn.Parameter]:
        """Remove the seed; returns its parameters so the caller can drop optimizer state."""
        if self._stage not in PRUNABLE_STAGES:
            check_transition(self.slot_id, self._stage, SeedStage.PRUNED)
        assert self.seed is not None  # every prunable stage holds a seed
        params = list(self.seed.parameters())
        self.seed = None
        self.alpha_ctl.hold(0.0)
        self._transition(SeedStage.PRUNED, reason or "prune requested")
        self._embargo_left = self.config.embargo_epochs
        self._transition(
            SeedStage.EMBARGOED, f"embargoed for {self._embargo_left} epoch(s) after prune"
        )
        if self._embargo_left == 0:
            self._enter_resetting()
        return params

    def fossilize(self, reason: str) -> None:
        if self._stage is not SeedStage.HOLDING:
            check_transition(self.slot_id, self._stage, SeedStage.FOSSILIZED)
        m = self._stage_measurements()
        checks: list[tuple[bool, str]] = []
        if self.config.gate_require_finite:
            checks.append((m["finite"] > 0, "finite" if m["finite"] else
                           "non-finite activation, seed output or gradient in HOLDING"))
        need = self.config.fossilize_min_contribution
        measures = dict(m)
        if need is not None:
            c = self._contribution
            if c is None:
                why = "contribution not measured in HOLDING (call measure_contribution first)"
                checks.append((False, why))
            else:
                measures["contribution"] = c
                checks.append((c >= need, f"contribution {c:.4g} vs required {need:.4g}"))
        if not checks:
            checks.append((True, "no fossilize checks configured"))
        if not self._gate("fossilize", checks, measures):
            failed = "; ".join(why for ok, why in checks if not ok)
            raise FailedPreconditionError(
                f"slot {self.slot_id!r}: fossilize gate failed: {failed}", reason="GATE_FAILED"
            )
        self._transition(SeedStage.FOSSILIZED, reason or "fossilize requested")

    def _enter_resetting(self) -> None:
        self._transition(SeedStage.RESETTING, "embargo over; clearing slot state")
        self.kernel_id = ""
        self.blueprint_id = ""
        self._germination_index = 0
        self._embargo_left = 0
        self._reset_window(_EPOCH)
        self._last_epoch = None

    # ---- clocks -----------------------------------------------------------------------

    def on_step(self, sampled: bool) -> None:
        """After an optimizer step: gradients, counters, mechanical transitions."""
        if self._stage is SeedStage.RESETTING:
            self._transition(SeedStage.DORMANT, "reset complete")
            return
        if sampled:
            self.record_gradients()
        self._steps_in_stage += 1
        self._tick(ScheduleUnit.STEPS)

    def on_epoch(self) -> None:
        """At an epoch boundary: close the epoch window, embargo countdown, epoch schedules."""
        self._last_epoch = self._window_stats(_EPOCH)
        self._reset_window(_EPOCH)
        if self._stage is SeedStage.RESETTING:
            self._transition(SeedStage.DORMANT, "reset complete")
            return
        self._epochs_in_stage += 1
        if self._stage is SeedStage.EMBARGOED:
            self._embargo_left = max(self._embargo_left - 1, 0)
            if self._embargo_left == 0:
                self._enter_resetting()
            return
        self._tick(ScheduleUnit.EPOCHS)

    def _tick(self, unit: ScheduleUnit) -> None:
        cfg = self.config
        if ScheduleUnit[cfg.schedule_unit.upper()] is not unit:
            return
        elapsed = self._steps_in_stage if unit is ScheduleUnit.STEPS else self._epochs_in_stage
        if self._stage is SeedStage.TRAINING:
            due = elapsed >= cfg.incubation and (elapsed - cfg.incubation) % cfg.gate_interval == 0
            if due and self._blending_gate():
                self._transition(SeedStage.BLENDING, "blending gate passed")
                self.alpha_ctl.start(
                    target=1.0,
                    duration=cfg.blend_duration,
                    curve=AlphaCurve[cfg.blend_curve.upper()],
                    unit=unit,
                )
        elif self._stage is SeedStage.BLENDING:
            self.alpha_ctl.tick(unit)
            if self.alpha_ctl.done:
                self.alpha_ctl.hold(1.0)
                self._transition(SeedStage.HOLDING, "alpha reached 1.0")

    def _blending_gate(self) -> bool:
        cfg = self.config
        m = self._stage_measurements()
        checks: list[tuple[bool, str]] = []
        if cfg.gate_require_finite:
            checks.append((m["finite"] > 0, "finite" if m["finite"] else
                           "non-finite activation, seed output or gradient in TRAINING"))
        if m["seed_grad_samples"] == 0:
            checks.append((False, "no seed gradient measured in TRAINING"))
        else:
            g = m["seed_grad_norm"]
            lo, hi = cfg.gate_min_seed_grad_norm, cfg.gate_max_seed_grad_norm
            checks.append((lo <= g <= hi, f"seed grad norm {g:.4g} within [{lo:.3g}, {hi:.3g}]"
                           if lo <= g <= hi else
                           f"seed grad norm {g:.4g} outside [{lo:.3g}, {hi:.3g}]"))
        return self._gate("blending", checks, m)

    # ---- statistics -------------------------------------------------------------------

    def _reset_window(self, w: int) -> None:
        self.acc[w].zero_()
        self._counts[w] = [0, 0, 0]

    def _stage_measurements(self) -> dict[str, float]:
        row = self.acc[_STAGE]
        counts = torch.tensor(self._counts[_STAGE], dtype=row.dtype, device=row.device)
        vec = torch.cat((row, counts))
        if (
            self.config.distributed_sync
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            # Every rank reaches this point at the same step (step counts are identical),
            # so the collective is matched and every rank takes the same decision.
            vec = vec.clone()
            dist.all_reduce(vec)
        vals = vec.tolist()
        acc, cnt = vals[:_N_ACC], vals[_N_ACC:]
        return self._summarise(acc, cnt)

    def _window_stats(self, w: int) -> dict[str, float]:
        return self._summarise(self.acc[w].tolist(), [float(c) for c in self._counts[w]])

    @staticmethod
    def _summarise(acc: list[float], cnt: list[float]) -> dict[str, float]:
        n_act, n_host, n_seed = cnt
        mean = acc[_ACT_MEAN] / n_act if n_act else 0.0
        sq = acc[_ACT_SQ] / n_act if n_act else 0.0
        var = max(sq - mean * mean, 0.0)
        return {
            "activation_mean": mean,
            "activation_std": math.sqrt(var) if math.isfinite(var) else math.nan,
            "seed_output_rms": math.sqrt(acc[_SEED_SQ] / n_act) if n_act else 0.0,
            "host_grad_norm": acc[_HOST_GN] / n_host if n_host else 0.0,
            "seed_grad_norm": acc[_SEED_GN] / n_seed if n_seed else 0.0,
            "activation_samples": n_act,
            "host_grad_samples": n_host,
            "seed_grad_samples": n_seed,
            "finite": float(all(math.isfinite(v) for v in acc)),
        }

    def window_for_health(self) -> dict[str, float]:
        """Current epoch window if anything was gathered in it, else the last closed epoch."""
        if any(self._counts[_EPOCH]) or self._last_epoch is None:
            return self._window_stats(_EPOCH)
        return self._last_epoch

    def set_contribution(self, value: float) -> None:
        self._contribution = float(value)

    # ---- persistence ------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        state = {
            "format": _EXTRA_STATE_FORMAT,
            "kernel_id": self.kernel_id,
            "blueprint_id": self.blueprint_id,
        }
        # Only parallel slots say so: an output slot's state stays what it always was.
        if self.kind is SlotKind.PARALLEL:
            state["kind"] = "parallel"
        return state

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != _EXTRA_STATE_FORMAT:
            raise InvalidArgumentError(
                f"slot {self.slot_id!r}: extra state {state!r} is not a Kasmina slot state "
                f"of format {_EXTRA_STATE_FORMAT}",
                field="state_dict",
            )
        self._check_kind(state)
        self.kernel_id = str(state["kernel_id"])
        self.blueprint_id = str(state["blueprint_id"])

    def _check_kind(self, state: dict[str, Any]) -> None:
        kind = state.get("kind", "output")
        if kind != self.kind.name.lower():
            # A seed that fits both (a 16 → 16 Linear) would load and silently compute
            # something else: reading the module's input instead of its output.
            raise InvalidArgumentError(
                f"slot {self.slot_id!r}: the checkpoint holds a {kind} slot here, the model "
                f"has a {self.kind.name.lower()} slot; wrap the model as it was when saved",
                field="state_dict",
            )

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        # `.half()` casts every floating buffer; the accumulators must stay float32.
        if self.acc.dtype != torch.float32:
            self.acc = self.acc.float()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        vals = (self._steps_in_stage, self._epochs_in_stage, self._embargo_left,
                self._germination_index)
        self.counters.copy_(torch.tensor(vals, dtype=torch.int64))
        measured = self._contribution is not None
        self.contribution.copy_(torch.tensor((self._contribution or 0.0, float(measured)),
                                             dtype=torch.float64))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        stage_key = prefix + "stage"
        extra_key = prefix + "_extra_state"
        if stage_key in state_dict:
            stage = SeedStage(int(state_dict[stage_key].item()))
            extra = state_dict.get(extra_key) or {}
            kernel_id = extra.get("kernel_id", "") if isinstance(extra, dict) else ""
            if isinstance(extra, dict):
                self._check_kind(extra)  # before the resolver builds a seed for it
            # Children load after this method returns, so the seed module must exist now
            # for its parameters to be loaded into it.
            if stage in LIVE_STAGES:
                if not kernel_id:
                    raise InvalidArgumentError(
                        f"slot {self.slot_id!r}: checkpoint stage {stage.name} has no kernel_id",
                        field="state_dict",
                    )
                if self._resolver is None:
                    raise FailedPreconditionError(
                        f"slot {self.slot_id!r} holds kernel {kernel_id!r} in the checkpoint; "
                        "pass kernel_resolver to wrap() to re-materialise it"
                    )
                seed = self._resolver(kernel_id)
                probe = self.probe
                seed = seed.to(device=probe.device, dtype=probe.dtype) if any(
                    p.is_floating_point() for p in seed.parameters()) else seed.to(probe.device)
                seed.train(self.training)
                self.seed = seed
            else:
                self.seed = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if stage_key not in state_dict:
            return
        self._stage = SeedStage(int(state_dict[stage_key].item()))
        c = [int(v) for v in state_dict[prefix + "counters"].tolist()]
        self._steps_in_stage, self._epochs_in_stage, self._embargo_left = c[0], c[1], c[2]
        self._germination_index = c[3]
        contrib = state_dict[prefix + "contribution"].tolist()
        self._contribution = float(contrib[0]) if contrib[1] else None
        self._reset_window(_EPOCH)
        self._reset_window(_STAGE)
        self._last_epoch = None
        self.update_hook()

