"""Blend backends: pick the fused blend implementation for a tensor.

The CuPy backend is imported lazily, the first time a CUDA tensor asks for it, so
importing `esper.kasmina` on a CPU-only machine never imports CuPy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from esper.errors import FailedPreconditionError
from esper.kasmina.backends import torch_backend

_log = logging.getLogger(__name__)

BlendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_cupy_blend: BlendFn | None = None
_cupy_checked = False
_cupy_unavailable_reason = ""


def _load_cupy() -> BlendFn | None:
    global _cupy_blend, _cupy_checked, _cupy_unavailable_reason
    if not _cupy_checked:
        _cupy_checked = True
        try:
            from esper.kasmina.backends import cupy_backend
        except ImportError as exc:
            _cupy_unavailable_reason = f"cupy is not importable ({exc})"
        else:
            if cupy_backend.available():
                _cupy_blend = cupy_backend.blend
            else:
                _cupy_unavailable_reason = "cupy sees no CUDA device"
        if _cupy_blend is None:
            _log.warning("fused CuPy blend unavailable, using torch: %s", _cupy_unavailable_reason)
    return _cupy_blend


def select_blend(device: torch.device, dtype: torch.dtype, backend: str) -> BlendFn:
    """The blend function for tensors of `device`/`dtype` under backend "auto"/"torch"/"cupy".

    Raises:
        FailedPreconditionError: backend "cupy" was asked for where it cannot run.
    """
    if backend == "torch":
        return torch_backend.blend
    cupy_ok = device.type == "cuda" and dtype in (torch.float32, torch.float16, torch.bfloat16)
    fn = _load_cupy() if cupy_ok else None
    if fn is not None:
        return fn
    if backend == "cupy":
        why = _cupy_unavailable_reason if cupy_ok else f"tensors are {device.type}/{dtype}"
        raise FailedPreconditionError(
            f"blend_backend='cupy' cannot run here: {why}; use 'auto' or 'torch'"
        )
    return torch_backend.blend


def blend(h: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`h + alpha * s` with the backend chosen for `h`."""
    return select_blend(h.device, h.dtype, backend)(h, s, alpha)
