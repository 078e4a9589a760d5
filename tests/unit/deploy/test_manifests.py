"""deploy/k8s: every overlay renders (kubectl kustomize) and validates offline against
Kubernetes 1.33 (strict), and what it renders is fit for production: every pod locked down
and sized, pinned images, each Esper pod with its own least-scoped API key, a default-deny
network with exactly the connections the data flow needs, PDBs on what is replicated,
NATS as its Helm chart would run it, and a mesh component that keeps gRPC probes working."""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from esper.runtime.spec import PARTS

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod", "prod-istio")
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (kustomize) is not installed")

# Which part calls which RPCs of which other part with its own key: read off the code
# (esper/<part>/service.py and the clients it builds). The scopes, the network policies and
# the loopback cluster test all follow from it.
CALLS: dict[str, dict[str, tuple[str, ...]]] = {
    "tolaria": {"tamiyo": ("GetPolicyInfo",)},
    "tezzeret": {"urza": ("GetBlueprint", "QueryKernels", "PutBlueprint", "PutKernel")},
    "tamiyo": {"urza": ("QueryKernels",)},
    "karn": {"urza": ("ListBlueprints", "QueryKernels"), "tezzeret": ("Compile",)},
    "urza": {},
}
# What Tolaria's run workers call, with the run tokens Tolaria mints (never a part's key;
# esper.tolaria.supervisor.worker_scopes). With the local launcher they run in Tolaria's pod,
# so its network policy admits their connections too.
WORKER_CALLS: dict[str, tuple[str, ...]] = {
    "tamiyo": ("GetPolicyInfo", "Decide"), "urza": ("GetKernel", "QueryKernels", "RecordOutcome"),
    # Kernels for a site Urza holds none for, compiled on demand (esper.urza.source).
    "tezzeret": ("EnsureKernels",)}
GRPC = 50051


def _make_secrets():
    spec = importlib.util.spec_from_file_location("make_secrets", K8S / "make_secrets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_secrets = _make_secrets()


@cache
def rendered(overlay: str) -> str:
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@cache
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(rendered(overlay)) if d)


def kind(overlay: str, k: str) -> list[dict[str, Any]]:
    return [o for o in objects(overlay) if o["kind"] == k]


def get(overlay: str, k: str, name: str) -> dict[str, Any]:
    found = [o for o in kind(overlay, k) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{k}/{name} in {overlay}: {len(found)} found"
    return found[0]


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [o for o in objects(overlay) if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


def env_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(workload).get("env", [])}


# --- rendering and validation ----------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str) -> None:
    proc = subprocess.run([str(VALIDATE), "--strict", "-k", "1.33.0", "--quiet", "-"],
                          input=rendered(overlay), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_lists_every_manifest_in_its_directory() -> None:
    base = K8S / "base"
    listed = set(yaml.safe_load((base / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("part", PARTS)
def test_every_part_is_deployed_with_grpc_health_probes(overlay: str, part: str) -> None:
    dep = get(overlay, "Deployment", part)
    c = container(dep)
    assert c["args"][:2] == ["serve", part]
    port = int(c["args"][c["args"].index("--port") + 1])
    assert c["ports"][0]["containerPort"] == port == GRPC
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    svc = get(overlay, "Service", part)
    assert svc["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


# --- every pod -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down_sized_and_tokenless(overlay: str) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in kind(overlay, "ServiceAccount")}
    names = {w["metadata"]["name"] for w in workloads(overlay)}
    assert {"nats", "postgres", "jaeger", "esper-streams", *PARTS} <= names
    for w in workloads(overlay):
        pod = w["spec"]["template"]["spec"]
        where = f"{w['kind']}/{w['metadata']['name']}"
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert pod.get("automountServiceAccountToken") is False, where
        sa = accounts[pod["serviceAccountName"]]
        assert sa["automountServiceAccountToken"] is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
            assert sc.get("capabilities") == {"drop": ["ALL"]}, (where, c["name"])
            assert sc.get("runAsNonRoot") is True, (where, c["name"])
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, (where, c["name"])
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), (where, c["name"])
            assert "memory" in res.get("limits", {}), (where, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    # A release, not a moving tag: x.y.z (PostgreSQL numbers its releases x.y), or a digest.
    pinned = re.compile(r"^[\w./-]+(:\d+\.\d+\.\d+(-[\w.]+)?|@sha256:[0-9a-f]{64})$")
    postgres = re.compile(r"^postgres:\d+\.\d+(-[\w.]+)?$")
    for w in workloads(overlay):
        for c in w["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            assert pinned.match(image) or postgres.match(image), \
                f"{w['metadata']['name']}: {image} is not pinned"
            assert not image.endswith(":latest")


# --- credentials -----------------------------------------------------------------------------

def _write_methods(part: str) -> set[str]:
    tree = ast.parse((ROOT / "esper" / part / "service.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "write_methods":
            return {elt.value for elt in node.value.args[0].elts}  # frozenset({...})
    return set()


def _methods(part: str) -> set[str]:
    module = importlib.import_module(f"generated.esper.{part}.v1.{part}_service_pb2")
    return set(module.DESCRIPTOR.services_by_name[f"{part.capitalize()}Service"].methods_by_name)


def test_scopes_are_the_least_the_code_needs() -> None:
    least: dict[str, tuple[str, ...]] = {}
    for caller, callees in CALLS.items():
        scopes = set()
        for callee, methods in callees.items():
            assert set(methods) <= _methods(callee), (caller, callee)
            writes = _write_methods(callee)
            scopes |= {f"{callee}:write" if m in writes else f"{callee}:read" for m in methods}
        if scopes:
            least[caller] = tuple(sorted(scopes))
    assert {p: tuple(sorted(s)) for p, s in make_secrets.SCOPES.items()} == least


def test_run_tokens_grant_the_least_the_worker_needs() -> None:
    from esper.tolaria.supervisor import worker_scopes

    least = set()
    for callee, methods in WORKER_CALLS.items():
        assert set(methods) <= _methods(callee), callee
        writes = _write_methods(callee)
        least |= {f"{callee}:write" if m in writes else f"{callee}:read" for m in methods}
    assert set(worker_scopes("heuristic", {"tamiyo": "t", "urza": "u", "tezzeret": "z"})) == least
    # Without Tezzeret among the endpoints the token grants nothing of it.
    assert set(worker_scopes("heuristic", {"tamiyo": "t", "urza": "u"})) == {
        s for s in least if not s.startswith("tezzeret:")}
    assert worker_scopes("none", {"tamiyo": "t", "urza": "u"}) == ()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_esper_pod_verifies_run_tokens_and_only_tolaria_can_mint_them(overlay: str) -> None:
    for part in PARTS:
        dep = get(overlay, "Deployment", part)
        env = env_of(dep)
        mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        path = env["ESPER_RUN_TOKEN_PUBLIC_KEY_FILE"]["value"]
        mount = mounts[os.path.dirname(path)]
        assert mount["readOnly"] is True
        assert vols[mount["name"]]["configMap"]["name"] == "esper-run-token-public-key"
        if part == "tolaria":
            key = env["ESPER_RUN_TOKEN_KEY_FILE"]["value"]
            m = mounts[os.path.dirname(key)]
            assert m["readOnly"] is True and vols[m["name"]]["secret"]["secretName"] == "esper-run-token-key"
        else:
            assert "ESPER_RUN_TOKEN_KEY_FILE" not in env
            assert not any(v.get("secret", {}).get("secretName") == "esper-run-token-key" for v in vols.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_esper_pod_gets_its_own_scoped_key_and_no_other(overlay: str) -> None:
    for part in PARTS:
        dep = get(overlay, "Deployment", part)
        env = env_of(dep)
        if part in make_secrets.SCOPES:
            ref = env["ESPER_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "esper-api-keys", "key": part}, part
        else:
            assert "ESPER_API_KEY" not in env and not CALLS[part], part
        # The accepted-keys list is mounted, and nothing else of that Secret: no pod holds
        # another part's own key or the operator's.
        assert env["ESPER_API_KEYS_FILE"]["value"] == "/var/run/secrets/esper/api-keys/api-keys"
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert vols["api-keys"]["secret"]["items"] == [{"key": "api-keys", "path": "api-keys"}]
        assert not any("secretRef" in e for e in container(dep).get("envFrom", [])), part


def test_make_secrets_writes_what_the_manifests_reference(tmp_path: Path) -> None:
    from esper.blueprints.artifact import SigningKey, TrustedKeys
    from esper.oona.auth import ROLES
    from esper.runtime.auth import parse_keys

    assert set(make_secrets.NATS_USERS) == set(ROLES)
    assert make_secrets.main(["--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.yaml"))
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    proc = subprocess.run([str(VALIDATE), "--strict", "-k", "1.33.0", "--quiet", *map(str, files)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = {o["metadata"]["name"]: o for o in (yaml.safe_load(f.read_text()) for f in files)}
    data = {n: {k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()}
            if o["kind"] == "Secret" else o["data"] for n, o in made.items()}
    # Every Secret/ConfigMap key a pod of any overlay reads exists (esper-s3 holds the
    # object store's credentials: the operator gets those from the storage provider).
    for overlay in OVERLAYS:
        shipped = {o["metadata"]["name"]: o.get("data", {}) for o in objects(overlay)
                   if o["kind"] in ("ConfigMap", "Secret")}
        for w in workloads(overlay):
            pod = w["spec"]["template"]["spec"]
            refs = [(e["valueFrom"]["secretKeyRef"], False) for c in pod["containers"]
                    for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            for v in pod.get("volumes", []):
                src = v.get("secret") or v.get("configMap")
                if src is not None:
                    name = src.get("secretName") or src.get("name")
                    refs += [({"name": name, "key": i["key"]}, False) for i in src.get("items", [])]
                    refs.append(({"name": name, "key": None}, True))
            for ref, whole in refs:
                if ref["name"] == "esper-s3":
                    continue
                have = {**shipped, **data}
                assert ref["name"] in have, (overlay, w["metadata"]["name"], ref)
                assert whole or ref["key"] in have[ref["name"]], (overlay, w["metadata"]["name"], ref)
    # The accepted list gives each part's own key exactly its scopes.
    accepted = parse_keys(data["esper-api-keys"]["api-keys"], source="api-keys", separator="\n")
    for part, scopes in make_secrets.SCOPES.items():
        assert accepted[data["esper-api-keys"][part]] == frozenset(scopes)
    assert accepted[data["esper-api-keys"]["admin"]] == frozenset({"*"})
    # Urza's trusted key is the public half of Tezzeret's signing key.
    key_file = tmp_path / "signing.pem"
    key_file.write_text(data["esper-tezzeret-signing-key"]["signing-key.pem"])
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "tezzeret.pub").write_text(data["esper-trusted-keys"]["tezzeret.pub"])
    assert SigningKey.from_file(key_file).key_id in TrustedKeys.from_dir(tmp_path / "trusted")
    # Reusing an operator's key keeps it.
    out2 = tmp_path / "again"
    assert make_secrets.main(["--out", str(out2), "--signing-key", str(key_file)]) == 0
    again = yaml.safe_load((out2 / "esper-trusted-keys.yaml").read_text())
    assert again["data"]["tezzeret.pub"] == data["esper-trusted-keys"]["tezzeret.pub"]
    assert make_secrets.main(["--out", str(out2)]) == 1  # never overwrites without --force


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tezzeret_key_comes_from_secrets_and_nothing_writes_into_a_mount(overlay: str) -> None:
    tz = get(overlay, "Deployment", "tezzeret")
    env = env_of(tz)
    assert env["ESPER_SIGNING_KEY_FILE"]["value"].startswith("/var/run/secrets/esper/signing/")
    for part in ("urza", "tolaria", "tezzeret"):
        dep = get(overlay, "Deployment", part)
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container(dep)["volumeMounts"]}
        assert env_of(dep)["ESPER_TRUSTED_KEYS_DIR"]["value"] == "/etc/esper/trusted-keys"
        assert mounts["/etc/esper/trusted-keys"]["readOnly"] is True
        assert vols[mounts["/etc/esper/trusted-keys"]["name"]]["configMap"]["name"] == "esper-trusted-keys"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_tolaria_and_the_streams_job_log_in_to_nats(overlay: str) -> None:
    users = {}
    for w in workloads(overlay):
        env = env_of(w)
        if "ESPER_NATS_USER" in env:
            users[w["metadata"]["name"]] = env["ESPER_NATS_USER"]["value"]
            mounts = {m["mountPath"] for m in container(w)["volumeMounts"]}
            assert os.path.dirname(env["ESPER_NATS_PASSWORD_FILE"]["value"]) in mounts
    assert users == {"tolaria": "tolaria", "esper-streams": "admin"}
    job = get(overlay, "Job", "esper-streams")
    assert container(job)["args"][0] == "streams"
    cfg = get(overlay, "ConfigMap", "esper-config")["data"]
    assert cfg["ESPER_NATS_STREAM_REPLICAS"] == "3"
    assert len(cfg["ESPER_NATS_URL"].split(",")) == 3


# --- network ---------------------------------------------------------------------------------

def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if expr["operator"] == "Exists" and not present:
            return False
    return True


class Net:
    """Evaluates the rendered NetworkPolicies the way the API defines them."""

    def __init__(self, overlay: str) -> None:
        self.policies = kind(overlay, "NetworkPolicy")
        self.pods = {w["metadata"]["name"]: ("esper", w["spec"]["template"]["metadata"]["labels"])
                     for w in workloads(overlay)}
        self.pods["client"] = ("elsewhere", {"esper.dev/client": "true"})
        self.pods["stranger"] = ("elsewhere", {"app": "something"})
        self.pods["kube-dns"] = ("kube-system", {"k8s-app": "kube-dns"})
        self.pods["internet"] = (None, {})

    def _peer(self, peer: dict[str, Any], policy_ns: str, ns: str | None, labels: dict[str, str]) -> bool:
        if "ipBlock" in peer:
            return ns is None  # only addresses outside the cluster here
        if ns is None:
            return False
        ns_ok = _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}) \
            if "namespaceSelector" in peer else ns == policy_ns
        pod_ok = _matches(peer["podSelector"], labels) if "podSelector" in peer else True
        return ns_ok and pod_ok

    def _side(self, direction: str, pod: str, peer: str, port: int) -> bool:
        ns, labels = self.pods[pod]
        peer_ns, peer_labels = self.pods[peer]
        selecting = [p for p in self.policies if p["metadata"]["namespace"] == ns
                     and direction in p["spec"]["policyTypes"]
                     and _matches(p["spec"]["podSelector"], labels)]
        if not selecting:
            return True  # not isolated in that direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for p in selecting:
            for rule in p["spec"].get(key, []):
                ports = rule.get("ports")
                if ports is not None and not any(pp.get("port") == port for pp in ports):
                    continue
                peers = rule.get(peers_key)
                if peers is None or any(self._peer(x, ns, peer_ns, peer_labels) for x in peers):
                    return True
        return False

    def allowed(self, src: str, dst: str, port: int) -> bool:
        return self._side("Egress", src, dst, port) and self._side("Ingress", dst, src, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_default_deny_with_exactly_the_data_flow(overlay: str) -> None:
    deny = get(overlay, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    net = Net(overlay)
    needed = [(a, b, GRPC) for a, callees in CALLS.items() for b in callees]
    needed += [("tolaria", b, GRPC) for b in WORKER_CALLS]  # the local launcher's workers
    needed += [("tolaria", "nats", 4222), ("esper-streams", "nats", 4222), ("nats", "nats", 6222),
               ("urza", "postgres", 5432), ("client", "nats", 4222), ("client", "jaeger", 16686)]
    needed += [(p, "jaeger", 4317) for p in PARTS] + [("client", p, GRPC) for p in PARTS]
    needed += [(w, "kube-dns", 53) for w in net.pods if net.pods[w][0] == "esper"]
    for src, dst, port in needed:
        assert net.allowed(src, dst, port), f"{overlay}: {src} -> {dst}:{port} is blocked"
    calls = {(a, b) for a, callees in CALLS.items() for b in callees} | {("tolaria", b) for b in WORKER_CALLS}
    forbidden = [(a, b, GRPC) for a in PARTS for b in PARTS if a != b and (a, b) not in calls]
    forbidden += [(p, "postgres", 5432) for p in PARTS if p != "urza"]
    forbidden += [(p, "nats", 4222) for p in PARTS if p != "tolaria"]
    forbidden += [("stranger", p, GRPC) for p in PARTS] + [("stranger", "nats", 4222)]
    forbidden += [("client", "postgres", 5432), ("client", "nats", 6222), ("tolaria", "nats", 6222),
                  ("tolaria", "internet", 443), ("postgres", "internet", 443),
                  ("nats", "internet", 443), ("esper-streams", "urza", GRPC)]
    for src, dst, port in forbidden:
        assert not net.allowed(src, dst, port), f"{overlay}: {src} -> {dst}:{port} is open"
    # Only prod's Urza reaches its object store.
    assert net.allowed("urza", "internet", 443) == overlay.startswith("prod")


# --- availability ----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_cover_exactly_the_replicated_parts(overlay: str) -> None:
    pdbs = kind(overlay, "PodDisruptionBudget")
    for w in workloads(overlay):
        if w["kind"] == "Job":
            continue
        labels = w["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if _matches(p["spec"]["selector"], labels)]
        replicas = w["spec"].get("replicas", 1)
        name = w["metadata"]["name"]
        if replicas > 1:
            assert len(covering) == 1, f"{overlay}: {name} ({replicas} replicas) has no PDB"
            spec = covering[0]["spec"]
            # A budget that still lets one pod go: drains proceed, quorum/service stays.
            allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else replicas - spec["minAvailable"]
            assert 1 <= allowed < replicas, (overlay, name, spec)
        else:
            assert not covering, f"{overlay}: a PDB on single-replica {name} would block drains"
    replicated = {w["metadata"]["name"] for w in workloads(overlay) if w["spec"].get("replicas", 1) > 1}
    assert replicated == ({"nats", "urza"} if overlay.startswith("prod") else {"nats"})


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicated_grpc_parts_are_reached_through_a_headless_service(overlay: str) -> None:
    endpoints = dict(e.split("=", 1) for e in
                     get(overlay, "ConfigMap", "esper-config")["data"]["ESPER_ENDPOINTS"].split(","))
    assert set(endpoints) == set(PARTS)
    headless = get(overlay, "Service", "urza-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert endpoints["urza"] == "dns:///urza-headless.esper.svc.cluster.local:50051"
    for part in PARTS:
        if get(overlay, "Deployment", part)["spec"]["replicas"] > 1:
            assert endpoints[part].startswith("dns:///") and "-headless" in endpoints[part], part


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tamiyo_runs_one_replica_never_two(overlay: str) -> None:
    # Its per-run history is in memory: decisions must not depend on which replica answers.
    tamiyo = get(overlay, "Deployment", "tamiyo")["spec"]
    assert tamiyo["replicas"] == 1 and tamiyo["strategy"]["type"] == "Recreate"


# --- NATS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_runs_as_its_helm_chart_would(overlay: str, tmp_path: Path) -> None:
    from esper.oona.auth import authorization_block, password_env

    sts = get(overlay, "StatefulSet", "nats")
    c = container(sts)
    conf = get(overlay, "ConfigMap", "nats-config")["data"]["nats.conf"]
    assert sts["spec"]["replicas"] == 3 and "sync_interval: always" in conf
    pid_file = re.search(r'pid_file: "([^"]+)"', conf).group(1)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["nats-server", "--signal", f"ldm={pid_file}"]
    assert "lame_duck_duration" in conf
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 40
    assert c["startupProbe"]["httpGet"]["port"] == "monitor"
    assert authorization_block() in conf  # the users of esper.oona.auth, verbatim
    for svc in kind(overlay, "Service"):
        for port in svc["spec"]["ports"]:
            assert port.get("appProtocol"), f"Service {svc['metadata']['name']} port {port['name']}"
    # nats-server itself accepts the config (with the Secret's variables set).
    conf_file = tmp_path / "nats.conf"
    conf_file.write_text(conf)
    env_names = {e["name"] for e in c["env"]}
    assert {password_env(r) for r in ("admin", "tolaria", "reader")} <= env_names
    from esper.oona.natsd import find_binary

    env = {**os.environ, "POD_NAME": "nats-0", **{n: "x" for n in env_names if n != "POD_NAME"}}
    proc = subprocess.run([str(find_binary()), "-t", "-c", str(conf_file)], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- settings reach the parts ----------------------------------------------------------------

@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_part_settings_in_the_manifests_are_settings_the_parts_know(overlay: str) -> None:
    """ESPER_<PART>_<KEY> variables set in the manifests reach the part's config (they
    were once ignored: Urza in the cluster would have used SQLite, not PostgreSQL)."""
    from esper.runtime.config import PlatformConfig
    from esper.urza.config import UrzaConfig

    base = {k: str(v) for k, v in get(overlay, "ConfigMap", "esper-config")["data"].items()}
    for part in PARTS:
        env = dict(base)
        for var in env_of(get(overlay, "Deployment", part)).values():
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var["name"].startswith("ESPER_URZA_S3_"):
                env[var["name"]] = "https://s3.example.net" if "ENDPOINT" in var["name"] else "eu-west-1"
        settings = PlatformConfig.load(None, env=env).settings
        assert set(settings) <= {"urza"}, "add a check for the new part's settings here"
        if "urza" in settings:
            cfg = UrzaConfig.from_dict(dict(settings["urza"]))
            assert cfg.database_url.startswith("postgresql://")
            if overlay == "prod" and part == "urza":
                assert cfg.blob_url.startswith("s3://") and not cfg.blob_dir
            elif part == "urza":
                assert cfg.blob_dir == "/data/blobs"
    pg = get(overlay, "StatefulSet", "postgres")
    urza = get(overlay, "Deployment", "urza")
    assert env_of(urza)["PGPASSWORD"]["valueFrom"] == env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]


# --- mesh ------------------------------------------------------------------------------------

def test_istio_component_keeps_grpc_probes_working() -> None:
    for w in workloads("prod-istio"):
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        if w["kind"] == "Deployment":
            assert notes["sidecar.istio.io/inject"] == "true", w["metadata"]["name"]
            assert notes["sidecar.istio.io/rewriteAppHTTPProbers"] == "true"
            assert "holdApplicationUntilProxyStarts" in notes["proxy.istio.io/config"]
        else:
            assert notes["sidecar.istio.io/inject"] == "false", w["metadata"]["name"]
    for part in PARTS:
        assert "grpc" in container(get("prod-istio", "Deployment", part))["readinessProbe"]
    istiod = get("prod-istio", "NetworkPolicy", "allow-istiod")["spec"]
    assert istiod["egress"][0]["ports"] == [{"protocol": "TCP", "port": 15012}]
    assert not any(w["spec"]["template"]["metadata"].get("annotations") for w in workloads("prod"))
