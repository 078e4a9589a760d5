"""Real signed kernel artifacts for Urza's tests (built with esper.blueprints, never canned)."""

from __future__ import annotations

from esper.blueprints import build_module, builtin_blueprints, plan_ir, site_signature
from esper.blueprints.artifact import SigningKey, pack_kernel
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2


def blueprint(name: str = "lowrank_adapter") -> blueprint_pb2.Blueprint:
    return next(b for b in builtin_blueprints() if b.name == name)


def make_artifact(key: SigningKey, *, name: str = "lowrank_adapter", channels: int = 16,
                  layout: str = "NC", spatial: tuple[int, ...] = (), seed: int = 0,
                  tags: tuple[str, ...] = ()) -> tuple[str, bytes, seed_pb2.SiteSignature]:
    """(kernel_id, artifact bytes, site) of `name` compiled for a site of `channels`."""
    bp = blueprint(name)
    site = site_signature(layout, channels, spatial)
    module = build_module(bp, site, seed=seed)
    profile = kernel_pb2.KernelProfile(parameters=plan_ir(bp.ir, site).parameter_count,
                                       benchmark_device="cpu")
    validation = kernel_pb2.ValidationReport(shape_ok=True, forward_finite=True,
                                             backward_finite=True)
    kernel_id, data = pack_kernel(bp, site, module, profile, validation, key, tags=tags)
    return kernel_id, data, site


def flip_byte(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)
