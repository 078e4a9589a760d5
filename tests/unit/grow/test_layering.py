"""esper.grow is library layer: importing it pulls in no gRPC, NATS, tracing or service code."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN_ROOTS = ("grpc", "nats", "opentelemetry", "grpc_status", "grpc_health", "grpc_reflection")
FORBIDDEN_ESPER = ("esper.runtime", "esper.urza", "esper.tolaria", "esper.oona", "esper.tezzeret",
                   "esper.karn", "esper.tamiyo.service", "esper.tamiyo.client", "esper.tamiyo.gnn",
                   "torch_geometric")

PROBE = """
import json, sys
import esper.grow
from esper.grow import export  # noqa: F401
print(json.dumps(sorted(sys.modules)))
"""


def test_import_esper_grow_pulls_in_no_grpc_nats_or_service_module() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE],
                         capture_output=True, text=True, check=True, timeout=120)
    modules = json.loads(out.stdout)
    assert "esper.grow" in modules and "torch" in modules
    bad = [m for m in modules if m.split(".")[0] in FORBIDDEN_ROOTS
           or any(m == f or m.startswith(f + ".") for f in FORBIDDEN_ESPER)]
    assert bad == []
