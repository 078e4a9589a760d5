"""Kasmina overhead against the unwrapped host, measured in the same run.

Prints, for an MLP and a CNN host at a realistic batch:
  * dormant overhead per training step (slots at every site, all DORMANT) — target <= 1%;
  * active blend overhead beyond the seed's own compute: the wrapped model with a seed in
    BLENDING against the same host with the same seed written inline by hand
    (`addcmul(h, alpha, seed(h.detach()))`) — target <= 5% of the host step;
  * germination latency: materialize (build + load weights from in-memory safetensors)
    and attach (`germinate`: probe gate, optimizer group, hook) — target <= 1 ms;
  * the same dormant and blend overheads for a parallel slot over the first
    layer→activation→layer span (`wrap(parallel=["0:2"])`, the seed reads the span's input),
    against the same seed written inline (`span(x) + alpha * seed(x.detach())`).
With CUDA and CuPy present it also prints the fused CuPy blend against torch and its
achieved memory bandwidth.

Variants are timed in interleaved rounds (A B C A B C ...) and the fastest round is
reported: on a shared machine drifting load hits every variant alike and noise only ever
adds time, so the minimum is the most repeatable estimate of each variant's own cost. CPU sections
run single-threaded and count this process's CPU time (`time.process_time`), which
time slices lost to other processes do not inflate; the GPU section uses wall time
around `torch.cuda.synchronize()`.

    .venv/bin/python benchmarks/kasmina_overhead.py [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from esper.kasmina import KasminaConfig, SeedStage, wrap


def mlp_host() -> tuple[nn.Module, torch.Tensor, list[str], str]:
    host = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))
    return host, torch.randn(256, 784), ["1", "3"], "3"


def cnn_host() -> tuple[nn.Module, torch.Tensor, list[str], str]:
    host = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, 10),
    )
    return host, torch.randn(64, 3, 16, 16), ["1", "3"], "3"


class ChannelSeed(nn.Module):
    """Bottleneck channel MLP (1x1 convs for images), output side zero-initialised."""

    def __init__(self, c: int, image: bool, device: torch.device | str | None = None) -> None:
        super().__init__()

        def mk(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 1, device=device) if image else nn.Linear(i, o, device=device)

        self.down, self.up = mk(c, max(c // 4, 4)), mk(max(c // 4, 4), c)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(h)))


class ParallelSeed(nn.Module):
    """in → max(out/4, 4) → out channel MLP (1x1 convs for images), output side at zero."""

    def __init__(self, cin: int, cout: int, image: bool) -> None:
        super().__init__()
        hidden = max(cout // 4, 4)
        mk = nn.Conv2d if image else nn.Linear
        self.down, self.up = mk(cin, hidden, *((1,) if image else ())), mk(
            hidden, cout, *((1,) if image else ()))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


class InlineParallel(nn.Module):
    """Reference: a span of host layers plus a seed reading the span's input, by hand."""

    def __init__(self, span: nn.Module, seed: nn.Module, alpha: float) -> None:
        super().__init__()
        self.span, self.seed = span, seed
        self.register_buffer("alpha", torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.span(x), self.alpha, self.seed(x.detach()))


class InlineBlend(nn.Module):
    """Reference: the site module followed by the seed, written by hand (no Kasmina)."""

    def __init__(self, site: nn.Module, seed: nn.Module, alpha: float) -> None:
        super().__init__()
        self.site, self.seed = site, seed
        self.register_buffer("alpha", torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.site(x)
        return torch.addcmul(h, self.alpha, self.seed(h.detach()))


def train_step_fn(model: nn.Module, x: torch.Tensor, after: Callable[[], None] | None = None
                  ) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    y = torch.randint(0, 10, (x.shape[0],))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if after is not None:
            after()

    return step, opt


def interleaved(variants: dict[str, Callable[[], None]], rounds: int, iters: int,
                sync: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.process_time) -> dict[str, float]:
    """Seconds per call of each variant: the fastest of `rounds` interleaved rounds."""
    for fn in variants.values():
        for _ in range(max(iters // 2, 3)):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            t0 = clock()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((clock() - t0) / iters)
    return {k: min(v) for k, v in times.items()}


def host_section(name: str, make: Callable, rounds: int, iters: int) -> list[tuple]:
    rows = []
    torch.manual_seed(0)
    host, x, sites, active_site = make()
    image = x.dim() == 4
    ref_host = make()[0]
    ref_host.load_state_dict(host.state_dict())

    # -- dormant: every site slotted, nothing germinated
    dormant_default = wrap(make()[0], sites=sites, example_input=x)
    dormant_every = wrap(make()[0], sites=sites, example_input=x,
                         config=KasminaConfig(stats_interval=1))
    variants = {}
    variants["host"], _ = train_step_fn(ref_host, x)
    for label, mm in (("dormant (default: stats every 8 steps)", dormant_default),
                      ("dormant (stats every step)", dormant_every)):
        variants[label], _ = train_step_fn(mm, x, mm.step)
    # -- active: a seed in BLENDING at alpha 0.5 vs the same seed inline
    c = mm.site_signature(active_site).channels
    torch.manual_seed(1)
    seed_a = ChannelSeed(c, image)
    seed_b = ChannelSeed(c, image)
    seed_b.load_state_dict(seed_a.state_dict())
    blend_host = make()[0]
    blend_host.load_state_dict(host.state_dict())
    mm_blend = wrap(blend_host, sites=[active_site], example_input=x,
                    config=KasminaConfig(incubation=8, gate_interval=8, blend_duration=10**9))
    step_b, opt_b = train_step_fn(mm_blend, x, None)
    mm_blend.attach_optimizer(opt_b)
    mm_blend.germinate(active_site, seed_a, kernel_id="bench", blueprint_id="bench")
    with torch.no_grad():  # leave zero-init so the seed has real, non-trivial compute
        seed_a.up.weight.normal_(0, 0.01)
        seed_b.up.weight.copy_(seed_a.up.weight)
    for _ in range(8):  # default stats_interval 8: the gate sees one sampled step
        step_b()
        mm_blend.step()
    assert mm_blend.slots[active_site].current_stage is SeedStage.BLENDING
    mm_blend.slots[active_site].alpha_ctl.hold(0.5)  # freeze the ramp for timing
    inline_host = make()[0]
    inline_host.load_state_dict(host.state_dict())
    idx = int(active_site)
    inline_host[idx] = InlineBlend(inline_host[idx], seed_b, 0.5)
    variants["seed inline (reference)"], _ = train_step_fn(inline_host, x)
    variants["blending (kasmina)"] = lambda: (step_b(), mm_blend.step())

    t = interleaved(variants, rounds, iters)
    base = t["host"]
    for k, v in t.items():
        rows.append((name, k, v * 1e3, (v / base - 1) * 100))
    # Kasmina's own per-step work on the dormant model, timed alone over many calls: on a
    # busy machine this is steadier than the difference of two whole training steps.
    own = interleaved({"step": dormant_default.step}, rounds, 200)["step"]
    rows.append((name, "=> dormant: mm.step() alone", own * 1e3, own / base * 100))
    blend_over = (t["blending (kasmina)"] - t["seed inline (reference)"]) / base * 100
    rows.append((name, "=> blend overhead beyond seed compute", None, blend_over))
    # The same comparison for the forward alone (less noisy than whole steps) and
    # Kasmina's own per-step work with a seed in BLENDING.
    mm_blend.eval(), inline_host.eval()
    with torch.no_grad():
        f = interleaved({"inline": lambda: inline_host(x), "kasmina": lambda: mm_blend(x)},
                        rounds, iters)
    mm_blend.train(), inline_host.train()
    rows.append((name, "=> blend forward: kasmina vs inline", (f["kasmina"] - f["inline"]) * 1e3,
                 (f["kasmina"] - f["inline"]) / base * 100))
    own_b = interleaved({"step": mm_blend.step}, rounds, 200)["step"]
    rows.append((name, "=> blending: mm.step() alone", own_b * 1e3, own_b / base * 100))

    # -- germination latency: materialize from in-memory safetensors + attach.
    # Build on the meta device and assign the loaded tensors: no random init that the
    # artifact's weights would replace anyway.
    blob = st_save(ChannelSeed(c, image).state_dict())
    germ_host = make()[0]
    mm_g = wrap(germ_host, sites=[active_site], example_input=x,
                config=KasminaConfig(embargo_epochs=0))
    opt_g = torch.optim.SGD(germ_host.parameters(), lr=0.1)
    mm_g.attach_optimizer(opt_g)
    mat, att = [], []
    for i in range(60):
        t0 = time.process_time()
        seed = ChannelSeed(c, image, device="meta")
        seed.load_state_dict(st_load(blob), assign=True)
        t1 = time.process_time()
        mm_g.germinate(active_site, seed, kernel_id=f"k{i}", blueprint_id="b")
        t2 = time.process_time()
        mat.append(t1 - t0)
        att.append(t2 - t1)
        mm_g.prune(active_site, "benchmark reset")  # → RESETTING (no embargo)
        mm_g.step()  # → DORMANT
    tot = [a + b for a, b in zip(mat[10:], att[10:], strict=True)]
    for label, xs in (("materialize", mat[10:]), ("attach", att[10:]), ("total", tot)):
        rows.append((name, f"germinate: {label} (min / p50 ms)",
                     (min(xs) * 1e3, statistics.median(xs) * 1e3), None))
    return rows


def parallel_section(name: str, make: Callable, rounds: int, iters: int) -> list[tuple]:
    """Dormant and BLENDING overhead of a parallel slot over the span "0:2"."""
    rows = []
    torch.manual_seed(0)
    host, x, _sites, _ = make()
    image = x.dim() == 4
    ref_host = make()[0]
    ref_host.load_state_dict(host.state_dict())
    variants = {}
    variants["host"], _ = train_step_fn(ref_host, x)
    dormant = wrap(make()[0], parallel=["0:2"], example_input=x)
    variants["parallel span dormant (default)"], _ = train_step_fn(dormant, x, dormant.step)
    sig = dormant.site_signature("0:2")
    torch.manual_seed(1)
    seed_a = ParallelSeed(sig.input.channels, sig.channels, image)
    seed_b = ParallelSeed(sig.input.channels, sig.channels, image)
    seed_b.load_state_dict(seed_a.state_dict())
    blend_host = make()[0]
    blend_host.load_state_dict(host.state_dict())
    mm = wrap(blend_host, parallel=["0:2"], example_input=x,
              config=KasminaConfig(incubation=8, gate_interval=8, blend_duration=10**9))
    step_b, opt_b = train_step_fn(mm, x, None)
    mm.attach_optimizer(opt_b)
    mm.germinate("0:2", seed_a, kernel_id="bench", blueprint_id="bench")
    with torch.no_grad():
        seed_a.up.weight.normal_(0, 0.01)
        seed_b.up.weight.copy_(seed_a.up.weight)
    for _ in range(8):
        step_b()
        mm.step()
    assert mm.slots["0:2"].current_stage is SeedStage.BLENDING
    mm.slots["0:2"].alpha_ctl.hold(0.5)
    inline_host = make()[0]
    inline_host.load_state_dict(host.state_dict())
    layers = list(inline_host.children())
    inline_host = nn.Sequential(InlineParallel(nn.Sequential(*layers[:3]), seed_b, 0.5),
                                *layers[3:])
    variants["parallel seed inline (reference)"], _ = train_step_fn(inline_host, x)
    variants["parallel blending (kasmina)"] = lambda: (step_b(), mm.step())
    t = interleaved(variants, rounds, iters)
    base = t["host"]
    for k, v in t.items():
        if k != "host":
            rows.append((name, k, v * 1e3, (v / base - 1) * 100))
    own = interleaved({"step": dormant.step}, rounds, 200)["step"]
    rows.append((name, "=> parallel dormant: mm.step() alone", own * 1e3, own / base * 100))
    over = (t["parallel blending (kasmina)"] - t["parallel seed inline (reference)"]) / base
    rows.append((name, "=> parallel blend overhead beyond seed", None, over * 100))
    mm.eval(), inline_host.eval()
    with torch.no_grad():
        f = interleaved({"inline": lambda: inline_host(x), "kasmina": lambda: mm(x)},
                        rounds, iters)
    rows.append((name, "=> parallel blend fwd: kasmina vs inline",
                 (f["kasmina"] - f["inline"]) * 1e3, (f["kasmina"] - f["inline"]) / base * 100))
    return rows


def gpu_section(rounds: int) -> list[tuple]:
    from esper.kasmina.backends import cupy_backend, torch_backend

    if not cupy_backend.available():
        return [("gpu", "cupy sees no device: skipped", None, None, None)]
    rows = []
    dev = torch.device("cuda")
    alpha = torch.tensor(0.5, device=dev)
    sync = torch.cuda.synchronize
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1 << 20, 1 << 24, 1 << 26):
            h = torch.randn(n, device=dev, dtype=dtype)
            s = torch.randn(n, device=dev, dtype=dtype)
            a_cast = alpha.to(dtype)
            t = interleaved({
                "torch addcmul": lambda h=h, s=s: torch_backend.blend(h, s, alpha),
                "torch unfused h+a*s": lambda h=h, s=s, a=a_cast: h + a * s,
                "cupy fused": lambda h=h, s=s: cupy_backend.blend(h, s, alpha),
            }, rounds, 50, sync, time.perf_counter)
            nbytes = 3 * n * h.element_size()
            for k, v in t.items():
                rows.append((f"{str(dtype)[6:]} n=2^{n.bit_length() - 1}", k, v * 1e6,
                             t["torch addcmul"] / v, nbytes / v / 1e9))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), fastest of {args.rounds} "
          f"interleaved rounds x {args.iters} steps (CPU time of this process)\n")
    print(f"{'host':<5} {'variant':<40} {'ms/step':>9} {'vs host':>9}")
    for name, make in (("mlp", mlp_host), ("cnn", cnn_host)):
        rows = host_section(name, make, args.rounds, args.iters)
        rows += parallel_section(name, make, args.rounds, args.iters)
        for host, variant, ms, pct in rows:
            if isinstance(ms, tuple):
                ms_s = f"{ms[0]:.3f} / {ms[1]:.3f}"
            else:
                ms_s = f"{ms:+9.3f}" if ms is not None and ms < 0 else (
                f"{ms:9.3f}" if ms is not None else " " * 9)
            pct_s = f"{pct:+8.2f}%" if pct is not None else ""
            print(f"{host:<5} {variant:<40} {ms_s} {pct_s}")
    print("\ntargets: dormant <= +1%, blend overhead beyond seed compute <= 5%, "
          "germinate total <= 1 ms")
    if torch.cuda.is_available():
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        print(f"{'size':<18} {'variant':<22} {'us':>9} {'speedup':>8} {'GB/s':>8}")
        for size, variant, us, speed, gbs in gpu_section(args.rounds):
            if us is None:
                print(f"{size:<18} {variant}")
                continue
            print(f"{size:<18} {variant:<22} {us:9.1f} {speed:7.2f}x {gbs:8.1f}")
    else:
        print("\nno CUDA device: fused CuPy blend section skipped")


if __name__ == "__main__":
    main()
