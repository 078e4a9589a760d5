"""Tamiyo in the real platform: hosted by the runtime Host (auth, protovalidate, error
mapping), choosing among kernels that Tezzeret compiled and Urza serves."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from esper.blueprints import builtin_blueprints, site_signature, supports
from esper.errors import AuthError, InvalidArgumentError, PermissionDeniedError
from esper.runtime.auth import AuthConfig
from esper.runtime.errors import RequestValidationError
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tamiyo.client import TamiyoClient
from esper.tamiyo.service import create_service as tamiyo_service
from esper.tezzeret.service import create_service as tezzeret_service
from esper.urza.client import UrzaClient
from esper.urza.service import create_service as urza_service
from generated.esper.common.v1 import decision_pb2 as D
from generated.esper.common.v1 import health_pb2, seed_pb2

pytestmark = pytest.mark.integration

KEY = "tamiyo-test-key-0123456789"
READ_ONLY_URZA = "urza-only-key-0123456789ab"


def plateau(site: seed_pb2.SiteSignature, parameters_left: int) -> health_pb2.HealthSnapshot:
    snap = health_pb2.HealthSnapshot(
        run_id="it-run",
        epoch=8,
        total_epochs=20,
        val_loss_history=[2.0, 1.2, 0.9, 0.8, 0.799, 0.7985, 0.7984, 0.7983, 0.7983],
        host_parameters=4_000,
        seeds_left=2,
        parameters_left=parameters_left,
    )
    for i, g in enumerate((0.3, 2.0)):
        snap.slots.add(slot_id=f"body.{i}", stage=seed_pb2.SEED_STAGE_DORMANT, site=site, host_grad_norm=g, depth=i, finite=True)
    return snap


async def test_decide_picks_a_kernel_urza_serves_within_budget_behind_auth(tmp_path) -> None:
    keys_dir = tmp_path / "trusted_keys"
    keys_dir.mkdir()
    ctx = PlatformContext(
        data_dir=tmp_path,
        api_key=KEY,
        settings={
            "urza": {"trusted_keys_dir": str(keys_dir)},
            "tezzeret": {"trusted_keys_dir": str(keys_dir), "benchmark_iters": 3, "catalog_sites": [{"layout": "NC", "channels": 16}]},
        },
    )
    auth = AuthConfig(keys={KEY: frozenset({"*"}), READ_ONLY_URZA: frozenset({"urza:read"})})
    urza = Host([urza_service(ctx)], config=HostConfig(port=0), auth=auth)
    ctx.endpoints["urza"] = f"127.0.0.1:{await urza.start()}"
    tez = Host([tezzeret_service(ctx)], config=HostConfig(port=0), auth=auth)
    await tez.start()
    tamiyo = Host([tamiyo_service(ctx)], config=HostConfig(port=0), auth=auth)
    target = f"127.0.0.1:{await tamiyo.start()}"
    site = site_signature("NC", 16)
    expected = sum(1 for b in builtin_blueprints() if supports(b, site))
    try:

        def catalog() -> list:
            with UrzaClient(ctx.endpoints["urza"], api_key=KEY) as c:
                return c.query_kernels(10.0, site=site, page_size=100)[0]

        deadline = time.monotonic() + 120
        while len(records := await asyncio.to_thread(catalog)) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        assert len(records) == expected
        sizes = sorted(r.manifest.profile.parameters for r in records)
        # A budget that admits only the smaller kernels.
        budget = sizes[len(sizes) // 2]
        affordable = {r.kernel_id for r in records if r.manifest.profile.parameters <= budget}

        def calls():
            with TamiyoClient(target, api_key=KEY) as c:
                resp = c.decide(plateau(site, budget), timeout_s=5.0)
                info = c.policy_info()
            errors = []
            with TamiyoClient(target, api_key="wrong-key-0123456789abcdef") as c:
                try:
                    c.decide(plateau(site, budget), timeout_s=5.0)
                except AuthError as e:
                    errors.append(e)
            with TamiyoClient(target, api_key=READ_ONLY_URZA) as c:
                try:
                    c.decide(plateau(site, budget), timeout_s=5.0)
                except PermissionDeniedError as e:
                    errors.append(e)
            with TamiyoClient(target, api_key=KEY) as c:
                try:
                    c.decide(plateau(site, budget), timeout_s=5.0, request_id="not-a-uuid")
                except InvalidArgumentError as e:
                    errors.append(e)
                rid = str(uuid.uuid4())
                first = c.decide(plateau(site, budget), timeout_s=5.0, request_id=rid)
                again = c.decide(plateau(site, budget), timeout_s=5.0, request_id=rid)
            return resp, info, errors, first, again

        resp, info, errors, first, again = await asyncio.to_thread(calls)
        assert [(d.kind, d.slot_id) for d in resp.decisions] == [(D.DECISION_KIND_GERMINATE, "body.1")]
        d = resp.decisions[0]
        assert d.kernel_id in affordable and d.blueprint_id in {b.blueprint_id for b in builtin_blueprints()}
        assert info.policy == "heuristic"
        # A broken field rule comes back as the host's RequestValidationError (an InvalidArgumentError).
        assert [type(e) for e in errors] == [AuthError, PermissionDeniedError, RequestValidationError]
        assert errors[2].field == "request_id"
        assert first == again
    finally:
        await tamiyo.stop("test over")
        await tez.stop("test over")
        await urza.stop("test over")
