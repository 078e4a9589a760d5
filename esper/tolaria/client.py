"""The public Tolaria client (blocking): submit, follow, inspect and stop runs; list jobs.

    with TolariaClient.local(".esper") as tolaria:          # an `esper up` on this machine
        run = tolaria.start_run(RunConfig.from_dict({"job": "mnist1d", "epochs": 10}))
        for event in tolaria.watch(run.run_id):
            ...

`TolariaClient(target, api_key)` reaches any Tolaria; `find_platform` resolves where one
is the way the `esper run` commands do (flags, then ESPER_ENDPOINTS / ESPER_API_KEY, then
the `endpoints.json` and API-key file a local `esper up` writes in its data dir). Every
failure is an `esper.errors` type.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from esper.runtime.client import PartClient, as_esper_error
from esper.runtime.endpoints import PartEndpoint, find_part
from generated.esper.oona.v1 import events_pb2
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb
from generated.esper.tolaria.v1 import tolaria_service_pb2_grpc as rpc

Platform = PartEndpoint
"""Where a Tolaria is and the key to send it (`esper.runtime.endpoints.PartEndpoint`)."""


def find_platform(*, endpoint: str | None = None, api_key: str | None = None,
                  data_dir: str | Path | None = None, env: Mapping[str, str] | None = None
                  ) -> Platform:
    """Resolve Tolaria's address and key the way every command finds a part
    (`esper.runtime.endpoints.find_part`): arguments, then ESPER_ENDPOINTS / ESPER_API_KEY,
    then a local `esper up`'s `<data_dir>/endpoints.json` and API-key file (data dir:
    argument, ESPER_DATA_DIR, ".esper"; the local key only with the local endpoint).

    Raises:
        ConfigError: ESPER_ENDPOINTS is malformed or has no tolaria entry.
        UnavailableError: nothing says where a Tolaria is.
    """
    return find_part("tolaria", endpoint=endpoint, api_key=api_key, data_dir=data_dir, env=env)


class TolariaClient(PartClient):
    """Blocking client for `esper.tolaria.v1.TolariaService`; thread-safe."""

    part = "tolaria"

    def __init__(self, target: str, api_key: str | None = None, *, timeout_s: float = 30.0) -> None:
        # Unary calls get `timeout_s`; WatchRun (a stream) runs until the run ends.
        super().__init__(target, api_key)
        self.timeout_s = timeout_s
        self._stub = rpc.TolariaServiceStub(self._channel)

    @classmethod
    def local(cls, data_dir: str | Path = ".esper", **kwargs: Any) -> TolariaClient:
        p = find_platform(data_dir=data_dir, env={})
        return cls(p.target, p.api_key, **kwargs)

    @classmethod
    def find(cls, **kwargs: Any) -> TolariaClient:
        """The Tolaria `find_platform(**kwargs)` resolves."""
        p = find_platform(**kwargs)
        return cls(p.target, p.api_key)

    def _call(self, method: Any, request: Any) -> Any:
        return self._invoke(method, request, self.timeout_s)

    def start_run(self, config: Any, *, request_id: str | None = None) -> pb.Run:
        """Start a run of `config` (a `RunConfig` or its proto); one request id for retries."""
        msg = config if isinstance(config, pb.RunConfig) else config.to_proto()
        req = pb.StartRunRequest(request_id=request_id or str(uuid.uuid4()), config=msg)
        return self._call(self._stub.StartRun, req).run

    def get_run(self, run_id: str) -> pb.Run:
        return self._call(self._stub.GetRun, pb.GetRunRequest(run_id=run_id)).run

    def list_runs(self, *, state: int = 0, page_size: int = 100, limit: int | None = None
                  ) -> list[pb.Run]:
        """Runs in creation order, every page fetched (up to `limit`)."""
        out: list[pb.Run] = []
        token = ""
        while True:
            resp = self._call(self._stub.ListRuns, pb.ListRunsRequest(
                page_size=page_size, page_token=token, state=state))
            out.extend(resp.runs)
            token = resp.next_page_token
            if not token or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out

    def stop_run(self, run_id: str, reason: str = "") -> pb.Run:
        req = pb.StopRunRequest(request_id=str(uuid.uuid4()), run_id=run_id, reason=reason)
        return self._call(self._stub.StopRun, req).run

    def watch(self, run_id: str, from_sequence: int = 0) -> Iterator[events_pb2.EventEnvelope]:
        """The run's events from `from_sequence` on, until it ends (or the caller stops)."""
        stream = self._stub.WatchRun(pb.WatchRunRequest(run_id=run_id, from_sequence=from_sequence))
        try:
            for resp in stream:
                yield resp.event
        except grpc.RpcError as e:
            raise as_esper_error(e) from e
        finally:
            stream.cancel()

    def list_jobs(self) -> list[pb.Job]:
        out: list[pb.Job] = []
        token = ""
        while True:
            resp = self._call(self._stub.ListJobs, pb.ListJobsRequest(page_token=token))
            out.extend(resp.jobs)
            token = resp.next_page_token
            if not token:
                return out


__all__ = ["Platform", "TolariaClient", "find_platform"]
