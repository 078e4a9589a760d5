"""One platform (every service on one port, as `esper up` hosts them) for the fuzz suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.hosted import Platform, hosted_platform


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with hosted_platform(tmp_path_factory.mktemp("fuzz-platform")) as p:
        yield p
