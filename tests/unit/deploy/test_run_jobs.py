"""deploy/k8s with a run per Kubernetes Job (components/run-jobs, overlays/prod-jobs): the
overlay validates strictly; Tolaria alone holds an API token, with a Role limited to what
its kubernetes launcher calls; the Job it renders from the deployed settings validates,
is locked down like every other pod, mounts only its own run directory and gets the same
environment as Tolaria minus every credential; the network admits exactly what a worker
pod needs. None of this ran on a real cluster (see deploy/k8s/README.md)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("deploy_manifests", Path(__file__).with_name("test_manifests.py"))
assert _spec is not None and _spec.loader is not None
m = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(m)

OVERLAY = "prod-jobs"
pytestmark = pytest.mark.skipif(m.KUBECTL is None, reason="kubectl (kustomize) is not installed")


def _tolaria_environ() -> dict[str, str]:
    """Tolaria's container environment as the rendered manifests give it (no secrets resolved)."""
    env = {k: str(v) for k, v in m.get(OVERLAY, "ConfigMap", "esper-config")["data"].items()}
    for var in m.container(m.get(OVERLAY, "Deployment", "tolaria")).get("env", []):
        env[var["name"]] = var.get("value", "<from a secret>")
    return env


def _supervisor_config():  # type: ignore[no-untyped-def]
    from esper.runtime.config import PlatformConfig
    from esper.tolaria.supervisor import SupervisorConfig

    settings = PlatformConfig.load(None, env=_tolaria_environ()).settings["tolaria"]
    return SupervisorConfig.from_dict(dict(settings["supervisor"]))


def _job() -> dict[str, Any]:
    from esper.tolaria.config import RunResources
    from esper.tolaria.launchers import LaunchSpec
    from esper.tolaria.launchers.kubernetes import render_job

    cfg = _supervisor_config()
    run_dir = Path("/data/tolaria/runs/run-0123456789ab")
    spec = LaunchSpec(run_id="run-0123456789ab", run_dir=run_dir, module=cfg.worker_module,
                      argv=("--run-dir", str(run_dir), "--endpoints", "{}"), env={"ESPER_API_KEY": "t"},
                      resources=RunResources(gpus=1), restarts_left=cfg.max_restarts)
    return render_job(spec, cfg.kubernetes, namespace="esper", environ=_tolaria_environ(),
                      stop_grace_s=cfg.stop_grace_s, credential_secret="esper-run-0123456789ab-1-credential",
                      owner={"name": "tolaria", "uid": "3b1a0c6e-2a4f-4b1e-9d0c-7f5e3a2b1c0d"})


def test_the_overlay_and_a_run_job_validate_strictly(tmp_path: Path) -> None:
    for text in (m.rendered(OVERLAY), json.dumps(_job())):
        proc = subprocess.run([str(m.VALIDATE), "--strict", "-k", "1.33.0", "--quiet", "-"],
                              input=text, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tolaria_alone_holds_an_api_token_with_a_role_limited_to_its_launcher() -> None:
    tolaria = m.get(OVERLAY, "Deployment", "tolaria")
    assert tolaria["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    for w in m.workloads(OVERLAY):
        if w["metadata"]["name"] != "tolaria":
            assert w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, w["metadata"]["name"]
    role = m.get(OVERLAY, "Role", "tolaria-run-jobs")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): (set(r["verbs"]), r.get("resourceNames"))
             for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): ({"create", "get", "list", "watch", "patch", "delete"}, None),
        (("",), ("secrets",)): ({"create", "delete"}, None),  # never get, list or patch a Secret
        (("",), ("pods",)): ({"get", "list"}, None),
        (("apps",), ("deployments",)): ({"get"}, ["tolaria"]),
    }
    binding = m.get(OVERLAY, "RoleBinding", "tolaria-run-jobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tolaria", "namespace": "esper"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tolaria-run-jobs"}
    assert not m.kind(OVERLAY, "ClusterRole") and not m.kind(OVERLAY, "ClusterRoleBinding")
    # Every other pod stays as the base has it (securityContext, resources, pinned images).
    assert {w["metadata"]["name"] for w in m.workloads(OVERLAY)} == {w["metadata"]["name"] for w in m.workloads("prod")}


def test_the_deployed_settings_make_tolaria_launch_jobs_it_can_run() -> None:
    cfg = _supervisor_config()
    k = cfg.kubernetes
    assert cfg.launcher == "kubernetes" and k is not None
    tolaria = m.get(OVERLAY, "Deployment", "tolaria")
    assert k.image == m.container(tolaria)["image"]  # workers run Tolaria's own image
    pvc = m.get(OVERLAY, "PersistentVolumeClaim", k.data_claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    vols = {v["name"]: v for v in tolaria["spec"]["template"]["spec"]["volumes"]}
    (data,) = [mt for mt in m.container(tolaria)["volumeMounts"] if mt["mountPath"] == k.data_mount]
    assert vols[data["name"]]["persistentVolumeClaim"]["claimName"] == k.data_claim
    args = m.container(tolaria)["args"]
    assert args[args.index("--data-dir") + 1] == k.data_mount  # run dirs are under the claim
    account = m.get(OVERLAY, "ServiceAccount", k.service_account)
    assert account["automountServiceAccountToken"] is False
    shipped = {o["metadata"]["name"] for o in m.objects(OVERLAY) if o["kind"] == "ConfigMap"}
    made = m.make_secrets.build()
    assert k.trusted_keys_config_map in shipped | set(made)
    assert k.nats_password_key in yaml.safe_load(json.dumps(made[k.nats_password_secret]))["data"]


def test_a_run_job_is_locked_down_and_gets_tolarias_environment_without_credentials() -> None:
    job = _job()
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "tolaria-worker"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    environ = _tolaria_environ()
    env = {e["name"]: e for e in c["env"]}
    for name in ("ESPER_NATS_URL", "ESPER_NATS_USER", "ESPER_NATS_PASSWORD_FILE", "ESPER_TRUSTED_KEYS_DIR",
                 "ESPER_ENDPOINTS", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        assert env[name]["value"] == environ[name], name
    for name in ("ESPER_API_KEYS_FILE", "ESPER_RUN_TOKEN_KEY_FILE", "ESPER_RUN_TOKEN_PUBLIC_KEY_FILE",
                 "ESPER_URZA_DATABASE_URL", "ESPER_TOLARIA_SUPERVISOR"):
        assert name not in env, name
    assert env["ESPER_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "esper-run-0123456789ab-1-credential"
    # Paths Tolaria's environment names are mounted at the same place in the worker pod.
    mounts = {mt["mountPath"] for mt in c["volumeMounts"]}
    for name in ("ESPER_NATS_PASSWORD_FILE", "ESPER_TRUSTED_KEYS_DIR"):
        path = env[name]["value"]
        assert path in mounts or str(Path(path).parent) in mounts, name
    (run,) = [mt for mt in c["volumeMounts"] if mt["name"] == "run"]
    assert run["subPath"] == "tolaria/runs/run-0123456789ab"


def test_the_network_admits_exactly_what_a_worker_pod_needs() -> None:
    net = m.Net(OVERLAY)
    net.pods["tolaria-worker"] = ("esper", _job()["spec"]["template"]["metadata"]["labels"])
    for dst, port in (("tamiyo", 50051), ("urza", 50051), ("nats", 4222), ("jaeger", 4317),
                      ("kube-dns", 53)):
        assert net.allowed("tolaria-worker", dst, port), dst
    for dst, port in (("karn", 50051), ("tezzeret", 50051), ("tolaria", 50051), ("postgres", 5432),
                      ("nats", 6222), ("internet", 443)):
        assert not net.allowed("tolaria-worker", dst, port), dst
    for src in ("tolaria", "urza", "client", "stranger"):
        assert not net.allowed(src, "tolaria-worker", 50051), src
    # Tolaria reaches the Kubernetes API (outside the pod network), on its ports only.
    assert net.allowed("tolaria", "internet", 443) and net.allowed("tolaria", "internet", 6443)
    assert not net.allowed("tolaria", "internet", 80)
    assert not net.allowed("urza", "internet", 6443)
