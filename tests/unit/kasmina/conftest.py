from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # These models are tiny: handing their ops to a second intra-op thread costs more
    # than the ops, and on a shared 2-core machine ~10x more (measured: 9 s vs 0.8 s
    # for one parallel-slot lifecycle test under load). Restored for other packages.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def events() -> list:
    return []
