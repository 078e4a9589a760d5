from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.oona.natsd import NatsServer
from esper.oona.testing import nats_server


@pytest.fixture
def natsd(tmp_path: Path) -> Iterator[NatsServer]:
    yield from nats_server(tmp_path)
