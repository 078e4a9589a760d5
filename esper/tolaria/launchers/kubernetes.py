"""A run per Kubernetes Job: Tolaria's `kubernetes` launcher.

Each start of a run's worker is a `batch/v1` Job `esper-<run id>-<attempt>` in Tolaria's
namespace, running ``python -m esper.tolaria.worker`` with the same arguments and the same
environment (minus credentials) a local worker gets, in a pod locked down like every other
Esper pod (non-root, read-only root filesystem, no privilege escalation, all capabilities
dropped, seccomp RuntimeDefault, no service-account token) and sized by the run's
`RunConfig.resources` (a GPU request when it asks for one).

**The run's directory.** Tolaria's data volume (a ReadWriteMany PersistentVolumeClaim,
`data_claim`) is mounted in the worker pod at the same path as in Tolaria's, restricted to
the run's own directory (`subPath`): the worker appends to the run's event log and writes
its checkpoints there, and Tolaria follows the log exactly as it does for a local worker.
The event log stays the truth; the Job's status only tells whether a worker still lives.
The volume needs POSIX locks that work across nodes (NFSv4, CephFS, EFS, Azure Files NFS):
the log's appends are serialised with `flock`.

**Credentials.** The worker's run token is in a per-Job Secret `<job>-credential`
(`credential`, read into ESPER_API_KEY), owned by the Job and deleted when the run ends or
its worker is replaced. The Job is created suspended, the Secret then with the Job as its
owner, and the Job resumed: Tolaria needs to create and delete Secrets, never to read or
patch one. The pod mounts nothing else secret but the NATS password of the user "tolaria".

**Restarts.** A pod that fails is replaced by the Job (restartPolicy Never, backoffLimit =
the restarts the supervisor has left): the supervisor records each failed pod as a restart,
as it does for a local worker. A Job that failed for good, or that disappeared, is a worker
death: a new Job (next attempt) resumes from the checkpoint while restarts remain.

**Pending.** A pod that cannot be scheduled (no node has the GPU asked for) or whose image
cannot be pulled is reported in the run's record once per reason; after `pending_timeout_s`
without a running pod the Job is deleted and the run fails with the last reason.

**StopRun** deletes the Job (foreground): its pod gets SIGTERM and `terminationGracePeriod`
= the supervisor's stop_grace_s to checkpoint and record "stopped". **Tolaria restarting**
leaves Jobs alone; the next Tolaria adopts them by their `esper.dev/run-id` label.
Finished Jobs are kept `ttl_after_finished_s` for their logs (`kubectl logs job/<name>`).

Tolaria needs RBAC for jobs (create, get, list, watch, patch, delete), secrets (create and
delete only), pods (get, list) and its own Deployment (get, to own the Jobs):
deploy/k8s/components/run-jobs.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.config import from_dict
from esper.errors import ConfigError, EsperError, FailedPreconditionError, UnavailableError
from esper.tolaria.launchers import SECRET_ENV, LaunchSpec, Worker

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
RUN_LABEL = "esper.dev/run-id"
ATTEMPT_LABEL = "esper.dev/attempt"
RESTARTS_BEFORE_ANNOTATION = "esper.dev/restarts-before"
"""The run's restarts when the Job was created: failed pods beyond them are new restarts."""
CREDENTIAL_KEY = "credential"
NATS_PASSWORD_DIR = "/var/run/secrets/esper/nats"
TRUSTED_KEYS_DIR = "/etc/esper/trusted-keys"
KERNEL_CACHE_DIR = "/var/cache/esper/kernels"
_WAITING_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                              "CreateContainerConfigError", "CreateContainerError"})
DEFAULT_PASS_ENV = (
    "ESPER_ENDPOINTS", "ESPER_NATS_URL", "ESPER_NATS_USER", "ESPER_NATS_PASSWORD_FILE",
    "ESPER_NATS_STREAM_REPLICAS", "ESPER_TRUSTED_KEYS_DIR", "ESPER_LOG_LEVEL",
    "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SDK_DISABLED",
)


@dataclass(kw_only=True, frozen=True)
class KubernetesConfig:
    """Where and how run Jobs are created (`tolaria.supervisor.kubernetes`)."""

    image: str
    """The worker image (the Esper image Tolaria runs, e.g. "esper:0.1.0")."""
    namespace: str = ""
    """Namespace of the Jobs; "": Tolaria's own (its service account's namespace)."""
    image_pull_policy: str = "IfNotPresent"
    service_account: str = "tolaria-worker"
    """The worker pods' ServiceAccount (no API token is mounted)."""
    data_claim: str = "tolaria-data"
    """PersistentVolumeClaim of Tolaria's data dir (ReadWriteMany: Tolaria and the workers
    write it from different nodes)."""
    data_mount: str = "/data"
    """Where Tolaria mounts `data_claim`; run directories under it are mounted at the same
    path in the worker pod."""
    pass_env: tuple[str, ...] = DEFAULT_PASS_ENV
    """Variables of Tolaria's environment a worker pod gets with the same value (secrets are
    never among them; paths they name are mounted at the same place in the pod)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """More variables for every worker pod."""
    worker_args: tuple[str, ...] = ("--kernel-cache", KERNEL_CACHE_DIR)
    """Worker arguments the pod adds (its kernel cache is a volume of its own)."""
    nats_password_secret: str = "esper-nats-auth"
    nats_password_key: str = "tolaria"
    """The NATS user's password in that Secret, mounted where ESPER_NATS_PASSWORD_FILE says."""
    trusted_keys_config_map: str = "esper-trusted-keys"
    """Kernel-signing public keys, mounted at /etc/esper/trusted-keys."""
    cpu_millis: int = 1000
    """CPU request of a run that asks for none (RunResources.cpu_millis 0)."""
    memory_mib: int = 2048
    """Memory request and limit of a run that asks for none."""
    gpu_resource: str = "nvidia.com/gpu"
    """Extended resource a run's `resources.gpus` asks for."""
    node_selector: Mapping[str, str] = field(default_factory=dict)
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    """Added to `node_selector` for runs that ask for GPUs."""
    tolerations: tuple[Mapping[str, Any], ...] = ()
    gpu_tolerations: tuple[Mapping[str, Any], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
    """Added to `tolerations` for runs that ask for GPUs (GPU nodes are usually tainted)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """More labels on every Job, pod and Secret."""
    owner_deployment: str = "tolaria"
    """Tolaria's Deployment, made the Jobs' owner (deleting Tolaria deletes its runs' Jobs);
    "": Jobs without an owner."""
    ttl_after_finished_s: int = 86400
    """How long a finished Job (and its pod's log) is kept."""
    pending_timeout_s: float = 900.0
    """A run whose pod has not started after this long fails with the reason (0: never)."""
    api_poll_interval_s: float = 2.0
    """How often a Job's status is read."""
    run_as_user: int = 10001
    run_as_group: int = 10001
    tmp_size: str = "2Gi"
    kernel_cache_size: str = "2Gi"

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image={self.image!r} must be an image reference")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ValueError(f"image_pull_policy={self.image_pull_policy!r} must be "
                             "Always, IfNotPresent or Never")
        if not self.data_mount.startswith("/"):
            raise ValueError(f"data_mount={self.data_mount!r} must be an absolute path")
        secret = [n for n in self.pass_env if SECRET_ENV.match(n)] + [n for n in self.env if SECRET_ENV.match(n)]
        if secret:
            raise ValueError(f"pass_env/env name credentials {secret}: a worker pod gets "
                             "its run token and the NATS password file only")
        for name in ("cpu_millis", "memory_mib", "ttl_after_finished_s", "run_as_user", "run_as_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "ttl_after_finished_s" else 1):
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not 0 <= self.pending_timeout_s <= 7 * 86400:
            raise ValueError(f"pending_timeout_s={self.pending_timeout_s!r} must be in [0, 604800]")
        if not 0.1 <= self.api_poll_interval_s <= 60:
            raise ValueError(f"api_poll_interval_s={self.api_poll_interval_s!r} must be in [0.1, 60]")
        object.__setattr__(self, "pass_env", tuple(self.pass_env))
        object.__setattr__(self, "worker_args", tuple(self.worker_args))
        object.__setattr__(self, "tolerations", tuple(dict(t) for t in self.tolerations))
        object.__setattr__(self, "gpu_tolerations", tuple(dict(t) for t in self.gpu_tolerations))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KubernetesConfig:
        return from_dict(cls, data, what="tolaria supervisor kubernetes settings",
                         path="kubernetes")


def job_name(run_id: str, attempt: int) -> str:
    return f"esper-{run_id}-{attempt}"


def _labels(cfg: KubernetesConfig, run_id: str, component: str) -> dict[str, str]:
    return {**cfg.labels, "app.kubernetes.io/name": "tolaria-worker", "app.kubernetes.io/part-of": "esper",
            "app.kubernetes.io/component": component, "app.kubernetes.io/managed-by": "esper-tolaria",
            RUN_LABEL: run_id}


def _sub_path(cfg: KubernetesConfig, run_dir: Path) -> str:
    try:
        return run_dir.relative_to(cfg.data_mount).as_posix()
    except ValueError:
        raise ConfigError(
            f"run directory {run_dir} is not under kubernetes.data_mount={cfg.data_mount!r}: a "
            "worker pod can only mount run directories on Tolaria's data volume (start Tolaria "
            "with --data-dir under it)") from None


def render_job(spec: LaunchSpec, cfg: KubernetesConfig, *, namespace: str,
               environ: Mapping[str, str], stop_grace_s: float, credential_secret: str | None,
               owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The Job manifest of one worker start (a plain dict, as `kubectl apply` takes it).

    Args:
        environ: Tolaria's own environment (`cfg.pass_env` is taken from it).
        credential_secret: the Secret holding the run token (None: auth is off).
        owner: {"name", "uid"} of Tolaria's Deployment, or None.
    """
    name = job_name(spec.run_id, spec.attempt)
    r = spec.resources
    cpu = r.cpu_millis or cfg.cpu_millis
    memory = r.memory_mib or cfg.memory_mib
    requests: dict[str, Any] = {"cpu": f"{cpu}m", "memory": f"{memory}Mi"}
    limits: dict[str, Any] = {"memory": f"{memory}Mi"}
    node_selector = dict(cfg.node_selector)
    tolerations = [dict(t) for t in cfg.tolerations]
    if r.gpus:
        # Extended resources are requested through their limit (requests default to it).
        limits[cfg.gpu_resource] = r.gpus
        node_selector.update(cfg.gpu_node_selector)
        tolerations += [dict(t) for t in cfg.gpu_tolerations]
    env = [{"name": "OTEL_SERVICE_NAME", "value": "esper-tolaria-worker"}]
    env += [{"name": k, "value": environ[k]} for k in cfg.pass_env if environ.get(k)]
    env += [{"name": k, "value": str(v)} for k, v in sorted(cfg.env.items())]
    for k, v in sorted(spec.env.items()):
        if k == "ESPER_API_KEY":
            continue  # from the Secret below, never in the Job's spec
        env.append({"name": k, "value": v})
    if credential_secret is not None:
        env.append({"name": "ESPER_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": credential_secret, "key": CREDENTIAL_KEY}}})
    pod_labels = {**_labels(cfg, spec.run_id, "run-worker"), ATTEMPT_LABEL: str(spec.attempt)}
    container = {
        "name": "worker",
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["python", "-m", spec.module],
        "args": [*spec.argv, *cfg.worker_args],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "run", "mountPath": str(spec.run_dir), "subPath": _sub_path(cfg, spec.run_dir)},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "kernel-cache", "mountPath": KERNEL_CACHE_DIR},
            {"name": "trusted-keys", "mountPath": TRUSTED_KEYS_DIR, "readOnly": True},
            {"name": "nats-password", "mountPath": NATS_PASSWORD_DIR, "readOnly": True},
        ],
    }
    pod: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        # SIGTERM → checkpoint at the next step boundary → "stopped"; the same grace as locally.
        "terminationGracePeriodSeconds": max(1, int(stop_grace_s)),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": cfg.run_as_user,
            "runAsGroup": cfg.run_as_group,
            "fsGroup": cfg.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "run", "persistentVolumeClaim": {"claimName": cfg.data_claim}},
            {"name": "tmp", "emptyDir": {"sizeLimit": cfg.tmp_size}},
            {"name": "kernel-cache", "emptyDir": {"sizeLimit": cfg.kernel_cache_size}},
            {"name": "trusted-keys", "configMap": {"name": cfg.trusted_keys_config_map}},
            {"name": "nats-password", "secret": {
                "secretName": cfg.nats_password_secret, "defaultMode": 0o440,
                "items": [{"key": cfg.nats_password_key, "path": "password"}]}},
        ],
    }
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {**_labels(cfg, spec.run_id, "run-worker"), ATTEMPT_LABEL: str(spec.attempt)},
        # The supervisor starts attempt n after n - 1 restarts (see LaunchSpec.attempt).
        "annotations": {RESTARTS_BEFORE_ANNOTATION: str(spec.attempt - 1),
                        "esper.dev/run-dir": str(spec.run_dir)},
    }
    if owner is not None:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": owner["name"], "uid": owner["uid"]}]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            # Resumed once its credential Secret exists (see KubernetesLauncher.launch).
            "suspend": credential_secret is not None,
            # Each failed pod is one of the run's restarts; the Job makes the next pod.
            "backoffLimit": spec.restarts_left,
            "ttlSecondsAfterFinished": cfg.ttl_after_finished_s,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }


def render_secret(run_id: str, name: str, token: str, cfg: KubernetesConfig, *,
                  namespace: str) -> dict[str, Any]:
    """The Secret holding one worker start's run token."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": _labels(cfg, run_id, "run-credential")},
        "type": "Opaque",
        "immutable": True,
        "data": {CREDENTIAL_KEY: base64.b64encode(token.encode()).decode()},
    }


def _plain(obj: Any) -> Any:
    """An API response as the plain camelCase dict its manifest would be."""
    if obj is None or isinstance(obj, dict | list | str | int | float | bool):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _status(e: Exception) -> int | None:
    return getattr(e, "status", None)


def _api_error(e: Exception, what: str) -> EsperError:
    status = _status(e)
    reason = getattr(e, "reason", "") or type(e).__name__
    body = str(getattr(e, "body", "") or "")[:300]
    if status is None or status >= 500 or status == 429:
        return UnavailableError(f"the Kubernetes API did not answer to {what}: {reason} {body}".strip())
    return FailedPreconditionError(
        f"the Kubernetes API refused to {what}: {status} {reason} {body}".strip(),
        metadata={"status": str(status)})


class KubernetesLauncher:
    """Starts each worker as a Job; talks to the API through `batch`/`core`/`apps`
    (`kubernetes.client.BatchV1Api`, `CoreV1Api`, `AppsV1Api`; built from the in-cluster
    or kubeconfig credentials when not given)."""

    kind = "kubernetes"
    places_gpus = True
    survives_service_restart = True

    def __init__(self, config: KubernetesConfig, *, stop_grace_s: float, batch: Any = None,
                 core: Any = None, apps: Any = None, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.stop_grace_s = stop_grace_s
        self._apis = (batch, core, apps) if batch is not None else None
        self.environ = dict(os.environ if environ is None else environ)
        self.clock = clock
        self.namespace = config.namespace or self._own_namespace()
        self._owner: dict[str, str] | None = None
        self._secrets: dict[str, set[str]] = {}
        """Run id → credential Secrets this process created or adopted (deleted by name:
        Tolaria may not list or read the namespace's Secrets)."""

    @staticmethod
    def _own_namespace() -> str:
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            raise ConfigError("tolaria.supervisor.kubernetes.namespace is not set and Tolaria does not "
                              f"run in a pod ({SERVICE_ACCOUNT_NAMESPACE} is missing): name the "
                              "namespace for the run Jobs") from None

    def apis(self) -> tuple[Any, Any, Any]:
        if self._apis is None:
            from kubernetes import client
            from kubernetes import config as kube_config

            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            self._apis = (client.BatchV1Api(), client.CoreV1Api(), client.AppsV1Api())
        return self._apis

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except EsperError:
            raise
        except Exception as e:
            raise _api_error(e, what) from e

    # ---- the launcher interface ----------------------------------------------------------
    def start(self) -> None:
        """Nothing runs beside the Jobs."""

    async def wait_ready(self) -> None:
        return None

    def close(self) -> None:
        """Jobs go on without Tolaria; the next one adopts them."""

    async def _owner_ref(self) -> dict[str, str] | None:
        if not self.config.owner_deployment:
            return None
        if self._owner is None:
            _, _, apps = self.apis()
            dep = _plain(await self._call(
                f"read Deployment {self.namespace}/{self.config.owner_deployment} (the Jobs' owner)",
                apps.read_namespaced_deployment, self.config.owner_deployment, self.namespace))
            self._owner = {"name": dep["metadata"]["name"], "uid": dep["metadata"]["uid"]}
        return self._owner

    async def launch(self, spec: LaunchSpec) -> JobWorker:
        """Create the start's Job (suspended), its credential Secret owned by it, then resume
        it; a Job of the same name left by an earlier Tolaria (it died between creating and
        recording it) is taken over.

        Raises:
            FailedPreconditionError: the API refused (RBAC, quota, an invalid setting).
            UnavailableError: the API did not answer.
        """
        batch, core, _ = self.apis()
        name = job_name(spec.run_id, spec.attempt)
        owner = await self._owner_ref()
        token = spec.env.get("ESPER_API_KEY")
        secret = f"{name}-credential" if token else None
        if spec.attempt > 1:
            # The worker before this one is dead: so is its token (its Job may linger, failed).
            await self.cleanup(spec.run_id)
        manifest = render_job(spec, self.config, namespace=self.namespace, environ=self.environ,
                              stop_grace_s=self.stop_grace_s, credential_secret=secret, owner=owner)
        try:
            job = _plain(await self._call(f"create Job {self.namespace}/{name}",
                                          batch.create_namespaced_job, self.namespace, manifest))
        except FailedPreconditionError as e:
            if e.metadata.get("status") != "409":
                raise
            job = _plain(await self._call(f"read Job {self.namespace}/{name}",
                                          batch.read_namespaced_job, name, self.namespace))
        if secret is not None:
            assert token is not None
            body = render_secret(spec.run_id, secret, token, self.config, namespace=self.namespace)
            # Owned by its Job: deleting the Job (by hand, or its TTL) deletes the token too.
            body["metadata"]["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                    "uid": job["metadata"]["uid"]}]
            self._secrets.setdefault(spec.run_id, set()).add(secret)
            try:
                await self._call(f"create Secret {self.namespace}/{secret}",
                                 core.create_namespaced_secret, self.namespace, body)
            except FailedPreconditionError as e:
                if e.metadata.get("status") != "409":
                    raise
                # Immutable: a token left under this name by an earlier Tolaria is replaced.
                await self._call(f"delete Secret {self.namespace}/{secret}",
                                 core.delete_namespaced_secret, secret, self.namespace)
                await self._call(f"create Secret {self.namespace}/{secret}",
                                 core.create_namespaced_secret, self.namespace, body)
            await self._call(f"resume Job {self.namespace}/{name}", batch.patch_namespaced_job,
                             name, self.namespace, {"spec": {"suspend": False}})
        log.info("run %s: created Job %s/%s", spec.run_id, self.namespace, name)
        return JobWorker(self, name, seen_failed=0)

    async def adopt(self, run_id: str, *, restarts: int) -> JobWorker | None:
        """The run's newest Job that is not being deleted, if any (after a Tolaria restart).
        `restarts` is the run's recorded count: failed pods of the Job it already covers are
        not reported again."""
        batch, _, _ = self.apis()
        found = _plain(await self._call(
            f"list Jobs of run {run_id}", batch.list_namespaced_job, self.namespace,
            label_selector=f"{RUN_LABEL}={run_id}"))
        jobs = [j for j in found.get("items", []) if not j["metadata"].get("deletionTimestamp")]
        if not jobs:
            return None
        job = max(jobs, key=lambda j: int(j["metadata"].get("labels", {}).get(ATTEMPT_LABEL, "0")))
        before = int((job["metadata"].get("annotations") or {}).get(RESTARTS_BEFORE_ANNOTATION, "0"))
        name = job["metadata"]["name"]
        self._secrets.setdefault(run_id, set()).add(f"{name}-credential")
        return JobWorker(self, name, seen_failed=max(restarts - before, 0))

    async def cleanup(self, run_id: str) -> None:
        """Delete the run's credential Secrets: its tokens die with the run (or its worker).
        Secrets of Jobs an earlier Tolaria replaced go with those Jobs (owner references)."""
        _, core, _ = self.apis()
        for name in sorted(self._secrets.pop(run_id, set())):
            try:
                await self._call(f"delete Secret {self.namespace}/{name}", core.delete_namespaced_secret,
                                 name, self.namespace)
            except FailedPreconditionError as e:
                if e.metadata.get("status") != "404":
                    log.warning("run %s: could not delete its credential Secret %s: %s", run_id, name, e)
            except UnavailableError as e:
                # The token expires on its own; the Secret goes with its Job (owner reference).
                log.warning("run %s: could not delete its credential Secret %s: %s", run_id, name, e)


class JobWorker(Worker):
    """One Job of a run, as the supervisor watches it."""

    survives_service_restart = True

    def __init__(self, launcher: KubernetesLauncher, name: str, *, seen_failed: int) -> None:
        self.launcher = launcher
        self.job = name
        self.name = f"job {launcher.namespace}/{name}"
        self.how = "created"
        self._seen_failed = seen_failed
        """Failed pods of this Job already recorded as restarts (by an earlier Tolaria too)."""
        self._primed = False
        self._described: set[str] = set()
        self._restarts: list[str] = []
        self._notices: list[tuple[str, str]] = []
        self._reported: set[tuple[str, str]] = set()
        self._gone: str | None = None
        self._started = False
        self._created = launcher.clock()
        self._last_refresh = -1e9
        self._last_pending = ""
        self._deleting = False

    # ---- watching ------------------------------------------------------------------------
    async def refresh(self) -> None:
        now = self.launcher.clock()
        if self._gone is not None or now - self._last_refresh < self.launcher.config.api_poll_interval_s:
            return
        self._last_refresh = now
        batch, _, _ = self.launcher.apis()
        try:
            job = _plain(await self.launcher._call(
                f"read Job {self.launcher.namespace}/{self.job}", batch.read_namespaced_job,
                self.job, self.launcher.namespace))
        except FailedPreconditionError as e:
            if e.metadata.get("status") == "404":
                self._gone = f"its Job {self.job} gone ({'deleted on StopRun' if self._deleting else 'deleted'})"
                return
            log.warning("%s: %s", self.name, e)
            return
        except UnavailableError as e:
            # The API server restarting is no reason to think the worker died.
            log.warning("%s: %s", self.name, e)
            return
        status = job.get("status") or {}
        failed = int(status.get("failed") or 0)
        conditions = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
        finished = "Complete" in conditions or "Failed" in conditions
        if failed > self._seen_failed or not self._started:
            await self._look_at_pods(failed, finished)
        if "Complete" in conditions:
            self._gone = "status 0 (its Job completed)"
        elif "Failed" in conditions:
            c = conditions["Failed"]
            last = self._last_failure or "no pod failure seen"
            self._gone = f"its Job failed ({c.get('reason', '')}: {c.get('message', '')}; last pod: {last})"
        elif not self._started and self.launcher.config.pending_timeout_s and \
                now - self._created > self.launcher.config.pending_timeout_s:
            self.fatal = True
            self._gone = (f"no pod of its Job started within {self.launcher.config.pending_timeout_s:g} s "
                          f"({self._last_pending or 'no reason given by Kubernetes'})")
            await self.kill()

    _last_failure = ""

    async def _look_at_pods(self, failed: int, finished: bool) -> None:
        _, core, _ = self.launcher.apis()
        try:
            pods = _plain(await self.launcher._call(
                f"list the pods of Job {self.job}", core.list_namespaced_pod, self.launcher.namespace,
                label_selector=f"job-name={self.job}")).get("items", [])
        except EsperError as e:
            log.warning("%s: %s", self.name, e)
            return
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        if not self._primed:
            # Adopted: the oldest failures are the restarts already recorded.
            self._described.update(p["metadata"]["name"] for p in failed_pods[:self._seen_failed])
            self._primed = True
        new_failures = []
        for pod in pods:
            st = pod.get("status") or {}
            pname = pod["metadata"]["name"]
            phase = st.get("phase")
            if phase in ("Running", "Succeeded", "Failed"):
                self._started = True
            if phase == "Failed" and pname not in self._described:
                self._described.add(pname)
                new_failures.append(f"pod {pname} failed: {_pod_failure(st)}")
            if phase == "Pending":
                reason = _pending_reason(st)
                if reason is not None:
                    self._last_pending = reason[1]
                    if reason not in self._reported:
                        self._reported.add(reason)
                        self._notices.append(reason)
        # The Job's own count is the truth (a pod may already be gone); descriptions are best effort.
        count = max(failed - self._seen_failed, 0)
        while len(new_failures) < count:
            new_failures.append(f"a pod of Job {self.job} failed")
        new_failures = new_failures[len(new_failures) - count:] if count else []
        if new_failures:
            self._last_failure = new_failures[-1]
        if finished and new_failures:
            # The failure that ended the Job is the worker's death, not a restart.
            new_failures = new_failures[:-1]
        self._seen_failed = max(self._seen_failed, failed)
        self._restarts.extend(new_failures)

    def exit_status(self) -> tuple[bool, str]:
        return (self._gone is not None), self._gone or ""

    def take_restarts(self) -> list[str]:
        out, self._restarts = self._restarts, []
        return out

    def take_notices(self) -> list[tuple[str, str]]:
        out, self._notices = self._notices, []
        return out

    # ---- stopping ------------------------------------------------------------------------
    async def _delete(self, grace_s: int | None) -> None:
        batch, _, _ = self.launcher.apis()
        kwargs: dict[str, Any] = {"propagation_policy": "Foreground"}
        if grace_s is not None:
            kwargs["grace_period_seconds"] = grace_s
        try:
            await self.launcher._call(f"delete Job {self.launcher.namespace}/{self.job}",
                                      batch.delete_namespaced_job, self.job, self.launcher.namespace,
                                      **kwargs)
        except FailedPreconditionError as e:
            if e.metadata.get("status") != "404":
                raise
        self._deleting = True

    async def terminate(self) -> None:
        """Delete the Job: its pod gets SIGTERM and the grace period to checkpoint."""
        await self._delete(None)

    async def kill(self) -> None:
        await self._delete(0)

    async def reap(self, grace_s: float) -> None:
        """The run ended (its log says so): wait for the pod to exit, delete it if it lingers."""
        deadline = self.launcher.clock() + grace_s
        while self._gone is None and self.launcher.clock() < deadline:
            self._last_refresh = -1e9
            await self.refresh()
            if self._gone is None:
                await asyncio.sleep(min(self.launcher.config.api_poll_interval_s, grace_s))
        if self._gone is None:
            log.warning("%s still running after its run ended; deleting it", self.name)
            await self.kill()


def _pod_failure(st: Mapping[str, Any]) -> str:
    """Why a failed pod failed, from its status: OOMKilled, exit codes, eviction."""
    for cs in st.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if term:
            return f"{term.get('reason') or 'Error'} (exit {term.get('exitCode')})"
    return st.get("reason") or st.get("message") or "unknown reason"


def _pending_reason(st: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, detail) of why a pending pod does not start, when Kubernetes says."""
    for c in st.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return "unschedulable", f"{c.get('reason', 'Unschedulable')}: {c.get('message', '')}".strip()
    for cs in st.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _WAITING_REASONS:
            return "image" if "Image" in waiting["reason"] else "container", \
                f"{waiting['reason']}: {waiting.get('message', '')}".strip()
    return None
