"""Clients of replicated services spread calls over every address of the target (what a
headless Service gives them), instead of pinning one connection: round_robin."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from esper.runtime.client import sync_channel
from esper.urza.client import _CHANNEL_OPTIONS


@pytest.fixture
def two_replicas():
    servers, ports = [], []
    for status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("replica", status)  # which replica answered shows in the reply
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    yield f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    for server in servers:
        server.stop(None)


def _answers(ch: grpc.Channel, n: int = 20) -> set[int]:
    stub = health_pb2_grpc.HealthStub(ch)
    return {stub.Check(health_pb2.HealthCheckRequest(service="replica"), timeout=5,
                       wait_for_ready=True).status for _ in range(n)}


def test_esper_channels_round_robin_over_every_address(two_replicas: str) -> None:
    with sync_channel(two_replicas) as ch:
        assert len(_answers(ch)) == 2


def test_urza_client_channel_round_robins_too(two_replicas: str) -> None:
    with grpc.insecure_channel(two_replicas, options=_CHANNEL_OPTIONS) as ch:
        assert len(_answers(ch)) == 2


def test_without_round_robin_one_replica_gets_every_call(two_replicas: str) -> None:
    # The behaviour the options above replace (gRPC's default pick_first).
    with grpc.insecure_channel(two_replicas) as ch:
        assert len(_answers(ch)) == 1
