"""Which blend runs where, pinned (mutants of backends.select_blend that survived on CPU)."""

from __future__ import annotations

import pytest
import torch

from esper.errors import FailedPreconditionError
from esper.kasmina.backends import blend, select_blend, torch_backend


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cpu_tensors_blend_with_torch(backend: str) -> None:
    assert select_blend(torch.device("cpu"), torch.float32, backend) is torch_backend.blend
    h, s, a = torch.ones(3), torch.full((3,), 2.0), torch.tensor(0.25)
    assert torch.equal(blend(h, s, a, backend), torch.full((3,), 1.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asking_for_cupy_on_cpu_is_refused_naming_the_tensors(dtype: torch.dtype) -> None:
    with pytest.raises(FailedPreconditionError) as e:
        select_blend(torch.device("cpu"), dtype, "cupy")
    assert str(e.value) == (f"blend_backend='cupy' cannot run here: tensors are cpu/{dtype}; "
                            "use 'auto' or 'torch'")
