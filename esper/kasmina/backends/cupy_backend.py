"""CuPy RawKernel implementation of the fused blend, from `kernels/blend.cu`.

Importing this module imports CuPy; `esper.kasmina.backends` imports it only when a
CUDA tensor reaches the blend and the backend is "auto" or "cupy", so CPU-only use of
Kasmina never touches CuPy.

Kernels run on torch's current CUDA stream and write into tensors allocated by torch's
caching allocator, so they order correctly with the surrounding torch work and need no
synchronisation. Tensors are passed to the kernels as raw device pointers (by-value
uint64), which keeps float16 and bfloat16 independent of CuPy's dtype support.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cupy
import numpy as np
import torch

from esper.errors import InvalidArgumentError

KERNEL_SOURCE = Path(__file__).resolve().parents[3] / "kernels" / "blend.cu"
_THREADS = 256
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = frozenset(_SUFFIX)


def available() -> bool:
    """True when CuPy sees a CUDA device."""
    return bool(cupy.cuda.is_available())


@functools.cache
def _module(device_index: int) -> cupy.RawModule:
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=KERNEL_SOURCE.read_text(), options=("--std=c++14",))


@functools.cache
def _function(device_index: int, name: str) -> cupy.RawKernel:
    with cupy.cuda.Device(device_index):
        return _module(device_index).get_function(name)


@functools.cache
def _max_blocks(device_index: int) -> int:
    # Enough resident blocks to fill every SM; the kernels are grid-stride loops.
    sms = cupy.cuda.Device(device_index).attributes["MultiProcessorCount"]
    return int(sms) * 32


def _launch(name: str, device: torch.device, work_items: int, args: tuple) -> None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    blocks = max(1, min((work_items + _THREADS - 1) // _THREADS, _max_blocks(idx)))
    stream = _stream(idx, torch.cuda.current_stream(device))
    with cupy.cuda.Device(idx), stream:
        _function(idx, name)((blocks,), (_THREADS,), args)


_streams: dict[tuple[int, int], cupy.cuda.Stream] = {}


def _stream(idx: int, torch_stream: torch.cuda.Stream) -> cupy.cuda.Stream:
    # One CuPy wrapper per torch stream (via the CUDA stream protocol); the wrapper keeps
    # the torch stream object alive, so its handle cannot be reused while cached.
    key = (idx, torch_stream.cuda_stream)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams[key] = cupy.cuda.Stream.from_external(torch_stream)
    return stream


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _check(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> None:
    if not h.is_cuda or s.device != h.device or alpha.device != h.device:
        raise InvalidArgumentError(
            f"cupy blend needs h, s and alpha on one CUDA device; got {h.device}, {s.device}, "
            f"{alpha.device}",
            field="h",
        )
    if h.shape != s.shape or h.dtype != s.dtype:
        raise InvalidArgumentError(
            f"cupy blend needs s like h; got h {tuple(h.shape)} {h.dtype}, "
            f"s {tuple(s.shape)} {s.dtype}",
            field="s",
        )
    if h.dtype not in _SUFFIX:
        raise InvalidArgumentError(
            f"cupy blend does not handle dtype {h.dtype}; supported: "
            f"{', '.join(str(d) for d in _SUFFIX)}",
            field="h",
        )
    if alpha.numel() != 1:
        raise InvalidArgumentError(
            f"alpha must hold one value, got shape {tuple(alpha.shape)}", field="alpha"
        )


class FusedBlend(torch.autograd.Function):
    """`y = h + alpha * s` with CuPy kernels; backward `dh = g`, `ds = alpha * g`."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        _check(h, s, alpha)
        h_c = h.contiguous()
        s_c = s.contiguous()
        a = alpha.detach().reshape(()).to(torch.float32).contiguous()
        y = torch.empty_like(h_c)
        n = h_c.numel()
        if n:
            suffix = _SUFFIX[h_c.dtype]
            vec = suffix == "f32" and all(t.data_ptr() % 16 == 0 for t in (h_c, s_c, y))
            name = "blend_fwd_f32_vec4" if vec else f"blend_fwd_{suffix}"
            work = max(n // 4, 1) if vec else n
            _launch(name, h_c.device, work, (_ptr(h_c), _ptr(s_c), _ptr(a), _ptr(y), np.int64(n)))
        ctx.save_for_backward(a)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (a,) = ctx.saved_tensors
        g = grad_out.contiguous()
        grad_h = g if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = torch.empty_like(g)
            n = g.numel()
            if n:
                _launch(
                    f"blend_bwd_seed_{_SUFFIX[g.dtype]}",
                    g.device,
                    n,
                    (_ptr(g), _ptr(a), _ptr(grad_s), np.int64(n)),
                )
        return grad_h, grad_s, None


def blend(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Return `h + alpha * s` computed by the CuPy kernels (CUDA tensors only)."""
    return FusedBlend.apply(h, s, alpha)
