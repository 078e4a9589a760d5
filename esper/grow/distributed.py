"""Growth under data-parallel training (`torch.distributed`, e.g. under torchrun).

Every rank runs the same loop and the same `Grower`; this module keeps their models equal:

    ddp = DistributedGrowth(model)          # after init_process_group: rank 0's weights everywhere
    grower = Grower(model, ..., controller=ddp.controller(ctrl), kernels=ddp.kernels(source))
    loss.backward(); ddp.all_reduce_grads(opt); opt.step(); sched.step(); grower.step()

* Only rank 0 asks the controller and the kernel source's catalog; the decisions (and the
  candidates, and any error, so that every rank records the same degradation) are
  broadcast as serialized protobuf/JSON bytes — never pickle.
* A germination loads the kernel on rank 0 first (which fetches and verifies it), then on
  the other ranks (a verifying loader finds it in the shared cache; the built-in catalog
  builds it locally), and rank 0's seed weights are broadcast, so every rank germinates the
  same seed at the same boundary.
* Gradients are averaged by an explicit all-reduce over the optimizer's parameters, not by
  `DistributedDataParallel`: seeds join the optimizer mid-run and a DDP wrapper fixes its
  parameter set (and bucket layout) when it is built, so it would have to be rebuilt at
  every germination, and its wrapper would sit between the grower and the host's modules.
  One flat all-reduce per step of what the optimizer steps follows the seeds for free. The
  step's loss and a stop flag travel in the same buffer, so every rank sees the same
  (mean) loss — a governor judges alike everywhere — and all ranks agree on stopping.

Only the process group is needed (`torch.distributed.init_process_group`: gloo on CPU,
NCCL on GPU); with no group (or one rank) every call is the plain single-process path.
Library layer: torch and protobuf only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler

from esper import errors
from esper.errors import EsperError, FailedPreconditionError
from esper.grow.protocols import Controller, KernelCandidate, KernelSource, Stateful
from generated.esper.common.v1 import health_pb2, seed_pb2
from generated.esper.oona.v1 import events_pb2

__all__ = ["DistributedGrowth", "RankMismatchError", "broadcast_bytes", "shard_loader"]


class RankMismatchError(FailedPreconditionError):
    """Ranks disagree about something they must share (a kernel only some could load)."""

    reason = "RANK_MISMATCH"


def _group_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives' tensors live: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bytes(data: bytes | None, *, src: int = 0) -> bytes:
    """`data` of rank `src` on every rank (others pass None): a length, then the bytes."""
    device = _device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src and buf.numel():
        buf.copy_(torch.frombuffer(bytearray(data or b""), dtype=torch.uint8))
    if buf.numel():
        dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes()


# ---- errors across ranks --------------------------------------------------------------------
def _error_json(e: EsperError) -> dict[str, str]:
    return {"type": type(e).__name__, "reason": e.reason, "message": str(e)}


def _raise_remote(err: Mapping[str, str]) -> None:
    """Raise on this rank the error rank 0 got (same class when it is one of esper.errors,
    so the grower treats it alike: NotFoundError only rejects, others degrade)."""
    cls = getattr(errors, err["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, EsperError)):
        cls = EsperError
    try:
        e = cls(f"rank 0: {err['message']}", reason=err["reason"])
    except TypeError:  # a subclass with a constructor of its own
        e = EsperError(f"rank 0: {err['message']}", reason=err["reason"])
    raise e


class _Rank0Controller:
    """A `Controller` asked on rank 0 only; its answer (or error) is broadcast to all ranks."""

    def __init__(self, inner: Controller, ddp: DistributedGrowth) -> None:
        self.inner, self.ddp = inner, ddp
        self.component = getattr(inner, "component", "controller")
        self.uses_probes = bool(getattr(inner, "uses_probes", False))

    def decide(self, snapshot: health_pb2.HealthSnapshot,
               candidates: Mapping[str, Sequence[KernelCandidate]]) -> list[Any]:
        answer = None
        if self.ddp.rank == 0:
            try:
                decisions = list(self.inner.decide(snapshot, candidates))
                msg = events_pb2.DecisionEvent(decisions=decisions)
                answer = json.dumps({"decisions": msg.SerializeToString().hex()}).encode()
            except EsperError as e:
                answer = json.dumps({"error": _error_json(e)}).encode()
        got = json.loads(broadcast_bytes(answer))
        if "error" in got:
            _raise_remote(got["error"])
        return list(events_pb2.DecisionEvent.FromString(bytes.fromhex(got["decisions"])).decisions)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if isinstance(self.inner, Stateful) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if isinstance(self.inner, Stateful) and state:
            self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # policy_info(), close(), ... of the real one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class _Rank0Kernels:
    """A `KernelSource` whose catalog is asked on rank 0 only and whose loads give every
    rank rank 0's seed (see the module docstring)."""

    def __init__(self, inner: KernelSource, ddp: DistributedGrowth) -> None:
        self.inner, self.ddp = inner, ddp
        self.component = getattr(inner, "component", "kernels")
        if hasattr(inner, "blueprints"):  # lets the grower check fits up front, as without DDP
            self.blueprints = inner.blueprints

    def candidates(self, site: seed_pb2.SiteSignature) -> list[KernelCandidate]:
        answer = None
        if self.ddp.rank == 0:
            try:
                found = self.inner.candidates(site)
                answer = json.dumps({"candidates": [dataclasses.asdict(c) for c in found]}).encode()
            except EsperError as e:
                answer = json.dumps({"error": _error_json(e)}).encode()
        got = json.loads(broadcast_bytes(answer))
        if "error" in got:
            _raise_remote(got["error"])
        return [KernelCandidate(**c) for c in got["candidates"]]

    def load(self, kernel_id: str, site: seed_pb2.SiteSignature | None = None) -> nn.Module:
        ddp = self.ddp
        # Rank 0 first: it fetches and verifies (filling a shared cache); a failure there is
        # every rank's, with rank 0's error.
        module, answer = None, None
        if ddp.rank == 0:
            try:
                module = self.inner.load(kernel_id, site)
                answer = b"{}"
            except EsperError as e:
                answer = json.dumps({"error": _error_json(e)}).encode()
        got = json.loads(broadcast_bytes(answer))
        if "error" in got:
            _raise_remote(got["error"])
        failure = ""
        if ddp.rank != 0:
            try:
                module = self.inner.load(kernel_id, site)
            except EsperError as e:
                failure = f"{type(e).__name__}: {e}"
        bad = torch.tensor([1 if failure else 0], dtype=torch.int64, device=_device())
        dist.all_reduce(bad)
        if bad.item():
            raise RankMismatchError(
                f"kernel {kernel_id!r} loaded on rank 0 but not on {int(bad.item())} other "
                f"rank(s){' (here: ' + failure + ')' if failure else ''}; every rank needs "
                "the same kernel source (and trusted keys)")
        assert module is not None
        ddp.broadcast_module(module)
        return module

    def __getattr__(self, name: str) -> Any:  # ensure_all(), urza, close(), ... of the real one
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class DistributedGrowth:
    """The current process group as a `Grower` sees it.

    Args:
        model: if given, rank 0's parameters and buffers are copied to every rank now
            (the host must start equal everywhere).

    Raises:
        FailedPreconditionError: the process group uses a backend this does not support.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.rank, self.world_size = _group_size()
        if self.active and dist.get_backend() not in ("gloo", "nccl"):
            raise FailedPreconditionError(
                f"process group backend {dist.get_backend()!r}: growth under DDP supports "
                "'gloo' (CPU) and 'nccl' (GPU)")
        if model is not None:
            self.broadcast_module(model)

    @property
    def active(self) -> bool:
        """More than one rank: the collectives below run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that asks the controller, writes checkpoints and events."""
        return self.rank == 0

    def controller(self, controller: Controller | None) -> Controller | None:
        """`controller`, asked on rank 0 only (pass the same kind of object on every rank)."""
        if controller is None or not self.active:
            return controller
        return _Rank0Controller(controller, self)

    def kernels(self, kernels: KernelSource | None) -> KernelSource | None:
        """`kernels`, its catalog asked on rank 0 only, its loads giving rank 0's seed."""
        if kernels is None or not self.active:
            return kernels
        return _Rank0Kernels(kernels, self)

    def all_reduce_grads(self, optimizer: torch.optim.Optimizer, loss: float | torch.Tensor = 0.0,
                         *, stop: bool = False) -> tuple[float, bool]:
        """Average the gradients of every parameter `optimizer` steps over the ranks.

        Call after `loss.backward()`, before clipping and `optimizer.step()`. Parameters
        without a gradient are the same on every rank (same model, same stages) and are
        left alone.

        Returns:
            (the loss averaged over the ranks, whether any rank asked to `stop`).
        """
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not self.active:
            return value, stop
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else _device()
        flat = torch.cat([g.reshape(-1) for g in grads]
                         + [torch.tensor([value, float(stop)], dtype=grads[0].dtype if grads
                                         else torch.float32, device=device)])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
        return float(flat[offset]), bool(flat[offset + 1] > 0)

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers of `module` into every rank's copy (in place)."""
        if not self.active:
            return
        with torch.no_grad():
            # Parameters and buffers only: a state dict may hold non-tensor extra state.
            for data in [p.data for p in module.parameters()] + list(module.buffers()):
                if data.device.type == "cpu" and _device().type == "cuda":
                    tmp = data.to(_device())
                    dist.broadcast(tmp, 0)
                    data.copy_(tmp.cpu())
                else:
                    dist.broadcast(data, 0)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """`values` summed over the ranks (epoch loss sums and counts)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def broadcast_text(self, text: str | None, *, src: int = 0) -> str:
        """Rank `src`'s `text` on every rank (a checkpoint path, a verdict)."""
        if not self.active:
            return text or ""
        return broadcast_bytes(text.encode() if text is not None else None, src=src).decode()

    def first_failure(self, failure: str) -> str:
        """Agree on failing: every rank passes its own failure ("" when it has none) and
        gets the lowest failing rank's (prefixed with that rank when it is not 0), or "".
        So a setup error on any rank ends the run on all of them, none left waiting."""
        if not self.active:
            return failure
        flags = torch.zeros(self.world_size, dtype=torch.int64, device=_device())
        flags[self.rank] = 1 if failure else 0
        dist.all_reduce(flags)
        failing = [r for r, f in enumerate(flags.tolist()) if f]
        if not failing:
            return ""
        first = failing[0]
        text = self.broadcast_text(failure if self.rank == first else None, src=first)
        return text if first == 0 else f"rank {first}: {text}"

    def shard(self, loader: DataLoader, *, seed: int = 0) -> DataLoader:
        """This rank's part of `loader` (see `shard_loader`)."""
        if not self.active:
            return loader
        return shard_loader(loader, rank=self.rank, world_size=self.world_size, seed=seed)


# ---- data ------------------------------------------------------------------------------------
class ShardedBatches(Sampler[Any]):
    """Every `world_size`-th index batch of a batch-yielding sampler, from `rank` on.

    For loaders whose sampler yields whole index batches (`esper.jobs.data.ShuffledBatches`,
    `batch_size=None`): the epoch's order stays the sampler's (`set_epoch` is passed on),
    each rank gets the same number of batches (the tail that does not divide is dropped,
    so no rank waits for a step the others never take).
    """

    def __init__(self, sampler: Sampler[Any], *, rank: int, world_size: int) -> None:
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.world_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        keep = len(self) * self.world_size
        for i, batch in enumerate(self.sampler):
            if i >= keep:
                return
            if i % self.world_size == self.rank:
                yield batch


def shard_loader(loader: DataLoader, *, rank: int, world_size: int, seed: int = 0) -> DataLoader:
    """`loader` rebuilt to yield rank `rank`'s share of each epoch, same batch size per rank.

    An auto-batching loader (`batch_size` set) gets a `DistributedSampler` over its dataset
    (shuffled iff its sampler was a `RandomSampler`, by `seed` and the epoch); a loader whose
    sampler yields whole batches (`batch_size=None`) gets `ShardedBatches`. Either way the
    trainer's `set_epoch` reaches it and every rank has as many batches as the others.

    Raises:
        FailedPreconditionError: a loader with a custom `batch_sampler` (its batches cannot
            be split without knowing how it builds them).
    """
    common = {"num_workers": loader.num_workers, "collate_fn": loader.collate_fn,
              "pin_memory": loader.pin_memory, "worker_init_fn": loader.worker_init_fn}
    if loader.batch_sampler is None:  # batch_size=None: the sampler yields whole batches
        return DataLoader(loader.dataset, batch_size=None,
                          sampler=ShardedBatches(loader.sampler, rank=rank, world_size=world_size),
                          **common)
    if type(loader.batch_sampler) is not BatchSampler:
        raise FailedPreconditionError(
            f"a loader with a custom batch_sampler ({type(loader.batch_sampler).__name__}) cannot be "
            "sharded over ranks; give the job a DataLoader with batch_size= (and shuffle=), or a "
            "sampler yielding whole index batches with batch_size=None")
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      drop_last=loader.drop_last, **common)
