"""A corpus of hostile kernel artifacts (shared by the loader tests and Urza's gRPC tests).

Each case is built from a genuine kernel: the "resigned" ones are re-signed with the
trusted key after tampering, so they get past the signature and exercise the deeper
checks (safetensors bounds, IR validation, names/shapes/dtypes) that must hold even
against a leaked or careless signer.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from dataclasses import dataclass

import safetensors.torch
import torch

from esper.blueprints import build_module, builtin_blueprints, node, site_signature
from esper.blueprints.artifact import (
    ArtifactFormatError,
    ArtifactIntegrityError,
    ArtifactIRError,
    ArtifactSignatureError,
    ArtifactWeightsError,
    SigningKey,
    kernel_id_of,
    pack_kernel,
)
from esper.errors import ArtifactError, UntrustedKeyError
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2

SITE = site_signature("NCHW", 4, (5, 5))


class CanaryPayload:
    """Unpickling this creates the canary file: proof that code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass(frozen=True)
class Case:
    data: bytes
    kernel_id: str
    """The id a client would ask for (the genuine one for in-flight tampering)."""
    error: type[ArtifactError] | tuple[type[ArtifactError], ...]


def genuine(key: SigningKey) -> tuple[str, bytes]:
    bp = next(b for b in builtin_blueprints() if b.name == "conv3x3_residual")
    module = build_module(bp, SITE)
    return pack_kernel(bp, SITE, module, kernel_pb2.KernelProfile(parameters=1),
                       kernel_pb2.ValidationReport(shape_ok=True), key)


def _parts(data: bytes) -> tuple[kernel_pb2.KernelArtifact, kernel_pb2.KernelManifest]:
    art = kernel_pb2.KernelArtifact.FromString(data)
    return art, kernel_pb2.KernelManifest.FromString(art.manifest)


def resign(data: bytes, key: SigningKey, *, weights: bytes | None = None,
           ir: blueprint_pb2.BlueprintIR | None = None,
           tensors: list[seed_pb2.TensorSpec] | None = None) -> tuple[str, bytes]:
    """Replace parts, fix up the manifest's hashes and sign it again with `key`."""
    art, man = _parts(data)
    if weights is not None:
        art.weights = weights
        man.weights_sha256 = hashlib.sha256(weights).hexdigest()
        man.weights_size = len(weights)
    if ir is not None:
        art.ir = ir.SerializeToString()
        man.ir_sha256 = hashlib.sha256(art.ir).hexdigest()
    if tensors is not None:
        del man.tensors[:]
        man.tensors.extend(tensors)
    man.key_id = key.key_id
    art.manifest = man.SerializeToString()
    art.signature = key.sign(art.manifest)
    return kernel_id_of(art.manifest), art.SerializeToString()


def _flip(data: bytes, part: str) -> bytes:
    art, _ = _parts(data)
    raw = bytearray(getattr(art, part))
    raw[len(raw) // 2] ^= 0x01
    setattr(art, part, bytes(raw))
    return art.SerializeToString()


def _header_weights(header: dict, data_len: int) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\0" * data_len


def _real_header(weights: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def corpus(key: SigningKey, untrusted: SigningKey, canary: str) -> dict[str, Case]:
    kid, data = genuine(key)
    art, _ = _parts(data)
    header, body = _real_header(art.weights)
    cases: dict[str, Case] = {}

    def signed(name: str, err, **kw) -> None:
        new_id, new = resign(data, key, **kw)
        cases[name] = Case(new, new_id, err)

    pickled = pickle.dumps({"nodes.conv1.weight": CanaryPayload(canary)})
    signed("pickle_as_weights_signed", ArtifactWeightsError, weights=pickled)
    art_p = kernel_pb2.KernelArtifact.FromString(data)
    art_p.weights = pickled
    cases["pickle_as_weights_unsigned"] = Case(art_p.SerializeToString(), kid,
                                               ArtifactIntegrityError)
    cases["pickle_as_whole_artifact"] = Case(pickle.dumps(CanaryPayload(canary)), kid,
                                             ArtifactFormatError)
    signed("header_100mb", ArtifactWeightsError,
           weights=struct.pack("<Q", 100 * 1024 * 1024) + b"{}" + b"\0" * 64)
    many = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
            for i in range(100_000)}
    signed("entries_100k", ArtifactWeightsError, weights=_header_weights(many, 400_000))
    few = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
           for i in range(5000)}
    signed("entries_5k_small_header", ArtifactWeightsError, weights=_header_weights(few, 20_000))
    signed("truncated_weights", ArtifactWeightsError, weights=art.weights[: len(art.weights) // 2])
    cases["truncated_artifact"] = Case(data[: len(data) - 300], kid, ArtifactError)

    overlap = json.loads(json.dumps(header))
    ordered = sorted((k for k in overlap if k != "__metadata__"),
                     key=lambda k: overlap[k]["data_offsets"][0])
    last = overlap[ordered[-1]]["data_offsets"]
    overlap[ordered[-1]]["data_offsets"] = [last[0] - 4, last[1] - 4]
    blob = json.dumps(overlap).encode()
    signed("overlapping_offsets", ArtifactWeightsError,
           weights=struct.pack("<Q", len(blob)) + blob + body)

    state = safetensors.torch.load(art.weights)
    bad_shape = dict(state)
    bad_shape["nodes.conv1.weight"] = state["nodes.conv1.weight"].reshape(4, 4, 9).contiguous()
    bs_weights = safetensors.torch.save(bad_shape)
    signed("wrong_shape_vs_manifest", ArtifactWeightsError, weights=bs_weights)
    specs = [seed_pb2.TensorSpec(name=k, shape=list(v.shape), dtype=seed_pb2.D_TYPE_FLOAT32)
             for k, v in sorted(bad_shape.items())]
    signed("wrong_shape_vs_ir", ArtifactWeightsError, weights=bs_weights, tensors=specs)
    bad_dtype = {k: v.double() for k, v in state.items()}
    signed("wrong_dtype_vs_manifest", ArtifactWeightsError,
           weights=safetensors.torch.save(bad_dtype))
    int_dtype = dict(state)
    int_dtype["nodes.conv1.bias"] = torch.zeros(4, dtype=torch.int32)
    signed("dtype_not_allowed", ArtifactWeightsError, weights=safetensors.torch.save(int_dtype))

    evil_ir = blueprint_pb2.BlueprintIR.FromString(art.ir)
    evil_ir.nodes[0].op = "python_eval"
    signed("unknown_op", ArtifactIRError, ir=evil_ir)
    cyclic = blueprint_pb2.BlueprintIR(ir_version=1, output="b", nodes=[
        node("a", "conv2d", ["b"], kernel_size=3), node("b", "conv2d", ["a"], zero_init=True)])
    signed("cyclic_ir", ArtifactIRError, ir=cyclic)

    cases["flip_weights"] = Case(_flip(data, "weights"), kid, ArtifactIntegrityError)
    cases["flip_ir"] = Case(_flip(data, "ir"), kid, ArtifactIntegrityError)
    # A flipped manifest no longer hashes to the id the client asked for.
    cases["flip_manifest"] = Case(_flip(data, "manifest"), kid, ArtifactIntegrityError)
    cases["flip_signature"] = Case(_flip(data, "signature"), kid, ArtifactSignatureError)
    signed_by_other = resign(data, untrusted)
    cases["untrusted_key"] = Case(signed_by_other[1], signed_by_other[0], UntrustedKeyError)
    return cases
