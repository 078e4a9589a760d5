"""TolariaService: a thin gRPC adapter over the run store and the run supervisor.

Validation that protovalidate cannot express (the job is registered and its parameters
fit its function; the deprecated task, host and sites exist; no field this build does not
know) happens here and answers INVALID_ARGUMENT naming the field. The job function itself
runs only in the run's worker: a job that raises while building fails its run, never the
service.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import unknown_fields
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate

from esper.config import PARSE, from_dict
from esper.errors import ConfigError, InvalidArgumentError
from esper.jobs.errors import JobConfigError
from esper.jobs.registry import JobInfo, JobRegistry
from esper.runtime.auth import ENV_RUN_TOKEN_KEY_FILE, ENV_RUN_TOKEN_PUBLIC_KEY_FILE, RunTokenSigner
from esper.runtime.spec import PlatformContext, ServiceSpec
from esper.tolaria.runs import RunStore
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc


def validate_run_config(msg: pb.RunConfig, registry: JobRegistry | None = None) -> None:
    """Check what the proto rules cannot: known fields, the job and its parameters, the
    deprecated task, host and site names.

    Raises:
        InvalidArgumentError: `field` is the dotted path under the request ("config.job",
            "config.job_params.width", "config.sites[1]").
        FailedPreconditionError: the job is registered but cannot be imported.
    """
    from esper.tolaria.config import RunConfig

    registry = registry or JobRegistry.discover()
    _reject_unknown_fields(msg, "config")
    try:
        cfg = RunConfig.from_proto(msg)
        if not cfg.job:
            _check_legacy_task(cfg)
        name, params = cfg.job_spec()
        registry.coerce(name, params, run={"seed": cfg.seed, "batch_size": cfg.batch_size})
    except JobConfigError as e:
        raise InvalidArgumentError(str(e), field=f"config.{e.field}") from e


def _check_legacy_task(cfg) -> None:  # type: ignore[no-untyped-def]
    """The deprecated task/host/width/sites, checked as before jobs (the hosts are tiny to
    build): errors name `task`, `host` and `sites[i]`, as old clients expect."""
    from esper.tasks import get_task, resolve_sites

    task = get_task(cfg.task)
    host = task.host(cfg.host)
    if cfg.sites:
        resolve_sites(host.build(cfg.width), cfg.sites)


def _reject_unknown_fields(msg, path: str) -> None:
    """A field this build does not know would be silently dropped: refuse it instead."""
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise InvalidArgumentError(
            f"{path} has field number(s) {numbers} that this Tolaria does not know "
            f"(a newer client?); known fields: {', '.join(f.name for f in msg.DESCRIPTOR.fields)}",
            field=f"{path}.{numbers[0]}",
        )
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for i, item in enumerate(value):
                _reject_unknown_fields(item, f"{path}.{fd.name}[{i}]")
        elif fd.message_type.full_name.startswith("esper."):
            _reject_unknown_fields(value, f"{path}.{fd.name}")


def _current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def _job_proto(info: JobInfo) -> pb.Job:
    return pb.Job(name=info.name, description=info.description, source=info.source, parameters=[
        pb.JobParameter(name=p.name, type=p.type, default_value=p.default or "",
                        required=p.default is None, description=p.doc, choices=list(p.choices),
                        accepts_none=p.optional, run_config_field=p.run_field)
        for p in info.params])


DEFAULT_JOB_PAGE = 100


class TolariaServicer(rpc.TolariaServiceServicer):
    def __init__(self, supervisor: RunSupervisor, registry: JobRegistry) -> None:
        self.sup = supervisor
        self.registry = registry

    async def StartRun(self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext) -> pb.StartRunResponse:
        rec = await self.sup.start_run(
            request.config, request_id=request.request_id or None, traceparent=_current_traceparent()
        )
        return pb.StartRunResponse(run=rec.to_proto())

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=self.sup.get_run(request.run_id).to_proto())

    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        runs, token = self.sup.list_runs(
            page_size=request.page_size, page_token=request.page_token, state=request.state
        )
        return pb.ListRunsResponse(runs=[r.to_proto() for r in runs], next_page_token=token)

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        async for env in self.sup.watch(request.run_id, request.from_sequence):
            yield pb.WatchRunResponse(event=env)

    async def StopRun(self, request: pb.StopRunRequest, context: grpc.aio.ServicerContext) -> pb.StopRunResponse:
        rec = await self.sup.stop_run(request.run_id, request.reason,
                                      request_id=request.request_id or None)
        requested = Timestamp()
        if rec.stop_requested_at is not None:
            requested.FromNanoseconds(int(rec.stop_requested_at * 1e9))
        else:  # stopped by a StopRun of a Tolaria that did not record the time yet
            requested.GetCurrentTime()
        # Not ended yet: it is headed for STOPPED (the worker checkpoints first).
        expected = rec.state if rec.ended else pb.RUN_STATE_STOPPED
        return pb.StopRunResponse(run=rec.to_proto(), requested_at=requested, expected_state=expected)

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
                       ) -> pb.ListJobsResponse:
        names = self.registry.names()
        start = 0
        if request.page_token:
            if request.page_token not in names:
                raise InvalidArgumentError(
                    f"page token {request.page_token!r} is not one this Tolaria gave out "
                    "(use next_page_token from the previous page)", field="page_token")
            start = names.index(request.page_token) + 1
        size = request.page_size or DEFAULT_JOB_PAGE
        page = names[start:start + size]
        more = start + size < len(names)
        return pb.ListJobsResponse(jobs=[_job_proto(self.registry.describe(n)) for n in page],
                                   next_page_token=page[-1] if more and page else "")


def _strings(value: Any) -> Any:
    # worker_args are command-line words: YAML numbers (`--seed 3`) become strings.
    return [str(a) for a in value] if isinstance(value, list | tuple) else value


@dataclass(kw_only=True, frozen=True)
class TolariaConfig:
    """`ctx.settings["tolaria"]` (`esper.config.from_dict`; unknown keys are an error)."""

    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    """How runs are started, watched and restarted (`SupervisorConfig`)."""
    worker_args: tuple[str, ...] = field(default=(), metadata={PARSE: _strings})
    """Extra worker command-line arguments, e.g. ["--trusted-keys", path]."""
    jobs: Mapping[str, str] = field(default_factory=dict, metadata={PARSE: lambda v: v or {}})
    """Job name → "package.module:function": the operator's own jobs (also
    ESPER_TOLARIA_JOBS='{name: pkg.mod:func}')."""
    run_token_key_file: str = ""
    """The Ed25519 key that signs each worker's run token; "": $ESPER_RUN_TOKEN_KEY_FILE."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TolariaConfig:
        return from_dict(cls, data, what="tolaria settings", path="settings.tolaria")


def create_service(ctx: PlatformContext) -> ServiceSpec:
    """Settings: ``ctx.settings["tolaria"]``, see `TolariaConfig`.

    Raises:
        ConfigError: auth is on (the context has a key) but no run-token key is given: a
            worker would otherwise need one of the platform's own keys.
    """
    settings = TolariaConfig.from_dict(ctx.settings.get("tolaria"))
    configured_jobs = dict(settings.jobs)
    # A bad registration (malformed target, a name taken twice) fails the service at start,
    # not the first StartRun naming it.
    registry = JobRegistry.discover(configured_jobs)
    worker_args = list(settings.worker_args)
    if configured_jobs:
        worker_args += ["--jobs", json.dumps(configured_jobs)]
    key_file = settings.run_token_key_file or os.environ.get(ENV_RUN_TOKEN_KEY_FILE)
    signer = RunTokenSigner.from_file(Path(key_file)) if key_file else None
    if ctx.api_key is not None and signer is None:
        raise ConfigError(
            f"Tolaria runs with authentication but has no key to sign its workers' run tokens: "
            f"set {ENV_RUN_TOKEN_KEY_FILE} (or tolaria.run_token_key_file) to an Ed25519 private "
            "key (openssl genpkey -algorithm ed25519 -out run-token.pem) and give every service "
            f"its public key in {ENV_RUN_TOKEN_PUBLIC_KEY_FILE} (openssl pkey -in run-token.pem "
            "-pubout -out run-token.pub); `esper up` and deploy/k8s/make_secrets.py make the pair")
    store = RunStore(ctx.part_dir("tolaria"))
    sup = RunSupervisor(
        store,
        endpoints=dict(ctx.endpoints),
        nats_url=ctx.nats_url,
        api_key=ctx.api_key,
        validate=partial(validate_run_config, registry=registry),
        config=settings.supervisor,
        worker_args=worker_args,
        signer=signer,
    )

    async def on_start() -> None:
        # Endpoints are final only once every part listens (ports may be 0 until then).
        sup.endpoints = dict(ctx.endpoints)
        sup.start()
        await sup.resume_active()

    async def on_stop() -> None:
        await sup.close()
        store.close()

    return ServiceSpec(
        part="tolaria",
        service_name="esper.tolaria.v1.TolariaService",
        servicer=TolariaServicer(sup, registry),
        add_to_server=rpc.add_TolariaServiceServicer_to_server,
        write_methods=frozenset({"StartRun", "StopRun"}),
        on_start=on_start,
        on_stop=on_stop,
    )

