"""The numerical checks a kernel passes before it is signed (Tezzeret) or proposed (Karn).

A seed built from a blueprint for a site must, with its initial weights: return the shape
the site adds it to, leave the host's output unchanged within `INIT_TOLERANCE` (the blend
`y = h + s`), and give finite outputs and gradients. `validate_kernel` measures that into
the `ValidationReport` a kernel's signed manifest carries; `failures` says which checks a
report fails. Output slots and parallel slots alike: a parallel seed reads the wrapped
module's input and returns its output shape (`site_shape` / `site_output_shape`).
"""

from __future__ import annotations

import torch

from esper.blueprints.ir import is_parallel, site_output_shape, site_shape
from generated.esper.common.v1 import kernel_pb2, seed_pb2

INIT_TOLERANCE = 1e-6
"""Largest change of the host's output a freshly inserted seed may cause."""
PROBE_EXTENT: dict[int, tuple[int, ...]] = {
    seed_pb2.ACTIVATION_LAYOUT_NCL: (32,), seed_pb2.ACTIVATION_LAYOUT_NCHW: (8, 8),
    seed_pb2.ACTIVATION_LAYOUT_NLD: (16,), seed_pb2.ACTIVATION_LAYOUT_NC: ()}
"""Extents the probe gives a site's dimensions that vary (sequence length, H×W)."""
PROBE_BATCH = 4


def probe_shape(site: seed_pb2.SiteSignature, *, output: bool = False) -> tuple[int, ...]:
    """Concrete per-sample shape of the seed's input (or, with `output`, of what it returns).

    Extents that vary get the layout's `PROBE_EXTENT`, the same for input and output.
    """
    shape = site_output_shape(site) if output else site_shape(site)
    defaults = list(PROBE_EXTENT[site.layout])
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
    probe = probe_shape(site)
    out_probe = probe_shape(site, output=True)
    # Drawn in the order (h, x, target) used before parallel slots existed, and with the
    # same notes below, so an output slot's report (part of the signed manifest, hence of
    # the kernel id) is exactly what it was.
    h = torch.randn(PROBE_BATCH, *out_probe, generator=gen)
    x = torch.randn(PROBE_BATCH, *probe, generator=gen)
    s = module(x)
    report = kernel_pb2.ValidationReport(shape_ok=tuple(s.shape) == tuple(h.shape))
    if is_parallel(site):
        report.notes.append(f"parallel slot: probed at per-sample input shape {list(probe)}, "
                            f"output shape {list(out_probe)}, batch {PROBE_BATCH}")
    else:
        report.notes.append(f"probed at per-sample shape {list(probe)}, batch {PROBE_BATCH}")
    if not report.shape_ok:
        what = "site output" if is_parallel(site) else "input"
        report.notes.append(f"seed output {list(s.shape)} != {what} {list(h.shape)}")
        return report
    y = h + s
    report.init_max_abs_delta = float((y - h).detach().abs().max())
    report.forward_finite = bool(torch.isfinite(s.detach()).all())
    target = torch.randn(PROBE_BATCH, *out_probe, generator=gen)
    loss = (y - target).pow(2).mean()
    module.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    report.backward_finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    learning = sum(1 for g in grads if g is not None and bool(g.abs().sum() > 0))
    report.notes.append(f"{learning}/{len(grads)} parameter tensors receive gradient at init")
    module.zero_grad(set_to_none=True)
    return report


def failures(report: kernel_pb2.ValidationReport) -> list[str]:
    """The checks `report` fails, in words (empty: the kernel may be signed)."""
    out = []
    if not report.shape_ok:
        out.append("output shape differs from the site's")
        # The other checks did not run: a wrong shape cannot be blended.
        return out + [n for n in report.notes if n.startswith("seed output")]
    if report.init_max_abs_delta > INIT_TOLERANCE:
        out.append(f"output changes by {report.init_max_abs_delta:.3g} at init "
                   f"(> {INIT_TOLERANCE})")
    if not report.forward_finite:
        out.append("forward produced NaN/Inf")
    if not report.backward_finite:
        out.append("backward produced NaN/Inf gradients")
    return out


__all__ = ["INIT_TOLERANCE", "PROBE_BATCH", "PROBE_EXTENT", "failures", "probe_shape",
           "validate_kernel"]
