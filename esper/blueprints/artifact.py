"""Kernel artifact format: pack, sign, verify and materialise (no code ever runs from one).

An artifact is a serialized `esper.common.v1.KernelArtifact{manifest, signature, ir, weights}`.
`kernel_id = "sha256:" + sha256(manifest bytes)`; the manifest holds the SHA-256 of the IR and
weights parts, the tensor specs, profile, validation report and the signing key id; the
signature is Ed25519 over the manifest bytes. Weights are safetensors, whose header is parsed
and bounded here by hand before the safetensors library sees a byte of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from esper.blueprints.builder import construct
from esper.blueprints.ir import IRPlan, blueprint_id, plan_ir
from esper.errors import ArtifactError, BlueprintError, ConfigError, UntrustedKeyError
from esper.fsutil import atomic_write
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2

FORMAT_VERSION = 1
MAX_ARTIFACT_BYTES = 256 << 20
"""Matches the `total_size` bound of Urza's upload header."""
MAX_HEADER_BYTES = 1 << 20
"""Largest safetensors JSON header accepted (the library itself allows 100 MB)."""
MAX_TENSORS = 1024
MAX_TENSOR_RANK = 8

_ST_DTYPES: dict[str, tuple[int, torch.dtype, int]] = {
    "F32": (seed_pb2.D_TYPE_FLOAT32, torch.float32, 4),
    "F16": (seed_pb2.D_TYPE_FLOAT16, torch.float16, 2),
    "BF16": (seed_pb2.D_TYPE_BFLOAT16, torch.bfloat16, 2),
    "F64": (seed_pb2.D_TYPE_FLOAT64, torch.float64, 8),
}
_TORCH_TO_PROTO = {t: p for p, t, _ in _ST_DTYPES.values()}


class ArtifactFormatError(ArtifactError):
    """The artifact's bytes do not parse as a bounded KernelArtifact."""

    reason = "ARTIFACT_MALFORMED"


class ArtifactIntegrityError(ArtifactError):
    """A hash, size or kernel id does not match what the manifest or caller says."""

    reason = "ARTIFACT_HASH_MISMATCH"


class ArtifactSignatureError(ArtifactError):
    """The signature does not verify under the key the manifest names."""

    reason = "ARTIFACT_BAD_SIGNATURE"


class ArtifactWeightsError(ArtifactError):
    """The safetensors part breaks a bound or disagrees with the manifest or the IR."""

    reason = "ARTIFACT_BAD_WEIGHTS"


class ArtifactIRError(ArtifactError):
    """The IR part does not parse or does not validate for the manifest's site."""

    reason = "ARTIFACT_BAD_IR"


# ----------------------------------------------------------------------------- keys


def key_id_of(public_raw: bytes) -> str:
    """First 16 hex chars of SHA-256 of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SigningKey:
    """An Ed25519 private key that signs kernel manifests."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_raw = _raw_public(private.public_key())
        self.key_id = key_id_of(self.public_raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "key") -> SigningKey:
        """Parse a PEM (PKCS#8) private key or 64 hex chars of the raw 32-byte seed."""
        text = data.strip()
        try:
            if text.startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(text, password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise ConfigError(f"{source}: PEM key is {type(key).__name__}, not Ed25519")
                return cls(key)
            raw = bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not an Ed25519 private key (PEM PKCS#8 or 64 hex "
                              f"chars): {e}") from e
        if len(raw) != 32:
            raise ConfigError(f"{source}: raw Ed25519 key must be 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_file(cls, path: str | Path) -> SigningKey:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"signing key file {str(p)!r} does not exist")
        return cls.from_bytes(p.read_bytes(), source=str(p))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SigningKey:
        """From ESPER_SIGNING_KEY (PEM or hex) or ESPER_SIGNING_KEY_FILE (a path)."""
        env = os.environ if env is None else env
        if env.get("ESPER_SIGNING_KEY"):
            return cls.from_bytes(env["ESPER_SIGNING_KEY"].encode(), source="ESPER_SIGNING_KEY")
        if env.get("ESPER_SIGNING_KEY_FILE"):
            return cls.from_file(env["ESPER_SIGNING_KEY_FILE"])
        raise ConfigError("no signing key: set ESPER_SIGNING_KEY (PEM or 64 hex chars) or "
                          "ESPER_SIGNING_KEY_FILE (path to a PEM file)")

    @classmethod
    def load_or_create(cls, path: str | Path) -> SigningKey:
        """Load the key at `path`, creating it (mode 0600, atomically) on first use."""
        p = Path(path)
        if p.exists():
            return cls.from_file(p)
        key = cls.generate()
        key.save(p)
        return key

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        pem = self._private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        atomic_write(p, pem, mode=0o600)

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


class TrustedKeys:
    """The Ed25519 public keys whose signatures a loader accepts, by key id."""

    def __init__(self, keys: Iterable[bytes | Ed25519PublicKey | SigningKey] = ()):
        self._keys: dict[str, Ed25519PublicKey] = {}
        for k in keys:
            self.add(k)

    def add(self, key: bytes | Ed25519PublicKey | SigningKey) -> str:
        """Trust a key (raw 32 bytes, a public key object, or a signing key's public half)."""
        if isinstance(key, SigningKey):
            key = key.public_raw
        if isinstance(key, bytes):
            if len(key) != 32:
                raise ConfigError(f"raw Ed25519 public key must be 32 bytes, got {len(key)}")
            key = Ed25519PublicKey.from_public_bytes(key)
        kid = key_id_of(_raw_public(key))
        self._keys[kid] = key
        return kid

    def add_file(self, path: str | Path) -> str:
        """Trust the key in a PEM (SubjectPublicKeyInfo) or hex (64 chars) file."""
        p = Path(path)
        data = p.read_bytes().strip()
        try:
            if data.startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(data)
                if not isinstance(key, Ed25519PublicKey):
                    raise ConfigError(f"{p}: PEM key is {type(key).__name__}, not Ed25519")
                return self.add(key)
            return self.add(bytes.fromhex(data.decode("ascii")))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not an Ed25519 public key (PEM or 64 hex chars): {e}") from e

    @classmethod
    def from_dir(cls, directory: str | Path) -> TrustedKeys:
        """Every `*.pub` / `*.pem` file in `directory`."""
        d = Path(directory)
        if not d.is_dir():
            raise ConfigError(f"trusted keys directory {str(d)!r} does not exist")
        tk = cls()
        for p in sorted(d.iterdir()):
            if p.suffix in (".pub", ".pem") and p.is_file():
                tk.add_file(p)
        return tk

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrustedKeys:
        """From ESPER_TRUSTED_KEYS_DIR (a directory of public keys)."""
        env = os.environ if env is None else env
        if not env.get("ESPER_TRUSTED_KEYS_DIR"):
            raise ConfigError("no trusted keys: set ESPER_TRUSTED_KEYS_DIR to a directory of "
                              "Ed25519 public keys (*.pub or *.pem)")
        return cls.from_dir(env["ESPER_TRUSTED_KEYS_DIR"])

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)


# ----------------------------------------------------------------------------- packing


def kernel_id_of(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def pack_kernel(bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature, module: nn.Module,
                profile: kernel_pb2.KernelProfile, validation: kernel_pb2.ValidationReport,
                key: SigningKey, *, tags: Iterable[str] = ()) -> tuple[str, bytes]:
    """Write and sign the artifact for `module` (built from `bp` for `site`).

    Returns (kernel_id, artifact_bytes). Same inputs → same bytes (no timestamps inside).
    """
    plan = plan_ir(bp.ir, site)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != plan.tensor_specs():
        raise ArtifactError(f"module tensors {got} do not match the IR's {plan.tensor_specs()}")
    for k, v in state.items():
        if v.dtype not in _TORCH_TO_PROTO:
            raise ArtifactError(f"tensor {k!r} has dtype {v.dtype}; allowed: "
                                f"{sorted(str(t) for t in _TORCH_TO_PROTO)}")
    weights = save_safetensors_bytes(state)
    ir_bytes = bp.ir.SerializeToString(deterministic=True)
    manifest = kernel_pb2.KernelManifest(
        format_version=FORMAT_VERSION,
        blueprint_id=bp.blueprint_id or blueprint_id(bp),
        blueprint_name=bp.name, family=bp.family, site=site,
        ir_sha256=hashlib.sha256(ir_bytes).hexdigest(),
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        weights_size=len(weights),
        tensors=[seed_pb2.TensorSpec(name=k, shape=list(v.shape), dtype=_TORCH_TO_PROTO[v.dtype])
                 for k, v in sorted(state.items())],
        profile=profile, validation=validation, key_id=key.key_id, tags=sorted(set(tags)))
    manifest_bytes = manifest.SerializeToString(deterministic=True)
    artifact = kernel_pb2.KernelArtifact(manifest=manifest_bytes,
                                         signature=key.sign(manifest_bytes),
                                         ir=ir_bytes, weights=weights)
    return kernel_id_of(manifest_bytes), artifact.SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class VerifiedKernel:
    """An artifact whose signature, hashes, IR and weights all checked out."""

    kernel_id: str
    manifest: kernel_pb2.KernelManifest
    ir: blueprint_pb2.BlueprintIR
    plan: IRPlan
    tensors: dict[str, torch.Tensor]
    artifact_size: int

    @property
    def site(self) -> seed_pb2.SiteSignature:
        return self.manifest.site


def verify_artifact(data: bytes, trusted: TrustedKeys, *, expected_kernel_id: str | None = None,
                    max_size: int = MAX_ARTIFACT_BYTES) -> VerifiedKernel:
    """Check everything about an artifact before any module is built from it.

    Raises:
        UntrustedKeyError: signed by a key id not in `trusted`.
        ArtifactError (a subclass naming the failed check): anything else.
    """
    if len(data) > max_size:
        raise ArtifactFormatError(f"artifact is {len(data)} bytes; the bound is {max_size}")
    artifact = kernel_pb2.KernelArtifact()
    try:
        artifact.ParseFromString(data)
    except DecodeError as e:
        raise ArtifactFormatError(f"artifact bytes are not a KernelArtifact message: {e}") from e
    if not artifact.manifest or not artifact.signature or not artifact.ir or not artifact.weights:
        missing = [f for f in ("manifest", "signature", "ir", "weights")
                   if not getattr(artifact, f)]
        raise ArtifactFormatError(f"artifact is missing parts {missing}")
    kernel_id = kernel_id_of(artifact.manifest)
    if expected_kernel_id is not None and kernel_id != expected_kernel_id:
        raise ArtifactIntegrityError(f"artifact's manifest hashes to {kernel_id}, not the "
                                     f"requested {expected_kernel_id}")
    manifest = kernel_pb2.KernelManifest()
    try:
        manifest.ParseFromString(artifact.manifest)
    except DecodeError as e:
        raise ArtifactFormatError(f"manifest is not a KernelManifest message: {e}") from e

    public = trusted.get(manifest.key_id)
    if public is None:
        raise UntrustedKeyError(f"kernel {kernel_id} is signed by key id {manifest.key_id!r}, "
                                f"which is not trusted (trusted: {trusted.key_ids}); add its "
                                "public key to ESPER_TRUSTED_KEYS_DIR if you trust it")
    try:
        public.verify(artifact.signature, artifact.manifest)
    except InvalidSignature as e:
        raise ArtifactSignatureError(f"kernel {kernel_id}: signature does not verify under key "
                                     f"{manifest.key_id}") from e
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactFormatError(f"manifest format_version={manifest.format_version}; this "
                                  f"loader reads {FORMAT_VERSION}")

    ir_hash = hashlib.sha256(artifact.ir).hexdigest()
    if ir_hash != manifest.ir_sha256:
        raise ArtifactIntegrityError(f"IR part hashes to {ir_hash}, manifest says "
                                     f"{manifest.ir_sha256}")
    weights_hash = hashlib.sha256(artifact.weights).hexdigest()
    if weights_hash != manifest.weights_sha256 or len(artifact.weights) != manifest.weights_size:
        raise ArtifactIntegrityError(
            f"weights part is {len(artifact.weights)} bytes hashing to {weights_hash}; manifest "
            f"says {manifest.weights_size} bytes, {manifest.weights_sha256}")

    ir = blueprint_pb2.BlueprintIR()
    try:
        ir.ParseFromString(artifact.ir)
        plan = plan_ir(ir, manifest.site)
    except DecodeError as e:
        raise ArtifactIRError(f"IR part is not a BlueprintIR message: {e}") from e
    except BlueprintError as e:
        raise ArtifactIRError(f"IR part fails validation for the manifest's site: {e}") from e

    header = parse_safetensors_header(artifact.weights)
    _check_tensors(header, manifest, plan)
    try:
        tensors = load_safetensors_bytes(artifact.weights)  # no code runs: safetensors
    except Exception as e:  # safetensors raises its own SafetensorError; surface it typed
        raise ArtifactWeightsError(f"safetensors rejected the weights: {e}") from e
    return VerifiedKernel(kernel_id=kernel_id, manifest=manifest, ir=ir, plan=plan,
                          tensors=tensors, artifact_size=len(data))


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_safetensors_header(data: bytes, *, max_header: int = MAX_HEADER_BYTES,
                             max_tensors: int = MAX_TENSORS) -> dict[str, HeaderEntry]:
    """Parse and bound a safetensors header by hand.

    Checks: the length prefix fits the bound and the file; the header is a JSON object of
    at most `max_tensors` entries; each entry has an allowlisted dtype, a bounded shape and
    offsets in range whose size matches the shape; the entries tile the data section exactly
    (no overlap, no gaps, nothing after).

    Raises:
        ArtifactWeightsError: naming the entry and the bound it breaks.
    """
    if len(data) < 8:
        raise ArtifactWeightsError(f"weights are {len(data)} bytes: truncated before the "
                                   "8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > max_header:
        raise ArtifactWeightsError(f"safetensors header length {n} exceeds the bound "
                                   f"{max_header}")
    if 8 + n > len(data):
        raise ArtifactWeightsError(f"safetensors header length {n} runs past the end of "
                                   f"{len(data)} bytes (truncated file)")
    try:
        doc = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactWeightsError(f"safetensors header is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ArtifactWeightsError(f"safetensors header is a {type(doc).__name__}, not an object")
    meta = doc.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise ArtifactWeightsError("safetensors __metadata__ must map strings to strings")
    if len(doc) > max_tensors:
        raise ArtifactWeightsError(f"safetensors header lists {len(doc)} tensors; the bound is "
                                   f"{max_tensors}")
    data_len = len(data) - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for name, e in doc.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactWeightsError(f"tensor {name!r}: entry must have exactly dtype, shape, "
                                       "data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ArtifactWeightsError(f"tensor {name!r}: dtype {dtype!r} not allowed; allowed: "
                                       f"{sorted(_ST_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise ArtifactWeightsError(f"tensor {name!r}: shape {shape!r} must be a list of at "
                                       f"most {MAX_TENSOR_RANK} non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ArtifactWeightsError(f"tensor {name!r}: data_offsets {offsets!r} out of range "
                                       f"[0, {data_len}]")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * _ST_DTYPES[dtype][2]:
            raise ArtifactWeightsError(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes at {offsets} but shape "
                f"{shape} of {dtype} needs {numel * _ST_DTYPES[dtype][2]}")
        entries[name] = HeaderEntry(dtype, tuple(shape), offsets[0], offsets[1])
    pos = 0
    for name, ent in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if ent.begin != pos:
            kind = "overlaps the previous tensor" if ent.begin < pos else "leaves a gap"
            raise ArtifactWeightsError(f"tensor {name!r} at {ent.begin} {kind} (expected {pos})")
        pos = ent.end
    if pos != data_len:
        raise ArtifactWeightsError(f"tensors cover {pos} of {data_len} data bytes; trailing or "
                                   "missing data")
    return entries


def _check_tensors(header: dict[str, HeaderEntry], manifest: kernel_pb2.KernelManifest,
                   plan: IRPlan) -> None:
    declared = {t.name: t for t in manifest.tensors}
    expected = plan.tensor_specs()
    if set(header) != set(declared) or set(header) != set(expected):
        raise ArtifactWeightsError(
            f"tensor names differ: weights {sorted(header)}, manifest {sorted(declared)}, "
            f"IR {sorted(expected)}")
    for name, ent in header.items():
        spec = declared[name]
        if ent.shape != tuple(spec.shape) or ent.shape != expected[name]:
            raise ArtifactWeightsError(f"tensor {name!r}: shape {list(ent.shape)} in weights, "
                                       f"{list(spec.shape)} in manifest, {list(expected[name])} "
                                       "from the IR")
        if _ST_DTYPES[ent.dtype][0] != spec.dtype:
            raise ArtifactWeightsError(
                f"tensor {name!r}: dtype {ent.dtype} in weights, "
                f"{seed_pb2.DType.Name(spec.dtype)} in manifest")


def materialize(vk: VerifiedKernel) -> nn.Module:
    """A fresh module with the artifact's weights (its own copy: each seed trains its own)."""
    module = construct(vk.plan)
    params = dict(module.named_parameters())
    if set(params) != set(vk.tensors):  # verify_artifact checked this; the plan guarantees it
        raise ArtifactWeightsError(f"module parameters {sorted(params)} differ from the "
                                   f"artifact's tensors {sorted(vk.tensors)}")
    with torch.no_grad():
        for name, p in params.items():
            t = vk.tensors[name]
            if p.dtype != t.dtype:
                p.data = torch.empty_like(t)
            p.copy_(t)
    return module
