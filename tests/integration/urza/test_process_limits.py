"""Urza as its own process (`python -m esper.urza.serve_standalone`): SIGHUP revokes a
removed signer at once, and refused uploads of 200 MB each leave its memory flat."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from esper.blueprints.artifact import SigningKey
from esper.errors import UntrustedKeyError
from esper.urza.client import UrzaClient
from generated.esper.common.v1 import kernel_pb2
from generated.esper.urza.v1 import urza_service_pb2 as pb
from generated.esper.urza.v1 import urza_service_pb2_grpc as rpc
from tests.integration.urza.test_faults import API_KEY, UrzaProcess
from tests.unit.urza.kernels_helper import make_artifact

pytestmark = pytest.mark.integration

MB = 1 << 20


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def _start(tmp_path: Path, key: SigningKey, **env: str) -> UrzaProcess:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signer.pem").write_bytes(key.public_pem())
    data = tmp_path / "data"
    data.mkdir()
    p = UrzaProcess(data, keys, extra_env=env)
    p.start()
    return p


def test_sighup_revokes_a_removed_key_at_once(tmp_path: Path, key: SigningKey) -> None:
    # Polling an hour apart: only the signal can make the revocation take effect.
    urza = _start(tmp_path, key, ESPER_URZA_TRUSTED_KEYS_RELOAD_S="3600")
    try:
        kid, data, _ = make_artifact(key, channels=16)
        with UrzaClient(urza.target, api_key=API_KEY) as client:
            client.put_kernel(data, timeout_s=10)
            (urza.keys_dir / "signer.pem").unlink()
            assert client.get_kernel(kid, timeout_s=5) == data  # not looked at yet
            assert urza.proc is not None
            urza.proc.send_signal(signal.SIGHUP)
            t0 = time.monotonic()
            while True:
                try:
                    client.get_kernel(kid, timeout_s=5)
                except UntrustedKeyError:
                    break
                assert time.monotonic() - t0 < 5.0, "SIGHUP did not revoke the key within 5 s"
                time.sleep(0.05)
            assert client.query_kernels(5)[0] == []
            assert urza.proc.poll() is None  # SIGHUP reloads; it does not stop Urza
    finally:
        urza.stop()
    assert "trusted signer keys changed: revoked" in urza.log.read_text()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _fake_artifact_head(signer: SigningKey, weights_size: int) -> bytes:
    """The framing of a KernelArtifact whose weights part (`weights_size` bytes) follows:
    manifest, signature and ir parts, then the weights part's tag and length."""
    manifest = kernel_pb2.KernelManifest(format_version=1, key_id=signer.key_id,
                                         blueprint_id="bp-0000000000000001")
    m = manifest.SerializeToString()
    head = kernel_pb2.KernelArtifact(manifest=m, signature=signer.sign(m), ir=b"\x08\x01")
    out = bytearray(head.SerializeToString())
    out.append((4 << 3) | 2)
    n = weights_size
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@pytest.mark.slow
def test_memory_stays_flat_while_three_200mb_uploads_are_refused(
        tmp_path: Path, key: SigningKey) -> None:
    """Issue 11 point 5: 201 MB of garbage took Urza from 514 MB to 987 MB, three at once
    +1.48 GB, never given back. Uploads now stream to a temp file: two of garbage (refused
    by the framing check) and one signed by an untrusted key (refused by the signer check)
    must not move the server's RSS by more than a fraction of one upload."""
    urza = _start(tmp_path, key)
    assert urza.proc is not None
    block = os.urandom(MB)
    size = 200 * MB

    def stream(head: bytes) -> tuple[pb.KernelUploadHeader, Iterator[pb.PutKernelRequest]]:
        body_len = size - len(head)
        h = hashlib.sha256(head)
        for _ in range(body_len // MB):
            h.update(block)
        h.update(block[:body_len % MB])
        header = pb.KernelUploadHeader(total_size=size, artifact_sha256=h.hexdigest())

        def messages() -> Iterator[pb.PutKernelRequest]:
            yield pb.PutKernelRequest(header=header)
            yield pb.PutKernelRequest(chunk=head)
            for _ in range(body_len // MB):
                yield pb.PutKernelRequest(chunk=block)
            yield pb.PutKernelRequest(chunk=block[:body_len % MB])

        return header, messages()

    stranger = SigningKey.generate()
    heads = [b"", b"\xff" * 7, _fake_artifact_head(stranger, size - 400)]
    heads[2] = _fake_artifact_head(stranger, size - len(heads[2]))
    codes: list[grpc.StatusCode] = []
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss(urza.proc.pid))  # type: ignore[union-attr]
            time.sleep(0.05)

    def upload(head: bytes) -> None:
        _, messages = stream(head)
        with grpc.insecure_channel(urza.target) as ch:
            try:
                rpc.UrzaServiceStub(ch).PutKernel(messages, timeout=300,
                                                  metadata=[("x-api-key", API_KEY)])
            except grpc.RpcError as err:
                codes.append(err.code())

    try:
        with UrzaClient(urza.target, api_key=API_KEY) as client:
            client.query_kernels(5)  # warm: the first call's imports and caches
        before = _rss(urza.proc.pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=upload, args=(h,)) for h in heads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        took = time.monotonic() - t0
        time.sleep(1.0)
        done.set()
        sampler.join()
        after = _rss(urza.proc.pid)
    finally:
        urza.stop()
    peak = max(samples)
    print(f"\nUrza RSS: before {before / MB:.0f} MB, peak {peak / MB:.0f} MB "
          f"(+{(peak - before) / MB:.0f}), after {after / MB:.0f} MB "
          f"(+{(after - before) / MB:.0f}); 3 x 200 MB refused in {took:.1f} s")
    assert sorted(c.name for c in codes) == ["FAILED_PRECONDITION", "INVALID_ARGUMENT",
                                             "INVALID_ARGUMENT"]
    # Generous slack for allocator noise and gRPC's buffers; buffering even one of the
    # uploads would add 200 MB.
    assert peak - before < 150 * MB
    assert after - before < 100 * MB
    assert [p for p in (urza.data_dir / "urza" / "blobs").rglob("*") if p.is_file()] == []
