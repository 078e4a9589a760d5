#!/usr/bin/env python3
"""Write the Secrets (and the trusted-keys ConfigMap) the Esper manifests expect.

    python deploy/k8s/make_secrets.py --out esper-secrets/     # new keys and passwords
    kubectl apply -f esper-secrets/

Writes, one file each, mode 0600 (they hold credentials; keep them out of git):
  esper-api-keys              one API key per part that calls others (its key "<part>", sent
                              as ESPER_API_KEY), an operator key ("admin", scope *), and
                              "api-keys", the list every service accepts (key=scopes lines)
  esper-nats-auth             a password per NATS user (admin, tolaria, reader)
  esper-postgres              the password of Urza's database user
  esper-tezzeret-signing-key  Tezzeret's Ed25519 signing key (signing-key.pem); --signing-key
                              uses an existing PEM instead of generating one
  esper-trusted-keys          ConfigMap with its public key (tezzeret.pub), which Urza, the
                              run workers and Tezzeret read; derived here, never written by a pod
  esper-run-token-key         Tolaria's Ed25519 key that signs each run worker's run token
                              (run-token.pem); --run-token-key uses an existing PEM
  esper-run-token-public-key  ConfigMap with its public key (run-token.pub), with which every
                              service accepts run tokens

Needs only Python 3 and the `cryptography` package. Rotating a key: run again, apply, and
restart the pods (`kubectl -n esper rollout restart deployment`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from pathlib import Path

# Least scopes per part, from the calls each part's code makes (tests/unit/deploy checks
# them against every service's write_methods):
#   tolaria  Tamiyo GetPolicyInfo (StartRun checks the run's controller); its run workers
#            call with run tokens Tolaria mints (esper.tolaria.supervisor.worker_scopes:
#            Tamiyo Decide, Urza GetKernel, QueryKernels, RecordOutcome), never with this key
#   tezzeret Urza GetBlueprint, QueryKernels (read); PutBlueprint, PutKernel (write)
#   tamiyo   Urza QueryKernels
#   karn     Urza ListBlueprints, QueryKernels; Tezzeret Compile (write)
#   urza     calls no other part: no key of its own
SCOPES: dict[str, tuple[str, ...]] = {
    "tolaria": ("tamiyo:read",),
    "tezzeret": ("urza:read", "urza:write"),
    "tamiyo": ("urza:read",),
    "karn": ("tezzeret:write", "urza:read"),
}
NATS_USERS = ("admin", "tolaria", "reader")  # esper.oona.auth.ROLES


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "esper"}},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _run_token_key(path: Path | None) -> tuple[str, str]:
    """(private PEM, public PEM) of the run-token pair (Ed25519, as esper.runtime.auth reads it)."""
    return _signing_key(path)


def _signing_key(path: Path | None) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path is None:
        key = Ed25519PrivateKey.generate()
    else:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SystemExit(f"{path}: not an Ed25519 private key (PEM, PKCS#8)")
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def build(namespace: str = "esper", signing_key: Path | None = None,
          run_token_key: Path | None = None) -> dict[str, dict]:
    """Object name → manifest (as a dict) for every Secret and the trusted-keys ConfigMap."""
    keys = {part: secrets.token_urlsafe(32) for part in SCOPES}
    admin = secrets.token_urlsafe(32)
    accepted = ["# key=scopes, one per line (esper.runtime.auth): what every service accepts."]
    accepted += [f"{keys[part]}={','.join(scopes)}" for part, scopes in SCOPES.items()]
    accepted.append(f"{admin}=*")
    private, public = _signing_key(signing_key)
    token_private, token_public = _run_token_key(run_token_key)
    return {
        "esper-api-keys": _secret("esper-api-keys", namespace,
                                  {**keys, "admin": admin, "api-keys": "\n".join(accepted) + "\n"}),
        "esper-nats-auth": _secret("esper-nats-auth", namespace,
                                   {u: secrets.token_urlsafe(32) for u in NATS_USERS}),
        "esper-postgres": _secret("esper-postgres", namespace,
                                  {"password": secrets.token_urlsafe(32)}),
        "esper-tezzeret-signing-key": _secret("esper-tezzeret-signing-key", namespace,
                                              {"signing-key.pem": private}),
        "esper-trusted-keys": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "esper-trusted-keys", "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "esper"}},
            "data": {"tezzeret.pub": public},
        },
        "esper-run-token-key": _secret("esper-run-token-key", namespace,
                                       {"run-token.pem": token_private}),
        "esper-run-token-public-key": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "esper-run-token-public-key", "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "esper"}},
            "data": {"run-token.pub": token_public},
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write the manifests to")
    ap.add_argument("--namespace", default="esper")
    ap.add_argument("--signing-key", type=Path, default=None,
                    help="existing Ed25519 private key (PEM) instead of a new one")
    ap.add_argument("--run-token-key", type=Path, default=None,
                    help="existing Ed25519 private key (PEM) for Tolaria's run tokens instead of a new one")
    ap.add_argument("--force", action="store_true", help="overwrite files that exist")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    objects = build(args.namespace, args.signing_key, args.run_token_key)
    for name, obj in objects.items():
        path = args.out / f"{name}.yaml"
        if path.exists() and not args.force:
            print(f"{path} exists; pass --force to replace it (and its credentials)", file=sys.stderr)
            return 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)  # JSON is YAML: kubectl applies it as is
            f.write("\n")
        print(f"wrote {path}")
    print(f"next: kubectl apply -f {args.out}/ && kubectl apply -k deploy/k8s/overlays/<dev|prod>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
