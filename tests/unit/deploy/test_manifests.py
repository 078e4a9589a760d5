"""deploy/k8s: every manifest validates offline against Kubernetes 1.33 (strict), and
the Esper deployments agree with the CLI and with their Services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esper.runtime.spec import PARTS

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    proc = subprocess.run(
        [str(VALIDATE), "--strict", "-k", "1.33.0", "--quiet", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    expected = {p.name for p in MANIFESTS} - {"secrets.example.yaml"}
    assert listed == expected


@pytest.mark.parametrize("part", PARTS)
def test_every_part_is_deployed_with_grpc_health_probes(part: str) -> None:
    docs = {d["kind"]: d for d in _docs(K8S / f"{part}.yaml")}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["serve", part]
    port = int(container["args"][container["args"].index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["grpc"]["port"] == port
    svc_port = docs["Service"]["spec"]["ports"][0]
    assert svc_port["targetPort"] == container["ports"][0]["name"]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_nats_uses_file_storage_with_fsync_always() -> None:
    conf = next(d for d in _docs(K8S / "nats.yaml") if d["kind"] == "ConfigMap")["data"]["nats.conf"]
    assert "store_dir" in conf and "sync_interval: always" in conf


def test_part_settings_in_the_manifests_are_settings_the_parts_know() -> None:
    """ESPER_<PART>_<KEY> variables set in the manifests reach the part's config (they
    were once ignored: Urza in the cluster would have used SQLite, not PostgreSQL)."""
    from esper.runtime.config import PlatformConfig
    from esper.urza.config import UrzaConfig

    env = {k: str(v) for k, v in next(d for d in _docs(K8S / "config.yaml")
                                      if d["kind"] == "ConfigMap")["data"].items()}
    urza = next(d for d in _docs(K8S / "urza.yaml") if d["kind"] == "Deployment")
    for var in urza["spec"]["template"]["spec"]["containers"][0].get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    settings = PlatformConfig.load(None, env=env).settings
    assert set(settings) == {"urza"}, "add a check for the new part's settings here"
    cfg = UrzaConfig.from_dict(dict(settings["urza"]))
    assert cfg.database_url.startswith("postgresql://") and cfg.blob_dir == "/data/blobs"
    # Urza authenticates to PostgreSQL with the password the database was created with.
    pg = next(d for d in _docs(K8S / "postgres.yaml") if d["kind"] == "StatefulSet")
    pg_env = {v["name"]: v for v in pg["spec"]["template"]["spec"]["containers"][0]["env"]}
    urza_env = {v["name"]: v for v in urza["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert urza_env["PGPASSWORD"]["valueFrom"] == pg_env["POSTGRES_PASSWORD"]["valueFrom"]
