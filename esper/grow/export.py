"""Take the grown model away: a plain `nn.Module` with fossilized seeds folded in.

    plain = esper.grow.fold(mm)                 # no hooks, no slots; torch.export / torch.save work
    esper.grow.export(mm, "out/")               # out/model.safetensors + out/manifest.json
    again = esper.grow.load_exported(MyNet(), "out/")   # a freshly constructed host

Folding replaces each fossilized site's module in a *copy* of the host by what the slot
kind's `FoldRule` builds: for output slots (`y = h + s(h)`) a `SeedResidual` running the
site module and then its seed; for parallel slots (`y = m(x) + s(x)`) a `SeedParallel`
running the module and the seed side by side on the module's input. A parallel slot over
a span of children (`"blocks.0:2"`) folds the span into one `nn.Sequential` at its first
child's place (the other children become `nn.Identity`: the span ran as a chain). A rule
per slot kind is registered with `register_fold_rule`; one that merges a width or low-rank
seed into its Linear's weights replaces the generic "parallel" rule (`replace=True`).

The manifest (JSON) says, per fossilized site: the slot kind and fold rule, the kernel and
blueprint ids, the site signature and the blueprint IR the seed is rebuilt from (never
code: the IR's ops come from the allowlist); and every tensor of the weights file (name,
shape, dtype) with the file's SHA-256. The weights file's own metadata holds the SHA-256
of the manifest's contents, so editing either file is detected. Loading never unpickles:
the module is rebuilt from the host you construct plus the IR, and its weights are read
with safetensors after every name, shape and dtype was checked.

Other ways to take a model away, and what they keep:
* `mm.host.state_dict()` — the host's own weights only (seeds live in the slots);
* `mm.state_dict()` — host + slots, with one `_extra_state` dict per slot (not a pure
  tensor map: store those as JSON, as Tolaria's checkpoints do);
* `torch.save(mm)` — the whole wrapped model, pickled (load it only from files you wrote);
* `mm.remove_hooks()` — refuses while a seed is fossilized (it would drop it); fold instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from google.protobuf import json_format
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from esper.blueprints import BlueprintModule, build_module, plan_ir
from esper.blueprints.ir import canonical_ir
from esper.errors import ArtifactError, FailedPreconditionError
from esper.kasmina import MorphogeneticModel, SeedStage, SlotKind
from esper.kasmina.stages import LIVE_STAGES
from generated.esper.common.v1 import blueprint_pb2, seed_pb2

FORMAT = "esper.grow.export/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MAX_MANIFEST_BYTES = 16 << 20
_MANIFEST_SHA_KEY = "esper.export.manifest_sha256"

Live = Literal["refuse", "drop"]


class ExportError(ArtifactError):
    """An export is malformed or was tampered with; nothing of it is loaded."""

    reason = "EXPORT_INVALID"


@dataclass(frozen=True)
class FoldRule:
    """How a seed of one slot kind becomes part of a plain model.

    `fold(site_module, seed)` returns the module that replaces the site in the folded
    copy (both arguments are copies the rule may modify or absorb). `rebuild(site_module,
    seed)` returns the same structure from a freshly constructed site module and a seed
    rebuilt from its IR, so that the exported weights load into it.
    """

    name: str
    fold: Callable[[nn.Module, nn.Module], nn.Module]
    rebuild: Callable[[nn.Module, nn.Module], nn.Module]


_RULES: dict[str, FoldRule] = {}


def register_fold_rule(kind: str, rule: FoldRule, *, replace: bool = False) -> None:
    """Declare how seeds of slot kind `kind` are folded (and rebuilt on load).

    Raises:
        ValueError: a rule for `kind` exists and `replace` is False.
    """
    if kind in _RULES and not replace:
        raise ValueError(f"a fold rule for slot kind {kind!r} exists ({_RULES[kind].name}); "
                         "pass replace=True to replace it")
    _RULES[kind] = rule


def fold_rule(kind: str) -> FoldRule:
    """The rule for slot kind `kind`.

    Raises:
        ExportError: no rule is registered for it.
    """
    try:
        return _RULES[kind]
    except KeyError:
        raise ExportError(f"no fold rule for slot kind {kind!r}; registered: {sorted(_RULES)} "
                          "(esper.grow.export.register_fold_rule adds one)") from None


class _Folded(nn.Module):
    """A site module with its seed folded in; reads of other attributes reach the module."""

    def __init__(self, module: nn.Module, seed: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.seed = seed

    def __getattr__(self, name: str) -> Any:
        # The host may read attributes of the module it thinks is there (TransformerEncoder
        # reads `layers[0].self_attn`); they are the wrapped module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)


class SeedResidual(_Folded):
    """An output slot's site followed by its fossilized seed: `y = h + seed(h)`, `h = module(x)`."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.module(*args, **kwargs)
        return h + self.seed(h)


class SeedParallel(_Folded):
    """A parallel slot's module beside its fossilized seed: `y = module(x) + seed(x)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) + self.seed(x)


register_fold_rule("output", FoldRule("residual", fold=SeedResidual, rebuild=SeedResidual))
register_fold_rule("parallel", FoldRule("branch", fold=SeedParallel, rebuild=SeedParallel))


def slot_kind(slot: Any) -> str:
    """The slot's kind as a rule key: "output" or "parallel"."""
    return "parallel" if getattr(slot, "kind", SlotKind.OUTPUT) is SlotKind.PARALLEL else "output"


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _span(root: nn.Module, slot_id: str) -> tuple[nn.Module, list[str]]:
    """The container and child names a slot covers: one child, or a span `<c>.<first>:<last>`.

    Raises:
        ExportError: the slot id names no module (or span of children) of `root`.
    """
    try:
        if ":" not in slot_id:
            parent, child = _parent(root, slot_id)
            if child not in dict(parent.named_children()):
                raise AttributeError(slot_id)
            return parent, [child]
        head, _, last = slot_id.partition(":")
        container, _, first = head.rpartition(".")
        parent = root.get_submodule(container) if container else root
        names = [n for n, _ in parent.named_children()]
        i, j = names.index(first), names.index(last)
    except (AttributeError, ValueError) as e:
        raise ExportError(f"site {slot_id!r} is not a module or span of {type(root).__name__}") from e
    return parent, names[i:j + 1]


def _replace(root: nn.Module, slot_id: str, rule: FoldRule, seed: nn.Module, *, rebuild: bool) -> None:
    parent, children = _span(root, slot_id)
    modules = [getattr(parent, c) for c in children]
    site = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
    setattr(parent, children[0], (rule.rebuild if rebuild else rule.fold)(site, seed))
    for c in children[1:]:
        setattr(parent, c, nn.Identity())


def _check_live(mm: MorphogeneticModel, live: Live) -> None:
    if live not in ("refuse", "drop"):
        raise ValueError(f"live={live!r}; allowed: 'refuse', 'drop'")
    pending = {sid: s.current_stage.name for sid, s in mm.slots.items()
               if s.current_stage in LIVE_STAGES and s.current_stage is not SeedStage.FOSSILIZED}
    if pending and live == "refuse":
        raise FailedPreconditionError(
            f"slot(s) {pending} hold seeds that are not fossilized; fossilize or prune them, "
            "or pass live='drop' to export without them (the exported model then differs from "
            "the wrapped one wherever such a seed is blended in)", reason="SEEDS_IN_FLIGHT")


def fold(mm: MorphogeneticModel, *, live: Live = "refuse") -> nn.Module:
    """A copy of `mm.host` with every fossilized seed folded in: no hooks, no slots, output
    and parallel slots alike.

    Args:
        mm: the wrapped model (unchanged by this call).
        live: what to do with seeds that are not fossilized: "refuse" (raise) or "drop"
            (leave them out).

    Raises:
        FailedPreconditionError: `live="refuse"` and a seed is still in flight.
        ExportError: a slot kind without a fold rule.
    """
    _check_live(mm, live)
    slots = list(mm.slots.values())
    for s in slots:
        s.remove_hook()
    try:
        plain = copy.deepcopy(mm.host)
    finally:
        for s in slots:
            s.update_hook()
    for p in plain.parameters():
        p.grad = None
    for slot in slots:
        if slot.current_stage is not SeedStage.FOSSILIZED:
            continue
        seed = copy.deepcopy(slot.seed)
        for p in seed.parameters():
            p.grad = None
        _replace(plain, slot.slot_id, fold_rule(slot_kind(slot)), seed, rebuild=False)
    return plain


def ir_of(seed: nn.Module, site: seed_pb2.SiteSignature, where: str) -> blueprint_pb2.BlueprintIR:
    """The blueprint IR a seed module was built from (read back from its validated plan).

    Raises:
        ExportError: the seed is not a blueprint module, or its plan does not round-trip.
    """
    if not isinstance(seed, BlueprintModule):
        raise ExportError(
            f"the seed at {where!r} is a {type(seed).__name__}, not a blueprint module; only "
            "seeds built from a blueprint IR can be exported (they are rebuilt from the IR, "
            "never from code)")
    plan = seed.plan
    ir = blueprint_pb2.BlueprintIR(ir_version=1, output=plan.output)
    for n in plan.nodes:
        node = ir.nodes.add(name=n.name, op=n.op, inputs=list(n.inputs))
        for key, value in n.attrs.items():
            if value is None:
                continue  # an unset optional attribute: the op's default again on rebuild
            attr = node.attrs[key]
            if isinstance(value, bool):
                attr.bool_value = value
            elif isinstance(value, int):
                attr.int_value = value
            elif isinstance(value, float):
                attr.float_value = value
            else:
                attr.string_value = str(value)
    if plan_ir(ir, site).tensor_specs() != plan.tensor_specs():
        raise ExportError(f"the seed at {where!r}: its plan does not round-trip through the IR")
    return ir


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# safetensors' header names for torch dtypes.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _core_sha(core: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(core)).hexdigest()


def _header(weights: Path) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The metadata and the tensor list (name, shape, dtype) of a safetensors file's header."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = []
            for k in sorted(f.keys()):
                sl = f.get_slice(k)
                tensors.append({"name": k, "shape": list(sl.get_shape()), "dtype": sl.get_dtype()})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ExportError(f"{weights} is not a readable safetensors file: {e}") from e
    return meta, tensors


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export(mm: MorphogeneticModel, directory: str | Path, *, live: Live = "refuse") -> Path:
    """Write the folded model to `directory`: `model.safetensors` and `manifest.json`.

    Returns the manifest's path. Raises what `fold` raises, and `ExportError` for a seed
    that is not a blueprint module or host state that is not tensors.
    """
    plain = fold(mm, live=live)
    sites = []
    for slot in mm.slots.values():
        if slot.current_stage is not SeedStage.FOSSILIZED:
            continue
        kind = slot_kind(slot)
        site = slot.site_signature()
        ir = ir_of(slot.seed, site, slot.slot_id)
        sites.append({
            "site": slot.slot_id,
            "kind": kind,
            "fold": fold_rule(kind).name,
            "kernel_id": slot.kernel_id,
            "blueprint_id": slot.blueprint_id,
            "site_signature": json_format.MessageToDict(site),
            "ir": json_format.MessageToDict(ir),
            "ir_sha256": hashlib.sha256(_canonical(canonical_ir(ir))).hexdigest(),
        })
    state = plain.state_dict()
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ExportError(f"model state {odd} is not tensors (a module's get_extra_state); "
                          "safetensors holds tensors only")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    tmp = out / (WEIGHTS + ".tmp")
    core = {"format": FORMAT, "sites": sites, "host": type(mm.host).__qualname__, "weights": WEIGHTS}
    # Tensors shared between modules (tied weights) are stored once (save_model); the
    # manifest lists what the file's header really holds.
    save_model(plain, str(tmp), metadata={"format": FORMAT, _MANIFEST_SHA_KEY: _core_sha(core)})
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, weights)
    manifest = {**core, "tensors": _header(weights)[1], "weights_sha256": _sha256(weights),
                "weights_size": weights.stat().st_size}
    path = out / MANIFEST
    _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return path


_MANIFEST_KEYS = {"format", "sites", "host", "weights", "tensors", "weights_sha256", "weights_size"}
_SITE_KEYS = {"site", "kind", "fold", "kernel_id", "blueprint_id", "site_signature", "ir", "ir_sha256"}


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} does not exist; an export directory holds {MANIFEST} and {WEIGHTS}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path} is {size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or set(doc) != _MANIFEST_KEYS:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ExportError(f"{path}: manifest keys {keys}; expected {sorted(_MANIFEST_KEYS)}")
    if doc["format"] != FORMAT:
        raise ExportError(f"{path}: format {doc['format']!r}; this version reads {FORMAT!r}")
    if doc["weights"] != WEIGHTS:
        raise ExportError(f"{path}: weights file {doc['weights']!r}; exports name it {WEIGHTS!r}")
    if not isinstance(doc["sites"], list) or not all(
            isinstance(s, dict) and set(s) == _SITE_KEYS for s in doc["sites"]):
        raise ExportError(f"{path}: every site entry must have exactly the keys {sorted(_SITE_KEYS)}")
    if not isinstance(doc["tensors"], list) or not all(
            isinstance(t, dict) and set(t) == {"name", "shape", "dtype"} for t in doc["tensors"]):
        raise ExportError(f"{path}: every tensor entry must have exactly name, shape and dtype")
    return doc


def _check_weights(doc: dict[str, Any], weights: Path) -> None:
    if not weights.is_file():
        raise ExportError(f"{weights} does not exist")
    size = weights.stat().st_size
    if size != doc["weights_size"]:
        raise ExportError(f"{weights} is {size} bytes; the manifest says {doc['weights_size']}")
    digest = _sha256(weights)
    if digest != doc["weights_sha256"]:
        raise ExportError(f"{weights} has SHA-256 {digest}; the manifest says "
                          f"{doc['weights_sha256']} (the file or the manifest was changed)")
    core = {k: doc[k] for k in ("format", "sites", "host", "weights")}
    meta, header = _header(weights)
    if meta.get(_MANIFEST_SHA_KEY) != _core_sha(core):
        raise ExportError(f"{weights} was written for another manifest (the manifest's sites "
                          "were changed after export)")
    if header != doc["tensors"]:
        raise ExportError(f"{weights}: its tensors differ from the manifest's list")


def load_exported(host: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild an exported model onto `host`, a freshly constructed model of the same class.

    `host` is modified in place (its fossilized sites are replaced by their folded
    modules) and returned with the exported weights loaded.

    Raises:
        ExportError: a missing, malformed or tampered manifest or weights file, an IR that
            fails validation, or tensors that do not fit the rebuilt module.
    """
    directory = Path(directory)
    doc = _read_manifest(directory / MANIFEST)
    weights = directory / WEIGHTS
    _check_weights(doc, weights)
    for entry in doc["sites"]:
        where = entry["site"]
        if not isinstance(where, str) or not where:
            raise ExportError(f"site {where!r} of the manifest is not a slot id")
        _span(host, where)
        rule = fold_rule(entry["kind"])
        if rule.name != entry["fold"]:
            raise ExportError(f"site {where!r}: folded by {entry['fold']!r}, but slot kind "
                              f"{entry['kind']!r} folds by {rule.name!r} here")
        try:
            ir = json_format.ParseDict(entry["ir"], blueprint_pb2.BlueprintIR())
            site = json_format.ParseDict(entry["site_signature"], seed_pb2.SiteSignature())
        except json_format.ParseError as e:
            raise ExportError(f"site {where!r}: {e}") from e
        if hashlib.sha256(_canonical(canonical_ir(ir))).hexdigest() != entry["ir_sha256"]:
            raise ExportError(f"site {where!r}: its IR does not match its recorded SHA-256")
        try:
            seed = build_module(ir, site)
        except ArtifactError as e:
            raise ExportError(f"site {where!r}: {e}") from e
        except ValueError as e:  # BlueprintError: the IR fails validation for the site
            raise ExportError(f"site {where!r}: the IR is not valid for its site: {e}") from e
        _replace(host, where, rule, seed, rebuild=True)
    state = host.state_dict()
    for t in doc["tensors"]:
        have = state.get(t["name"])
        if have is None:
            raise ExportError(f"tensor {t['name']!r} of the export is not in the rebuilt "
                              f"{type(host).__name__} (another model class or version?)")
        dtype = _ST_DTYPES.get(have.dtype, str(have.dtype))
        if list(have.shape) != t["shape"] or dtype != t["dtype"]:
            raise ExportError(f"tensor {t['name']!r}: the rebuilt model has {list(have.shape)} "
                              f"{dtype}, the export {t['shape']} {t['dtype']}")
    try:
        load_model(host, str(weights), strict=True)
    except RuntimeError as e:
        raise ExportError(f"the weights do not fit the rebuilt {type(host).__name__}: {e}") from e
    return host
