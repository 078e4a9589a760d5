"""Suite-wide test configuration: GPU tests skip cleanly where CUDA is absent."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
        for item in gpu_items:
            item.add_marker(skip)
