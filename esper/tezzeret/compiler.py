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
    site_output_shape,
    site_shape,
    slot_kinds,
    supports,
)
from esper.blueprints.artifact import SigningKey, pack_kernel
from esper.blueprints.ir import check_site, layout_name
from esper.errors import FailedPreconditionError
from generated.esper.common.v1 import blueprint_pb2, kernel_pb2, seed_pb2

log = logging.getLogger(__name__)

INIT_TOLERANCE = 1e-6
"""Largest change of the host's output a freshly inserted seed may cause."""
_DEFAULT_EXTENT = {seed_pb2.ACTIVATION_LAYOUT_NCL: (32,), seed_pb2.ACTIVATION_LAYOUT_NCHW: (8, 8),
                   seed_pb2.ACTIVATION_LAYOUT_NLD: (16,), seed_pb2.ACTIVATION_LAYOUT_NC: ()}


class CompileError(FailedPreconditionError):
    """A blueprint built for a site but failed a check Tezzeret makes before signing."""

    reason = "COMPILE_VALIDATION_FAILED"


@dataclass(frozen=True)
class CompiledKernel:
    kernel_id: str
    artifact_bytes: bytes
    manifest: kernel_pb2.KernelManifest
    blueprint: blueprint_pb2.Blueprint


def _probe_shape(site: seed_pb2.SiteSignature, *, output: bool = False) -> tuple[int, ...]:
    """Concrete per-sample shape of the seed's input (or, with `output`, of what it returns).

    Extents that vary get the layout's default, the same for input and output.
    """
    shape = site_output_shape(site) if output else site_shape(site)
    defaults = list(_DEFAULT_EXTENT[site.layout])
    out = []
    spatial_i = 0
    for i, d in enumerate(shape):
        is_channel = (i == 1) if site.layout == seed_pb2.ACTIVATION_LAYOUT_NLD else (i == 0)
        if is_channel:
            out.append(d)
        else:
            out.append(d if d is not None else defaults[spatial_i])
            spatial_i += 1
    return tuple(out)


def validate_kernel(module: torch.nn.Module, site: seed_pb2.SiteSignature, *, seed: int = 0
                    ) -> kernel_pb2.ValidationReport:
    """Check shape, function preservation at init (blend y = h + s) and finite fwd/bwd.

    `h` stands for the host's activation at the site and `x` for the seed's input: the
    same shape for an output slot, the wrapped module's output and input for a parallel one.
    """
    gen = torch.Generator().manual_seed(seed)
    probe = _probe_shape(site)
    out_probe = _probe_shape(site, output=True)
    # Drawn in the order (h, x, target) used before parallel slots existed, and with the
    # same notes below, so an output slot's report (part of the signed manifest, hence of
    # the kernel id) is exactly what it was.
    h = torch.randn(4, *out_probe, generator=gen)
    x = torch.randn(4, *probe, generator=gen)
    s = module(x)
    report = kernel_pb2.ValidationReport(shape_ok=tuple(s.shape) == tuple(h.shape))
    if is_parallel(site):
        report.notes.append(f"parallel slot: probed at per-sample input shape {list(probe)}, "
                            f"output shape {list(out_probe)}, batch 4")
    else:
        report.notes.append(f"probed at per-sample shape {list(probe)}, batch 4")
    if not report.shape_ok:
        what = "site output" if is_parallel(site) else "input"
        report.notes.append(f"seed output {list(s.shape)} != {what} {list(h.shape)}")
        return report
    y = h + s
    report.init_max_abs_delta = float((y - h).detach().abs().max())
    report.forward_finite = bool(torch.isfinite(s.detach()).all())
    target = torch.randn(4, *out_probe, generator=gen)
    loss = (y - target).pow(2).mean()
    module.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    report.backward_finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    learning = sum(1 for g in grads if g is not None and bool(g.abs().sum() > 0))
    report.notes.append(f"{learning}/{len(grads)} parameter tensors receive gradient at init")
    module.zero_grad(set_to_none=True)
    return report


def profile_kernel(module: torch.nn.Module, site: seed_pb2.SiteSignature, *, batch_size: int,
                   iters: int) -> kernel_pb2.KernelProfile:
    """Parameters, forward FLOPs per sample and forward latency (p50/p99, µs)."""
    probe = _probe_shape(site)
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
    failures = []
    if not report.shape_ok:
        failures.append("output shape differs from the site's")
    if report.init_max_abs_delta > INIT_TOLERANCE:
        failures.append(f"output changes by {report.init_max_abs_delta:.3g} at init "
                        f"(> {INIT_TOLERANCE})")
    if not report.forward_finite:
        failures.append("forward produced NaN/Inf")
    if not report.backward_finite:
        failures.append("backward produced NaN/Inf gradients")
    if failures:
        raise CompileError(f"blueprint {blueprint.blueprint_id} at {site_key(site)}: "
                           + "; ".join(failures))
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
