"""Tezzeret's core: (blueprint, site) → a validated, profiled, signed kernel artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from esper.blueprints import (
    build_module,
    builtin_blueprints,
    is_parallel,
    plan_ir,
    site_key,
    slot_kinds,
    supports,
)
from esper.blueprints.artifact import SigningKey, pack_kernel
from esper.blueprints.check import INIT_TOLERANCE, failures, probe_shape, validate_kernel
from esper.blueprints.ir import check_site, layout_name
from esper.errors import FailedPreconditionError
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2

log = logging.getLogger(__name__)

__all__ = ["INIT_TOLERANCE", "CompileError", "CompiledKernel", "compile_catalog", "compile_kernel",
           "profile_kernel", "validate_kernel"]
"""`INIT_TOLERANCE` and `validate_kernel` are `esper.blueprints.check`'s, shared with Karn."""


class CompileError(FailedPreconditionError):
    """A blueprint built for a site but failed a check Tezzeret makes before signing."""

    reason = "COMPILE_VALIDATION_FAILED"


@dataclass(frozen=True)
class CompiledKernel:
    kernel_id: str
    artifact_bytes: bytes
    manifest: kernel_pb2.KernelManifest
    blueprint: blueprint_pb2.Blueprint


def profile_kernel(module: torch.nn.Module, site: seed_pb2.SiteSignature, *, batch_size: int,
                   iters: int) -> kernel_pb2.KernelProfile:
    """Parameters, forward FLOPs per sample and forward latency (p50/p99, µs)."""
    probe = probe_shape(site)
    prof = kernel_pb2.KernelProfile(
        parameters=sum(p.numel() for p in module.parameters()),
        benchmark_batch_size=batch_size if iters else 0,
        benchmark_device="cpu" if iters else "")
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            module(torch.zeros(1, *probe))
        prof.forward_flops_per_sample = int(counter.get_total_flops())
        if iters:
            x = torch.randn(batch_size, *probe)
            for _ in range(min(3, iters)):
                module(x)
            samples = []
            for _ in range(iters):
                t0 = time.perf_counter()
                module(x)
                samples.append((time.perf_counter() - t0) * 1e6)
            samples.sort()
            prof.latency_us_p50 = samples[len(samples) // 2]
            prof.latency_us_p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    return prof


def compile_kernel(blueprint: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature,
                   signing_key: SigningKey, *, seed: int = 0, benchmark_iters: int = 20,
                   benchmark_batch_size: int = 8) -> CompiledKernel:
    """Build, validate, profile and sign a kernel.

    Weights depend only on (blueprint, site, seed) and the manifest has no timestamp, so
    with `benchmark_iters=0` compiling twice gives the same kernel id; measured latencies
    make ids differ between compiles, which is why the service is idempotent through its
    job store and Urza's records rather than by recompiling.

    Raises:
        BlueprintError: the IR is invalid for this site.
        FailedPreconditionError: the blueprint does not declare the site's layout.
        CompileError: a validation check failed (the message says which).
    """
    check_site(site)
    if site.layout not in blueprint.layouts:
        raise FailedPreconditionError(
            f"blueprint {blueprint.blueprint_id or blueprint.name} supports layouts "
            f"{[layout_name(x) for x in blueprint.layouts]}, not {layout_name(site.layout)}")
    if site.kind not in slot_kinds(blueprint):
        kinds = sorted(seed_pb2.SlotKind.Name(k) for k in slot_kinds(blueprint))
        raise FailedPreconditionError(
            f"blueprint {blueprint.blueprint_id or blueprint.name} serves slot kinds {kinds}, "
            f"not {seed_pb2.SlotKind.Name(site.kind)} (site {site_key(site)})")
    plan_ir(blueprint.ir, site)
    module = build_module(blueprint, site, seed=seed)
    report = validate_kernel(module, site, seed=seed)
    failed = failures(report)
    if failed:
        raise CompileError(f"blueprint {blueprint.blueprint_id} at {site_key(site)}: "
                           + "; ".join(failed))
    profile = profile_kernel(module, site, batch_size=benchmark_batch_size, iters=benchmark_iters)
    kernel_id, data = pack_kernel(blueprint, site, module, profile, report, signing_key,
                                  tags=blueprint.tags)
    manifest = kernel_pb2.KernelManifest.FromString(
        kernel_pb2.KernelArtifact.FromString(data).manifest)
    return CompiledKernel(kernel_id, data, manifest, blueprint)


def compile_catalog(sites: Iterable[seed_pb2.SiteSignature], signing_key: SigningKey, *,
                    blueprints: Iterable[blueprint_pb2.Blueprint] | None = None,
                    publish: Callable[[CompiledKernel], None] | None = None,
                    benchmark_iters: int = 20) -> list[CompiledKernel]:
    """Compile every (built-in) blueprint for every site whose layout and slot kind it serves.

    At a parallel site a blueprint whose IR cannot map the module's input to its output
    (e.g. a conv branch across a strided convolution) has no kernel there and is skipped;
    at an output site such a blueprint is an error, as it always was.
    `publish` (e.g. a Urza upload) is called with each kernel as soon as it is compiled.
    """
    out = []
    bps = list(builtin_blueprints() if blueprints is None else blueprints)
    for site in sites:
        for bp in bps:
            if site.layout not in bp.layouts or site.kind not in slot_kinds(bp):
                continue
            if is_parallel(site) and not supports(bp, site):
                continue
            ck = compile_kernel(bp, site, signing_key, benchmark_iters=benchmark_iters)
            if publish is not None:
                publish(ck)
            log.info("compiled %s (%s) for %s → %s", bp.name, bp.blueprint_id, site_key(site),
                     ck.kernel_id)
            out.append(ck)
    return out
