"""Tolaria's kubernetes launcher (issue 10 point 2): a run per Job. The Job objects are
rendered and validated offline (kubernetes-validate --strict, Kubernetes 1.33); the
launcher's decisions — create, watch, restart, give up, cancel on StopRun, adopt after a
Tolaria restart, fail a pod nobody can schedule — run against a fake of the API methods it
calls (tests/unit/tolaria_service/fake_kube.py). The test plays the worker by appending to
the run's event log, as the worker pod would on the shared volume."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.runtime.auth import RunTokenSigner
from esper.tolaria.config import RunResources
from esper.tolaria.launchers import LaunchSpec
from esper.tolaria.launchers.kubernetes import (
    KubernetesConfig,
    KubernetesLauncher,
    render_job,
    render_secret,
)
from esper.tolaria.runs import EventLog, RunStore, new_envelope
from esper.tolaria.supervisor import RunSupervisor, SupervisorConfig
from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

from .fake_kube import FakeKube

VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
ADMIN = "admin-key-of-the-platform-0123456789"
TOLARIA_ENV = {
    "ESPER_NATS_URL": "nats://nats-0.nats-headless:4222,nats://nats-1.nats-headless:4222",
    "ESPER_NATS_USER": "tolaria", "ESPER_NATS_PASSWORD_FILE": "/var/run/secrets/esper/nats/password",
    "ESPER_TRUSTED_KEYS_DIR": "/etc/esper/trusted-keys", "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317",
    # Tolaria's own secrets: none may reach a worker pod.
    "ESPER_API_KEY": ADMIN, "ESPER_API_KEYS_FILE": "/var/run/secrets/esper/api-keys/api-keys",
    "ESPER_RUN_TOKEN_KEY_FILE": "/var/run/secrets/esper/run-token/run-token.pem",
}
K8S = KubernetesConfig(image="esper:0.1.0", namespace="esper", api_poll_interval_s=0.1,
                       pending_timeout_s=600)


def _spec(tmp_path: Path, *, gpus: int = 0, token: str | None = "esper-rt1.x.y") -> LaunchSpec:
    run_dir = Path("/data/tolaria/runs/run-0123456789ab")
    env = {"TRACEPARENT": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    if token:
        env["ESPER_API_KEY"] = token
    return LaunchSpec(run_id="run-0123456789ab", run_dir=run_dir, module="esper.tolaria.worker",
                      argv=("--run-dir", str(run_dir), "--endpoints", '{"tamiyo": "tamiyo:50051"}',
                            "--nats-url", TOLARIA_ENV["ESPER_NATS_URL"]),
                      env=env, resources=RunResources(gpus=gpus, memory_mib=4096), attempt=2,
                      restarts_left=2)


def _validate(objs: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text("\n---\n".join(json.dumps(o) for o in objs))
    proc = subprocess.run([str(VALIDATE), "--strict", "-k", "1.33.0", "--quiet", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("gpus", [0, 2])
def test_the_job_and_its_credential_validate_strictly_and_are_locked_down(tmp_path, gpus) -> None:
    spec = _spec(tmp_path, gpus=gpus)
    job = render_job(spec, K8S, namespace="esper", environ=TOLARIA_ENV, stop_grace_s=30,
                     credential_secret="esper-run-0123456789ab-2-credential",
                     owner={"name": "tolaria", "uid": "3b1a0c6e-2a4f-4b1e-9d0c-7f5e3a2b1c0d"})
    secret = render_secret(spec.run_id, "esper-run-0123456789ab-2-credential", "esper-rt1.x.y", K8S,
                           namespace="esper")
    _validate([job, secret], tmp_path)
    assert job["metadata"]["name"] == "esper-run-0123456789ab-2"
    assert job["metadata"]["labels"]["esper.dev/run-id"] == spec.run_id
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["terminationGracePeriodSeconds"] == 30
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["command"] == ["python", "-m", "esper.tolaria.worker"]
    assert c["args"][:6] == list(spec.argv)[:6]  # the same arguments a local worker gets
    assert c["resources"]["requests"] == {"cpu": "1000m", "memory": "4096Mi"}
    if gpus:
        assert c["resources"]["limits"] == {"memory": "4096Mi", "nvidia.com/gpu": 2}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    else:
        assert c["resources"]["limits"] == {"memory": "4096Mi"} and "tolerations" not in pod
    env = {e["name"]: e for e in c["env"]}
    # The run token from its own Secret, never in the Job; none of Tolaria's keys at all.
    assert env["ESPER_API_KEY"] == {"name": "ESPER_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "esper-run-0123456789ab-2-credential", "key": "credential"}}}
    assert "esper-rt1.x.y" not in json.dumps(job) and ADMIN not in json.dumps(job)
    assert not {"ESPER_API_KEYS_FILE", "ESPER_RUN_TOKEN_KEY_FILE"} & set(env)
    for name in ("ESPER_NATS_URL", "ESPER_NATS_PASSWORD_FILE", "ESPER_TRUSTED_KEYS_DIR", "OTEL_TRACES_EXPORTER"):
        assert env[name]["value"] == TOLARIA_ENV[name], name
    assert env["TRACEPARENT"]["value"] == spec.env["TRACEPARENT"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[str(spec.run_dir)]["subPath"] == "tolaria/runs/run-0123456789ab"  # only its own run
    assert mounts["/var/run/secrets/esper/nats"]["readOnly"] and mounts["/etc/esper/trusted-keys"]["readOnly"]
    assert base64.b64decode(secret["data"]["credential"]) == b"esper-rt1.x.y" and secret["immutable"]


def test_kubernetes_settings_refuse_credentials_and_bad_values() -> None:
    from esper.errors import ConfigError

    with pytest.raises(ValueError, match="ESPER_API_KEYS_FILE"):
        KubernetesConfig(image="esper:0.1.0", pass_env=("ESPER_API_KEYS_FILE",))
    with pytest.raises(ConfigError, match="kubernetes: image_pull_policy='Sometimes'"):
        SupervisorConfig.from_dict({"launcher": "kubernetes",
                                    "kubernetes": {"image": "e:1", "image_pull_policy": "Sometimes"}})
    with pytest.raises(ConfigError, match="unknown"):
        SupervisorConfig.from_dict({"launcher": "kubernetes", "kubernetes": {"image": "e:1", "imag": "x"}})
    with pytest.raises(ValueError, match="needs its settings"):
        SupervisorConfig(launcher="kubernetes")
    cfg = SupervisorConfig.from_dict({"launcher": "kubernetes", "kubernetes": {"image": "esper:0.1.0"}})
    assert cfg.kubernetes is not None and cfg.kubernetes.data_claim == "tolaria-data"


class Harness:
    """A supervisor with the kubernetes launcher over `FakeKube`, plus the worker's part."""

    def __init__(self, tmp_path: Path, kube: FakeKube, *, max_restarts: int = 3, skew: list[float] | None = None,
                 auth: bool = True) -> None:
        self.kube = kube
        self.skew = skew if skew is not None else [0.0]
        self.signer = RunTokenSigner.generate()
        k8s = dataclasses.replace(K8S, data_mount=str(tmp_path / "data"))
        self.launcher = KubernetesLauncher(k8s, stop_grace_s=30, batch=kube, core=kube, apps=kube,
                                           environ=TOLARIA_ENV, clock=lambda: time.monotonic() + self.skew[0])
        self.store = RunStore(tmp_path / "data" / "tolaria")
        self.sup = RunSupervisor(
            self.store, endpoints={"tamiyo": "127.0.0.1:1", "urza": "127.0.0.1:1"}, nats_url=None,
            api_key=ADMIN if auth else None, validate=lambda cfg: None,
            signer=self.signer if auth else None, launcher=self.launcher,
            config=SupervisorConfig(launcher="kubernetes", max_restarts=max_restarts, poll_interval_s=0.02,
                                    kubernetes=k8s, stop_grace_s=2))

    async def start(self, epochs: int = 3, **kw) -> str:
        cfg = pb.RunConfig(task="mnist1d", host="cnn", controller="heuristic", epochs=epochs, batch_size=8, **kw)
        return (await self.sup.start_run(cfg, request_id=None, traceparent=None)).run_id

    def worker_says(self, run_id: str, state: str | None = None, epoch: int | None = None) -> None:
        log = EventLog(self.store.run_dir(run_id) / "events.log")
        env = new_envelope(run_id, source="tolaria")
        if state is not None:
            env.run_state.state = state
        else:
            env.epoch_metrics.epoch = epoch or 1
        log.append(env, sync=True)
        log.close()

    async def until(self, what, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = what()
            if got:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")

    def events(self, run_id: str) -> list:
        return list(self.store.event_log(run_id).replay())


async def test_a_run_is_a_job_watched_until_it_completes_and_its_credential_dies_with_it(tmp_path):
    h = Harness(tmp_path, FakeKube())
    run_id = await h.start()
    job = h.kube.job(1)
    name = job["metadata"]["name"]
    assert name == f"esper-{run_id}-1" and job["spec"]["backoffLimit"] == 3
    assert job["metadata"]["ownerReferences"][0]["uid"] == h.kube.deployment["metadata"]["uid"]
    (secret,) = h.kube.secrets.values()
    assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                     "uid": job["metadata"]["uid"]}]
    # Created suspended, resumed once its credential existed.
    calls = [c for c in h.kube.calls if "job" in c or "secret" in c]
    assert calls[:3] == [f"create job {name}", f"create secret {name}-credential",
                         f"patch job {name} {{'spec': {{'suspend': False}}}}"]
    assert job["spec"]["suspend"] is False
    grant = h.signer.verifier().verify(base64.b64decode(secret["data"]["credential"]).decode())
    assert grant.run_id == run_id and grant.scopes == {"tamiyo:read", "urza:read", "urza:write"}
    rec = h.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_PENDING and rec.worker == f"job esper/{name}"
    assert rec.to_proto().worker == f"job esper/{name}"
    h.kube.run_pod(name)
    h.worker_says(run_id, "running")
    for e in (1, 2, 3):
        h.worker_says(run_id, epoch=e)
    h.worker_says(run_id, "succeeded")
    h.kube.complete(name)
    await h.until(lambda: run_id not in h.sup._live)
    rec = h.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_SUCCEEDED and rec.epoch == 3 and rec.restarts == 0
    assert h.kube.secrets == {}  # the run's token is deleted with the run
    assert name in h.kube.jobs  # the finished Job stays for its logs (its TTL removes it)
    await h.sup.close()


async def test_pod_failures_are_restarts_and_a_job_that_fails_for_good_gives_up(tmp_path):
    h = Harness(tmp_path, FakeKube(), max_restarts=2)
    run_id = await h.start()
    name = h.kube.job(1)["metadata"]["name"]
    assert h.kube.job(1)["spec"]["backoffLimit"] == 2
    h.kube.run_pod(name)
    h.worker_says(run_id, "running")
    h.kube.fail_pod(name, "OOMKilled", 137)
    await h.until(lambda: h.sup.get_run(run_id).restarts == 1)
    h.worker_says(run_id, "running")
    h.kube.fail_pod(name, "Error", 1)
    await h.until(lambda: h.sup.get_run(run_id).restarts == 2)
    h.kube.fail_pod(name, "OOMKilled", 137)
    await h.until(lambda: h.sup.get_run(run_id).ended)
    rec = h.sup.get_run(run_id)
    told = [e.degradation.detail for e in h.events(run_id) if e.HasField("degradation")]
    assert len(told) == 2 and "OOMKilled (exit 137)" in told[0] and "Error (exit 1)" in told[1]
    assert "restart 1/2" in told[0] and "started a new pod" in told[0]
    assert rec.state == pb.RUN_STATE_FAILED and "gave up after 2 restarts" in rec.detail
    assert "BackoffLimitExceeded" in rec.detail and rec.degradations == {"worker": 2}
    assert len(h.kube.jobs) == 1  # no new Job: the restarts were the Job's own pods
    await h.sup.close()


async def test_a_job_that_disappears_is_a_worker_death_answered_with_a_new_job(tmp_path):
    h = Harness(tmp_path, FakeKube(), max_restarts=3)
    run_id = await h.start()
    first = h.kube.job(1)["metadata"]["name"]
    h.kube.run_pod(first)
    h.worker_says(run_id, "running")
    h.kube.finish_deletion(first)  # someone deleted it (kubectl delete job, a namespace cleanup)
    second = await h.until(lambda: [j for j in h.kube.jobs if j.endswith("-2")])
    job = h.kube.jobs[second[0]]
    assert job["spec"]["backoffLimit"] == 2  # one restart used
    assert job["metadata"]["annotations"]["esper.dev/restarts-before"] == "1"
    assert len(h.kube.secrets) == 1 and next(iter(h.kube.secrets)).startswith(second[0])  # a fresh token
    rec = h.sup.get_run(run_id)
    assert rec.restarts == 1 and rec.worker == f"job esper/{second[0]}"
    h.kube.run_pod(second[0])
    h.worker_says(run_id, "running")
    h.worker_says(run_id, "succeeded")
    h.kube.complete(second[0])
    await h.until(lambda: h.sup.get_run(run_id).state == pb.RUN_STATE_SUCCEEDED)
    await h.sup.close()


async def test_stop_run_deletes_the_job_and_the_run_stops(tmp_path):
    h = Harness(tmp_path, FakeKube())
    run_id = await h.start(epochs=100)
    name = h.kube.job(1)["metadata"]["name"]
    h.kube.run_pod(name)
    h.worker_says(run_id, "running")
    await h.sup.stop_run(run_id, "enough", request_id="7e9a1c3e-5b7d-4f9a-8c1e-3a5c7e9b1d3f")
    assert h.kube.deleted_jobs == [(name, {"propagation_policy": "Foreground"})]
    # The pod got SIGTERM: the worker checkpoints and records it, then the Job is gone.
    h.worker_says(run_id, "stopped")
    h.kube.finish_deletion(name)
    await h.until(lambda: run_id not in h.sup._live)
    rec = h.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_STOPPED and rec.stop_reason == "enough" and h.kube.secrets == {}
    # A worker killed before it could say so: the supervisor records the stop itself.
    other = await h.start(epochs=100)
    name = f"esper-{other}-1"
    h.kube.run_pod(name)
    await h.sup.stop_run(other, "now")
    h.kube.finish_deletion(name)
    await h.until(lambda: h.sup.get_run(other).ended)
    rec = h.sup.get_run(other)
    assert rec.state == pb.RUN_STATE_STOPPED and "stop was requested" in rec.detail
    await h.sup.close()


async def test_a_restarted_tolaria_adopts_its_jobs_and_counts_only_new_failures(tmp_path):
    kube = FakeKube()
    a = Harness(tmp_path, kube)
    run_id = await a.start()
    name = kube.job(1)["metadata"]["name"]
    kube.run_pod(name)
    a.worker_says(run_id, "running")
    kube.fail_pod(name)
    await a.until(lambda: a.sup.get_run(run_id).restarts == 1)
    await a.sup.close()  # Tolaria's pod is replaced: Jobs go on, nothing is deleted
    assert name in kube.jobs and kube.deleted_jobs == [] and len(kube.secrets) == 1
    kube.fail_pod(name)  # while no Tolaria watched
    b = Harness(tmp_path, kube)
    await b.sup.resume_active()
    await b.until(lambda: b.sup.get_run(run_id).restarts == 2)
    assert list(kube.jobs) == [name]  # adopted, not started again
    b.worker_says(run_id, "succeeded")
    kube.complete(name)
    await b.until(lambda: run_id not in b.sup._live)
    rec = b.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_SUCCEEDED and rec.restarts == 2 and kube.secrets == {}
    told = [e.degradation.detail for e in b.events(run_id) if e.HasField("degradation")]
    assert len(told) == 2  # the failure the first Tolaria saw is not reported twice
    await b.sup.close()


async def test_a_pod_no_node_can_run_is_reported_then_fails_the_run(tmp_path):
    skew = [0.0]
    h = Harness(tmp_path, FakeKube(), skew=skew)
    run_id = await h.start(resources=pb.RunResources(gpus=1))
    name = h.kube.job(1)["metadata"]["name"]
    container = h.kube.jobs[name]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    h.kube.pending(name, {"conditions": [{"type": "PodScheduled", "status": "False",
                                          "reason": "Unschedulable", "message": why}]})
    await h.until(lambda: h.sup.get_run(run_id).degradations.get("kubernetes"))
    await asyncio.sleep(0.5)
    rec = h.sup.get_run(run_id)
    assert rec.degradations == {"kubernetes": 1} and "kubernetes" in rec.degraded  # once per reason
    skew[0] = K8S.pending_timeout_s + 1
    await h.until(lambda: h.sup.get_run(run_id).ended)
    rec = h.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_FAILED and why in rec.detail and rec.restarts == 0
    assert h.kube.deleted_jobs and h.kube.deleted_jobs[0][1] == {"propagation_policy": "Foreground",
                                                                  "grace_period_seconds": 0}
    await h.sup.close()


async def test_an_api_refusal_fails_the_run_with_its_reason(tmp_path):
    from kubernetes.client.exceptions import ApiException

    kube = FakeKube()
    kube.refuse_create = ApiException(status=403, reason="Forbidden")
    kube.refuse_create.body = 'jobs.batch is forbidden: exceeded quota: runs'
    h = Harness(tmp_path, kube)
    run_id = await h.start()
    rec = h.sup.get_run(run_id)
    assert rec.state == pb.RUN_STATE_FAILED and "could not start a worker" in rec.detail
    assert "403 Forbidden" in rec.detail and "exceeded quota" in rec.detail
    assert kube.secrets == {} and run_id not in h.sup._live
    await h.sup.close()


async def test_without_auth_a_job_gets_no_credential(tmp_path):
    h = Harness(tmp_path, FakeKube(), auth=False)
    run_id = await h.start()
    job = h.kube.job(1)
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "ESPER_API_KEY" not in env and h.kube.secrets == {}
    h.worker_says(run_id, "succeeded")
    h.kube.complete(job["metadata"]["name"])
    await h.until(lambda: run_id not in h.sup._live)
    await h.sup.close()
