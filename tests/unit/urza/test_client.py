"""UrzaClient against real gRPC servers that break streams, corrupt bytes, or are gone."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from esper.blueprints.artifact import SigningKey
from esper.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from esper.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.urza.client import UrzaClient
from esper.urza.config import MIN_CHUNK
from esper.urza.service import UrzaServicer, open_library
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
from tests.unit.urza.kernels_helper import make_artifact
from tests.unit.urza.urza_server import API_KEY, hosted

CHUNK = MIN_CHUNK  # the smallest chunks Urza sends: the most of them per artifact


class FaultyUrza(UrzaServicer):
    """The real servicer, with faults injected into the first `faults` GetKernel streams."""

    def __init__(self, lib, mode: str, faults: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(lib)
        self.mode = mode
        self.faults = faults
        self.offsets: list[int] = []

    async def GetKernel(self, request: pb.GetKernelRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GetKernelResponse]:
        self.offsets.append(request.offset)
        inject = self.faults > 0
        self.faults -= 1
        n = 0
        async for msg in super().GetKernel(request, context):
            if inject and msg.WhichOneof("part") == "chunk":
                n += 1
                if self.mode == "break" and n == 3:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected stream break")
                if self.mode == "corrupt" and n == 2:
                    data = bytearray(msg.chunk.data)
                    data[0] ^= 0xFF
                    msg.chunk.data = bytes(data)
            yield msg


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def lib(tmp_path: Path, key: SigningKey):  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k.pem").write_bytes(key.public_pem())
    library = open_library(PlatformContext(
        data_dir=tmp_path, settings={"urza": {"trusted_keys_dir": str(keys)}}))
    yield library
    library.close()


def _serve(lib, servicer: UrzaServicer):  # type: ignore[no-untyped-def]
    return hosted(ServiceSpec(part="urza", service_name="esper.urza.v1.UrzaService",
                              servicer=servicer,
                              add_to_server=rpc.add_UrzaServiceServicer_to_server))


def test_broken_stream_resumes_from_last_byte(lib, key: SigningKey) -> None:  # type: ignore[no-untyped-def]
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=512)  # ~1 MB
    lib.put_kernel(data)
    servicer = FaultyUrza(lib, "break", faults=2)
    with _serve(lib, servicer) as target, UrzaClient(target, api_key=API_KEY) as client:
        got = client.get_kernel(kernel_id, timeout_s=10, chunk_size=CHUNK)
    assert got == data
    # two broken streams of 2 chunks each, then the rest from where the second stopped
    assert servicer.offsets == [0, 2 * CHUNK, 4 * CHUNK]
    assert client.resumed_downloads == 2
    assert client.breaker.state is BreakerState.CLOSED


def test_corrupt_bytes_in_transit_are_refetched_never_returned(lib, key: SigningKey) -> None:  # type: ignore[no-untyped-def]
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=512)
    lib.put_kernel(data)
    servicer = FaultyUrza(lib, "corrupt", faults=1)
    with _serve(lib, servicer) as target, UrzaClient(target, api_key=API_KEY) as client:
        got = client.get_kernel(kernel_id, timeout_s=10, chunk_size=CHUNK)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert servicer.offsets == [0, 0]  # the whole artifact again, not a resume


def test_corruption_on_every_attempt_ends_at_the_deadline(lib, key: SigningKey) -> None:  # type: ignore[no-untyped-def]
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=512)
    lib.put_kernel(data)
    servicer = FaultyUrza(lib, "corrupt", faults=10**6)
    with _serve(lib, servicer) as target, UrzaClient(target, api_key=API_KEY) as client:
        t0 = time.monotonic()
        with pytest.raises((DeadlineExceededError, UnavailableError)):
            client.get_kernel(kernel_id, timeout_s=0.8, chunk_size=CHUNK)
        # Bounded by the 0.8 s deadline (with slack for a loaded CI machine), not by the
        # million faults the server would serve.
        assert time.monotonic() - t0 < 2.5
    assert len(servicer.offsets) >= 2


def _dead_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_breaker_opens_on_a_dead_urza_and_then_fails_fast() -> None:
    breaker = CircuitBreaker("urza", BreakerConfig(window_size=4, minimum_calls=4,
                                                   open_wait_s=30.0, half_open_calls=1))
    with UrzaClient(_dead_target(), api_key=API_KEY, breaker=breaker) as client:
        for _ in range(10):
            if breaker.state is BreakerState.OPEN:
                break
            with pytest.raises(UnavailableError):
                client.get_kernel("sha256:" + "a" * 64, timeout_s=0.3)
        assert breaker.state is BreakerState.OPEN
        rejected = breaker.rejected_calls
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as err:
            client.get_kernel("sha256:" + "a" * 64, timeout_s=5)
        assert err.value.reason == "CIRCUIT_OPEN"
        # Refused by the breaker, not by a network call that failed: no retries either,
        # so it returns long before the 5 s deadline.
        assert breaker.rejected_calls == rejected + 1
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(InvalidArgumentError, match="timeout_s=0"):
            client.get_kernel("sha256:" + "a" * 64, timeout_s=0)


def test_deadline_bounds_retries_against_a_dead_urza() -> None:
    with UrzaClient(_dead_target(), api_key=API_KEY) as client:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            client.get_kernel("sha256:" + "b" * 64, timeout_s=0.5)
        assert time.monotonic() - t0 < 2.0  # the 0.5 s deadline plus slack for a busy machine
