"""UrzaService over real gRPC (runtime host, auth, validation, error mapping) with UrzaClient."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from esper.blueprints.artifact import SigningKey
from esper.errors import (
    ArtifactError,
    AuthError,
    BlueprintError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    UntrustedKeyError,
)
from esper.runtime.errors import as_esper_error
from esper.urza.client import UrzaClient
from esper.urza.config import MAX_CHUNK, MIN_CHUNK
from generated.esper.common.v1 import kernel_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
from tests.unit.urza.kernels_helper import blueprint, make_artifact
from tests.unit.urza.urza_server import API_KEY, urza


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def target(tmp_path: Path, key: SigningKey) -> Iterator[str]:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signer.pem").write_bytes(key.public_pem())
    with urza(tmp_path / "data", keys) as t:
        yield t


@pytest.fixture
def client(target: str) -> Iterator[UrzaClient]:
    with UrzaClient(target, api_key=API_KEY) as c:
        yield c


def _raw_put(target: str, messages: list[pb.PutKernelRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(target) as ch:
        stub = rpc.UrzaServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.PutKernel(iter(messages), timeout=10, metadata=[("x-api-key", API_KEY)])
    return err.value


def test_round_trip_kernel_and_blueprint(client: UrzaClient, key: SigningKey) -> None:
    bp_id, created = client.put_blueprint(blueprint("lowrank_adapter"), timeout_s=10)
    assert created and client.get_blueprint(bp_id, timeout_s=5).name == "lowrank_adapter"
    assert [b.blueprint_id for b in client.list_blueprints(5)[0]] == [bp_id]
    kernel_id, data, site = make_artifact(key, channels=1024)  # ~70 KB
    assert client.put_kernel(data, timeout_s=10, chunk_size=4096) == (kernel_id, True)
    assert client.put_kernel(data, timeout_s=10) == (kernel_id, False)
    record, got = client.get_kernel_with_record(kernel_id, timeout_s=5, chunk_size=1000)
    assert got == data
    assert record.artifact_sha256 == hashlib.sha256(data).hexdigest()
    assert record.blueprint.blueprint_id == bp_id
    recs, token = client.query_kernels(5, site=site)
    assert [r.kernel_id for r in recs] == [kernel_id] and token == ""
    report = pb.FieldReport(kernel_id=kernel_id, run_id="run-1", slot_id="fc1",
                            contribution=0.25, fate=pb.SEED_FATE_FOSSILIZED)
    assert client.record_outcome(report, 5, request_id="6f1c2a52-2a83-4c4e-9d36-5f0f3e0b1a01")
    assert not client.record_outcome(report, 5,
                                     request_id="6f1c2a52-2a83-4c4e-9d36-5f0f3e0b1a01")
    assert client.query_kernels(5)[0][0].stats.fossilized == 1


def _get_raw(target: str, request: pb.GetKernelRequest) -> list[pb.GetKernelResponse]:
    with grpc.insecure_channel(target) as ch:  # default options: the 4 MiB receive cap
        return list(rpc.UrzaServiceStub(ch).GetKernel(
            request, timeout=10, metadata=[("x-api-key", API_KEY)]))


def test_get_kernel_streams_from_offset(target: str, client: UrzaClient,
                                        key: SigningKey) -> None:
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=512)  # ~1 MB
    client.put_kernel(data, timeout_s=10)
    msgs = _get_raw(target, pb.GetKernelRequest(kernel_id=kernel_id, offset=1000,
                                                chunk_size=MIN_CHUNK))
    assert msgs[0].WhichOneof("part") == "info"
    assert msgs[0].info.artifact_size == len(data)
    assert [m.chunk.offset for m in msgs[1:]] == list(range(1000, len(data), MIN_CHUNK))
    assert b"".join(m.chunk.data for m in msgs[1:]) == data[1000:]


@pytest.mark.parametrize("asked", [1, 4096, MIN_CHUNK - 1])
def test_tiny_chunks_are_raised_to_the_minimum(target: str, client: UrzaClient,
                                               key: SigningKey, asked: int) -> None:
    """chunk_size=1 once let one client make Urza send 39k messages for one kernel."""
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=512)
    client.put_kernel(data, timeout_s=10)
    msgs = _get_raw(target, pb.GetKernelRequest(kernel_id=kernel_id, chunk_size=asked))
    chunks = [m.chunk for m in msgs[1:]]
    assert len(chunks) == -(-len(data) // MIN_CHUNK)  # 17, not 1 million
    assert all(len(c.data) == MIN_CHUNK for c in chunks[:-1])
    assert b"".join(c.data for c in chunks) == data


def test_largest_chunks_fit_the_default_message_cap(target: str, client: UrzaClient,
                                                   key: SigningKey) -> None:
    """The contract's largest chunk, framed, passes gRPC's default 4 MiB cap both ways
    (it once allowed 4 MiB chunks that the cap then refused)."""
    kernel_id, data, _ = make_artifact(key, name="bottleneck_mlp", channels=1100)  # ~4.8 MB
    assert len(data) > MAX_CHUNK + MIN_CHUNK
    header = pb.KernelUploadHeader(total_size=len(data),
                                   artifact_sha256=hashlib.sha256(data).hexdigest())
    with grpc.insecure_channel(target) as ch:
        resp = rpc.UrzaServiceStub(ch).PutKernel(
            iter([pb.PutKernelRequest(header=header),
                  pb.PutKernelRequest(chunk=data[:MAX_CHUNK]),
                  pb.PutKernelRequest(chunk=data[MAX_CHUNK:])]),
            timeout=30, metadata=[("x-api-key", API_KEY)])
    assert (resp.kernel_id, resp.created) == (kernel_id, True)
    msgs = _get_raw(target, pb.GetKernelRequest(kernel_id=kernel_id, chunk_size=MAX_CHUNK))
    assert [len(m.chunk.data) for m in msgs[1:]] == [MAX_CHUNK, len(data) - MAX_CHUNK]
    # One byte more than the contract allows is a named INVALID_ARGUMENT, not the cap's
    # RESOURCE_EXHAUSTED.
    err = _raw_put(target, [pb.PutKernelRequest(header=header),
                            pb.PutKernelRequest(chunk=data[:MAX_CHUNK + 1])])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk" in as_esper_error(err).field_violations[0][0]  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as too_big:
        _get_raw(target, pb.GetKernelRequest(kernel_id=kernel_id, chunk_size=MAX_CHUNK + 1))
    assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tampered_artifact_is_invalid_argument(target: str, client: UrzaClient,
                                               key: SigningKey) -> None:
    _, data, _ = make_artifact(key)
    art = kernel_pb2.KernelArtifact.FromString(data)
    w = bytearray(art.weights)
    w[-3] ^= 0x01
    art.weights = bytes(w)
    tampered = art.SerializeToString()
    header = pb.KernelUploadHeader(total_size=len(tampered),
                                   artifact_sha256=hashlib.sha256(tampered).hexdigest())
    err = _raw_put(target, [pb.PutKernelRequest(header=header),
                            pb.PutKernelRequest(chunk=tampered)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "weights" in err.details()
    with pytest.raises(ArtifactError):
        client.put_kernel(tampered, timeout_s=5)
    assert client.query_kernels(5)[0] == []


def test_untrusted_key_is_failed_precondition(target: str, client: UrzaClient) -> None:
    _, data, _ = make_artifact(SigningKey.generate())
    header = pb.KernelUploadHeader(total_size=len(data),
                                   artifact_sha256=hashlib.sha256(data).hexdigest())
    err = _raw_put(target, [pb.PutKernelRequest(header=header), pb.PutKernelRequest(chunk=data)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(as_esper_error(err), UntrustedKeyError)
    with pytest.raises(UntrustedKeyError):
        client.put_kernel(data, timeout_s=5)


def test_upload_stream_errors_name_the_field(target: str, key: SigningKey) -> None:
    _, data, _ = make_artifact(key)
    sha = hashlib.sha256(data).hexdigest()
    cases = {
        "header": [pb.PutKernelRequest(chunk=data)],
        "header.total_size": [pb.PutKernelRequest(header=pb.KernelUploadHeader(
            total_size=len(data) - 1, artifact_sha256=sha)), pb.PutKernelRequest(chunk=data)],
        "header.artifact_sha256": [pb.PutKernelRequest(header=pb.KernelUploadHeader(
            total_size=len(data), artifact_sha256="ab" * 32)), pb.PutKernelRequest(chunk=data)],
    }
    for field, messages in cases.items():
        err = _raw_put(target, messages)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert as_esper_error(err).field_violations[0][0] == field  # type: ignore[attr-defined]
    # a protovalidate rule (the header's sha256 pattern) names its field too
    err = _raw_put(target, [pb.PutKernelRequest(header=pb.KernelUploadHeader(
        total_size=len(data), artifact_sha256="XYZ"))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "artifact_sha256" in as_esper_error(err).field_violations[0][0]  # type: ignore[attr-defined]


def test_get_kernel_errors(client: UrzaClient, key: SigningKey) -> None:
    kernel_id, data, _ = make_artifact(key)
    client.put_kernel(data, timeout_s=10)
    with pytest.raises(NotFoundError):
        client.get_kernel("sha256:" + "e" * 64, timeout_s=5)
    with pytest.raises(InvalidArgumentError) as err:
        client.get_kernel("not-a-kernel-id", timeout_s=5)
    assert err.value.field == "kernel_id"
    with pytest.raises(BlueprintError):
        bad = blueprint("bottleneck_mlp")
        bad.ir.nodes[0].op = "system"
        client.put_blueprint(bad, timeout_s=5)
    with pytest.raises(OutOfRangeError), grpc.insecure_channel(client.target) as ch:
        try:
            list(rpc.UrzaServiceStub(ch).GetKernel(
                pb.GetKernelRequest(kernel_id=kernel_id, offset=len(data) + 1),
                timeout=5, metadata=[("x-api-key", API_KEY)]))
        except grpc.RpcError as e:
            raise as_esper_error(e) from e
    # caller mistakes do not count against Urza's health
    assert client.breaker.failure_rate() == 0.0


def test_calls_without_an_api_key_are_refused(target: str) -> None:
    with UrzaClient(target, api_key=None) as anonymous, pytest.raises(AuthError):
        anonymous.list_blueprints(5)
