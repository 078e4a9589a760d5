"""Karn, Tezzeret and Urza served on loopback: accepted proposals are compiled and stored
with their lineage; a proposal that fails validation never reaches Urza."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from esper.blueprints import builtin_blueprints, site_signature, supports
from esper.karn.service import create_service as karn_service
from esper.runtime.auth import AuthConfig
from esper.runtime.host import Host, HostConfig
from esper.runtime.spec import PlatformContext
from esper.tezzeret.service import create_service as tezzeret_service
from esper.urza.client import UrzaClient
from esper.urza.service import create_service as urza_service
from generated.esper.common.v1 import blueprint_pb2
from generated.esper.karn.v1 import karn_service_pb2 as pb
from generated.esper.karn.v1 import karn_service_pb2_grpc as rpc
from generated.esper.urza.v1 import urza_service_pb2 as urza_pb

pytestmark = pytest.mark.integration

SITE = site_signature("NCL", 8, (40,))


def _break_output(ir: blueprint_pb2.BlueprintIR, plan, rng) -> blueprint_pb2.BlueprintIR:
    """A mutation that breaks validation: the output projection changes the width."""
    child = blueprint_pb2.BlueprintIR()
    child.CopyFrom(ir)
    out = next(n for n in child.nodes if n.name == child.output)
    if out.op in ("linear", "conv1d"):
        out.attrs["features"].int_value = 3
    else:
        out.op = "linear"
        out.ClearField("attrs")
        out.attrs["features"].int_value = 3
    return child


@pytest.fixture
async def platform(tmp_path):
    keys_dir = tmp_path / "trusted_keys"
    keys_dir.mkdir()
    ctx = PlatformContext(data_dir=tmp_path, settings={
        "urza": {"trusted_keys_dir": str(keys_dir)},
        "tezzeret": {"trusted_keys_dir": str(keys_dir), "benchmark_iters": 0,
                     "catalog_sites": [{"layout": "NCL", "channels": 8, "spatial": [40]}]},
        "karn": {"compile_timeout_s": 60},
    })
    auth = AuthConfig(disabled=True)
    hosts = []
    urza = Host([urza_service(ctx)], config=HostConfig(port=0), auth=auth)
    hosts.append(urza)
    ctx.endpoints["urza"] = f"127.0.0.1:{await urza.start()}"
    tez = Host([tezzeret_service(ctx)], config=HostConfig(port=0), auth=auth)
    hosts.append(tez)
    ctx.endpoints["tezzeret"] = f"127.0.0.1:{await tez.start()}"
    client = UrzaClient(ctx.endpoints["urza"])
    expected = sum(1 for b in builtin_blueprints() if supports(b, SITE))
    for _ in range(240):
        records, _ = await asyncio.to_thread(client.query_kernels, 10.0, site=SITE)
        if len(records) >= expected:
            break
        await asyncio.sleep(0.25)
    assert len(records) == expected, "Tezzeret did not compile the catalog for the site"

    async def start_karn(evolve=None, **kw):
        ctx.settings["karn"] = {"compile_timeout_s": 60, "evolve": evolve or {}}
        h = Host([karn_service(ctx, **kw)], config=HostConfig(port=0), auth=auth)
        hosts.append(h)
        return f"127.0.0.1:{await h.start()}"

    try:
        yield ctx, client, start_karn, records
    finally:
        client.close()
        for h in reversed(hosts):
            await h.stop("test over")


async def _ids(client: UrzaClient) -> set[str]:
    bps, _ = await asyncio.to_thread(client.list_blueprints, 10.0, page_size=1000)
    return {b.blueprint_id for b in bps}


async def test_failed_proposal_never_reaches_urza(platform):
    _, client, start_karn, _ = platform
    before = await _ids(client)
    target = await start_karn(evolve={"crossover_rate": 0.0},
                              mutations={"break_output": _break_output})
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await rpc.KarnServiceStub(ch).ProposeBlueprints(
            pb.ProposeBlueprintsRequest(count=2, site=SITE, seed=5), timeout=60)
    assert len(resp.proposals) >= 2
    for p in resp.proposals:
        assert not p.accepted and p.kernel_id == ""
        assert p.operator == "mutate:break_output"
        assert p.rejection.startswith("pre-flight: IR invalid")
        assert "shape" in p.rejection
    after = await _ids(client)
    assert after == before
    rejected = {p.blueprint.blueprint_id for p in resp.proposals}
    assert not rejected & after
    for bp_id in rejected:
        records, _ = await asyncio.to_thread(client.query_kernels, 10.0, blueprint_id=bp_id)
        assert records == []


async def test_accepted_proposals_are_compiled_with_lineage_and_idempotent(platform):
    _, client, start_karn, records = platform
    # Field reports: one catalog kernel helped, the others did not.
    best = next(r for r in records if r.blueprint.name == "conv3_residual_1d")
    for i, r in enumerate(records):
        await asyncio.to_thread(client.record_outcome, urza_pb.FieldReport(
            kernel_id=r.kernel_id, run_id=f"run-{i}", slot_id="body.1", task="mnist1d",
            contribution=0.5 if r is best else -0.1, fate=urza_pb.SEED_FATE_FOSSILIZED), 10.0)
    before = await _ids(client)
    target = await start_karn()
    rid = str(uuid.uuid4())
    req = pb.ProposeBlueprintsRequest(request_id=rid, count=3, site=SITE, seed=7)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.KarnServiceStub(ch)
        resp = await stub.ProposeBlueprints(req, timeout=120)
        accepted = [p for p in resp.proposals if p.accepted]
        assert len(accepted) == 3, [p.rejection for p in resp.proposals]
        after = await _ids(client)
        assert after - before == {p.blueprint.blueprint_id for p in accepted}
        for p in accepted:
            stored = await asyncio.to_thread(client.get_blueprint, p.blueprint.blueprint_id, 10.0)
            assert stored.origin == "karn"
            assert list(stored.parent_ids) == list(p.blueprint.parent_ids)
            assert set(stored.parent_ids) <= before
            assert stored.name == p.blueprint.name and stored.name.startswith("karn-")
            kernels, _ = await asyncio.to_thread(client.query_kernels, 10.0,
                                                 blueprint_id=stored.blueprint_id, site=SITE)
            assert [k.kernel_id for k in kernels] == [p.kernel_id]
            assert kernels[0].manifest.validation.init_max_abs_delta <= 1e-6

        again = await stub.ProposeBlueprints(req, timeout=120)
        assert again == resp
        assert await _ids(client) == after

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ProposeBlueprints(pb.ProposeBlueprintsRequest(
                request_id=rid, count=2, site=SITE, seed=7), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in err.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ProposeBlueprints(pb.ProposeBlueprintsRequest(count=0, site=SITE),
                                         timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

