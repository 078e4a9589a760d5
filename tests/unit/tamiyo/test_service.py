"""TamiyoService over a real grpc.aio server on loopback, with Urza served over gRPC as well.

The Urza here is a small in-test UrzaService that answers QueryKernels from a list of
KernelRecords (optionally slowly), so Tamiyo's real client code, deadlines and caching
are what is exercised.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import grpc
import pytest

from esper.errors import DeadlineExceededError, InvalidArgumentError, UnavailableError
from esper.runtime.breaker import BreakerConfig, CircuitBreaker
from esper.runtime.spec import PlatformContext
from esper.tamiyo.client import TamiyoClient
from esper.tamiyo.service import TamiyoServicer, build_controller, create_service
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.tamiyo.v1 import tamiyo_service_pb2 as pb
from generated.esper.tamiyo.v1 import tamiyo_service_pb2_grpc as rpc
from generated.esper.urza.v1 import urza_service_pb2 as upb
from generated.esper.urza.v1 import urza_service_pb2_grpc as urpc
from tests.unit.tamiyo.snapshots import IMPROVING, S, candidate, record, slot, snapshot

GOOD = candidate("good", 800, outcomes=10, fossilized=8, mean_contribution=0.05)
BIG = candidate("big", 50_000, outcomes=10, fossilized=10, mean_contribution=0.5)


class CatalogUrza(urpc.UrzaServiceServicer):
    """QueryKernels from a fixed catalog, honouring max_parameters, after `delay_s`."""

    def __init__(self, records: list, delay_s: float = 0.0) -> None:
        self.records = records
        self.delay_s = delay_s
        self.queries: list[upb.QueryKernelsRequest] = []
        self.metadata: list[dict] = []

    async def QueryKernels(self, request, context):
        self.queries.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        out = [
            r
            for r in self.records
            if (not request.max_parameters or r.manifest.profile.parameters <= request.max_parameters)
            and (not request.HasField("site") or r.manifest.site == request.site)
        ]
        return upb.QueryKernelsResponse(kernels=out[: request.page_size or None])


async def _server(add) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


class Platform:
    def __init__(self, tmp: Path, urza: CatalogUrza | None, settings: dict | None = None) -> None:
        self.tmp, self.urza, self.settings = tmp, urza, settings or {}

    async def __aenter__(self) -> Platform:
        endpoints = {}
        self.urza_server = None
        if self.urza is not None:
            self.urza_server, endpoints["urza"] = await _server(
                lambda s: urpc.add_UrzaServiceServicer_to_server(self.urza, s)
            )
        ctx = PlatformContext(data_dir=self.tmp, endpoints=endpoints, api_key="k" * 20, settings={"tamiyo": self.settings})
        self.spec = create_service(ctx)
        self.tamiyo_server, self.target = await _server(lambda s: self.spec.add_to_server(self.spec.servicer, s))
        if self.spec.on_start:
            await self.spec.on_start()
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = rpc.TamiyoServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.tamiyo_server.stop(None)
        if self.spec.on_stop:
            await self.spec.on_stop()
        if self.urza_server is not None:
            await self.urza_server.stop(None)


def plateau_snapshot(**kw):
    return snapshot([slot("s0", depth=0, host_grad_norm=0.2), slot("s1", depth=1, host_grad_norm=4.0)], **kw)


async def test_decide_round_trip_germinates_with_a_kernel_from_urza(tmp_path: Path) -> None:
    urza = CatalogUrza([record(BIG), record(GOOD)])
    async with Platform(tmp_path, urza) as p:
        resp = await p.stub.Decide(pb.DecideRequest(request_id=str(uuid.uuid4()), snapshot=plateau_snapshot()), timeout=2)
        assert resp.policy == "heuristic" and resp.policy_version == "1" and resp.latency_ms > 0
        assert [(d.kind, d.slot_id, d.kernel_id) for d in resp.decisions] == [
            (D.DECISION_KIND_GERMINATE, "s1", GOOD.kernel_id)
        ]
        # Both slots share one site signature: one query, bounded by the parameters left.
        assert len(urza.queries) == 1 and urza.queries[0].max_parameters == 10_000
        assert urza.metadata[0]["x-api-key"] == "k" * 20
        # A second boundary within the TTL is served from the cache.
        await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot(epoch=7)), timeout=2)
        assert len(urza.queries) == 1


async def test_allowed_blueprints_restrict_the_choice(tmp_path: Path) -> None:
    other = candidate("other", 100)
    async with Platform(tmp_path, CatalogUrza([record(GOOD), record(other)])) as p:
        req = pb.DecideRequest(snapshot=plateau_snapshot(), allowed_blueprints=[other.blueprint_id])
        resp = await p.stub.Decide(req, timeout=2)
        assert [d.kernel_id for d in resp.decisions] == [other.kernel_id]


async def test_deadline_is_kept_when_urza_is_slow_and_the_reply_says_why(tmp_path: Path) -> None:
    urza = CatalogUrza([record(GOOD)], delay_s=3.0)
    async with Platform(tmp_path, urza, {"urza_timeout_s": 5.0}) as p:
        t0 = time.monotonic()
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=0.3)
        elapsed = time.monotonic() - t0
        # An answer at all proves the server replied inside the 0.3 s deadline (gRPC would
        # raise DEADLINE_EXCEEDED otherwise); the elapsed time shows it did not wait on Urza's
        # 3 s (with slack for a loaded machine).
        assert elapsed < 1.0
        assert [d.kind for d in resp.decisions] == [D.DECISION_KIND_WAIT]
        assert "Urza did not answer" in resp.decisions[0].reason
        assert "plateau" in resp.decisions[0].reason


async def test_urza_down_still_prunes_and_fossilizes_but_never_germinates(tmp_path: Path) -> None:
    # An Urza endpoint nobody listens on.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = PlatformContext(data_dir=tmp_path, endpoints={"urza": f"127.0.0.1:{port}"})
    controller = build_controller(ctx)
    server, target = await _server(lambda s: rpc.add_TamiyoServiceServicer_to_server(TamiyoServicer(controller), s))
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = rpc.TamiyoServiceStub(ch)
            slots = [slot("s0", S.SEED_STAGE_BLENDING, contribution=-0.2, measured=True), slot("s1", depth=1)]
            resp = await stub.Decide(pb.DecideRequest(snapshot=snapshot(slots, seeds_left=2)), timeout=2)
            kinds = [(d.kind, d.slot_id) for d in resp.decisions]
            assert kinds == [(D.DECISION_KIND_PRUNE, "s0"), (D.DECISION_KIND_WAIT, "")]
            # UrzaClient retries UNAVAILABLE inside the time it is given, so a dead Urza costs one
            # urza_timeout_s, and the reply says germination was impossible without kernels.
            assert "Urza did not answer" in resp.decisions[1].reason
            assert "no germination possible" in resp.decisions[1].reason
            assert controller.urza_failures == 1
            # Within the cool-down the next Decide does not wait on Urza again.
            resp = await stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=2)
            assert "not asking again" in resp.decisions[-1].reason
            assert controller.urza_failures == 1
    finally:
        await controller.source.close()
        await server.stop(None)


async def test_stale_candidates_are_used_when_urza_goes_away(tmp_path: Path) -> None:
    urza = CatalogUrza([record(GOOD)])
    async with Platform(tmp_path, urza, {"candidate_ttl_s": 0.0}) as p:
        await p.stub.Decide(pb.DecideRequest(snapshot=snapshot([slot("s0")], val_loss=IMPROVING)), timeout=2)
        await p.urza_server.stop(None)
        resp = await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=2)
        assert [d.kernel_id for d in resp.decisions] == [GOOD.kernel_id]
        assert "using cached kernels" in resp.decisions[0].reason or len(urza.queries) == 1


async def test_idempotent_on_request_id_and_a_reused_id_for_another_snapshot_is_invalid(tmp_path: Path) -> None:
    async with Platform(tmp_path, CatalogUrza([record(GOOD)]), {"policy": "random", "random": {"germinate_prob": 0.5}}) as p:
        rid = str(uuid.uuid4())
        snap = plateau_snapshot()
        first = await p.stub.Decide(pb.DecideRequest(request_id=rid, snapshot=snap), timeout=2)
        again = await p.stub.Decide(pb.DecideRequest(request_id=rid, snapshot=snap), timeout=2)
        assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.stub.Decide(pb.DecideRequest(request_id=rid, snapshot=plateau_snapshot(epoch=9)), timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rid in err.value.details()


async def test_concurrent_retries_share_one_decision(tmp_path: Path) -> None:
    urza = CatalogUrza([record(GOOD)], delay_s=0.1)
    async with Platform(tmp_path, urza) as p:
        req = pb.DecideRequest(request_id=str(uuid.uuid4()), snapshot=plateau_snapshot())
        a, b, c = await asyncio.gather(*(p.stub.Decide(req, timeout=2) for _ in range(3)))
        assert a == b == c
        assert len(urza.queries) == 1


async def test_a_deadline_too_short_for_any_decision_is_deadline_exceeded(tmp_path: Path) -> None:
    async with Platform(tmp_path, CatalogUrza([]), {"decide_reserve_s": 0.5}) as p:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.stub.Decide(pb.DecideRequest(snapshot=plateau_snapshot()), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_duplicate_slot_ids_are_invalid_argument(tmp_path: Path) -> None:
    async with Platform(tmp_path, CatalogUrza([])) as p:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await p.stub.Decide(pb.DecideRequest(snapshot=snapshot([slot("s0"), slot("s0")])), timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'s0'" in err.value.details()


async def test_get_policy_info_names_the_policy_and_its_settings(tmp_path: Path) -> None:
    async with Platform(tmp_path, None, {"heuristic": {"plateau_window": 4}}) as p:
        info = await p.stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=2)
        assert info.policy == "heuristic" and info.policy_version == "1"
        assert info.settings["plateau_window"] == "4"
        assert abs(info.loaded_at.seconds - time.time()) < 60


async def test_sync_client_round_trip_typed_errors_and_breaker(tmp_path: Path) -> None:
    async with Platform(tmp_path, CatalogUrza([record(GOOD)]), {"decide_reserve_s": 0.05}) as p:
        target = p.target

        def calls() -> tuple:
            with TamiyoClient(target, api_key=None) as c:
                resp = c.decide(plateau_snapshot(), timeout_s=2)
                info = c.policy_info()
                try:
                    c.decide(plateau_snapshot(), timeout_s=0.02)
                except DeadlineExceededError as e:
                    short = e
                try:
                    c.decide(snapshot([slot("x"), slot("x")]), timeout_s=2)
                except InvalidArgumentError as e:
                    bad = e
            return resp, info, short, bad

        resp, info, short, bad = await asyncio.to_thread(calls)
        assert resp.decisions[0].kind == D.DECISION_KIND_GERMINATE and info.policy == "heuristic"
        assert isinstance(short, DeadlineExceededError) and isinstance(bad, InvalidArgumentError)

    def dead() -> tuple[int, Exception]:
        breaker = CircuitBreaker("tamiyo", BreakerConfig(minimum_calls=2, window_size=2, failure_rate_threshold=50, open_wait_s=60))
        with TamiyoClient(target, breaker=breaker) as c:
            network = 0
            for _ in range(2):
                with pytest.raises(UnavailableError):
                    c.decide(plateau_snapshot(), timeout_s=0.5)
                network += 1
            with pytest.raises(UnavailableError) as refused:
                c.decide(plateau_snapshot(), timeout_s=0.5)
        return network, refused.value

    network, refused = await asyncio.to_thread(dead)
    assert network == 2 and "open" in str(refused).lower()
