"""Growth under data-parallel training: steps/s of 1 and 2 gloo ranks, with and without growth.

One run measures, on the same job (Tolaria's trainer on the built-in `mnist1d` job, CNN
host, batch 32 per rank, one torch thread per rank):

  * 1 rank (one process, no process group) and 2 ranks (two processes, gloo over a file
    store on this machine), each without growth (slots dormant, no controller) and with
    growth (a fixed controller germinating at epochs 1 and 2, the built-in catalog);
    per variant: the mean time of a training step (forward, backward, the all-reduce of
    gradients + loss + stop flag, optimizer step; `Trainer._train_step` timed), and the
    whole run's steps/s and samples/s (all ranks together; boundaries and evaluation
    included);
  * the cost of one germination broadcast on 2 ranks: rank 0's decision broadcast to the
    other rank, then the kernel loaded on rank 0, on rank 1, its weights broadcast
    (`esper.grow.distributed`), median over `--broadcasts` rounds, beside the same load
    in one process.

Targets (issue 10): growth adds <= 2% to a DDP step; a germination broadcast <= 50 ms on
loopback. With 2 cores shared by other work, 2 ranks are not expected to be faster than 1.

    .venv/bin/python benchmarks/ddp_growth.py [--epochs 4] [--broadcasts 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2


def _config(epochs: int) -> Any:
    from esper.tolaria.config import RunConfig

    return RunConfig.from_dict({
        "job": "mnist1d", "job_params": {"host": "cnn"}, "controller": "fixed", "epochs": epochs,
        "batch_size": 32, "checkpoint_every": 0, "seed": 3,
        "budget": {"max_seeds": 2, "max_added_parameters": 0},
        "optimizer": {"name": "adamw", "learning_rate": 0.003, "schedule": "constant"}})


VARIANTS = ("static", "growth, waiting", "growth, 2 seeds")
"""No controller; a controller asked at every boundary that never germinates (the
machinery's cost: contribution forwards, snapshot, the decision broadcast); one that
germinates at epochs 1 and 2 (adds the seeds' own compute: the model grew)."""


def run_variant(variant: str, epochs: int, ddp: Any) -> dict[str, float]:
    """Train once; the step timings and the run's wall time of this rank."""
    import torch

    from esper.grow import BuiltinKernels, fixed_controller
    from esper.tolaria.trainer import build_trainer

    torch.set_num_threads(1)
    cfg = _config(epochs)
    controller = None
    if variant != "static":
        controller = fixed_controller(germinate_epochs=(1, 2) if variant == "growth, 2 seeds" else (),
                                      fossilize_after_epochs=1)
    trainer = build_trainer(cfg, run_id="bench", controller=controller,
                            kernels=BuiltinKernels() if controller is not None else None, distributed=ddp)
    step = trainer._train_step
    times: list[float] = []

    def timed(x: Any, y: Any) -> float:
        t0 = time.perf_counter()
        v = step(x, y)
        times.append(time.perf_counter() - t0)
        return v

    trainer._train_step = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - t0
    # The first epoch warms up allocators and the gloo pairs: steady state is the rest.
    steady = times[trainer.steps_per_epoch:]
    return {"step_ms": 1e3 * statistics.fmean(steady), "wall_s": wall, "steps": result.global_step,
            "steps_per_epoch": trainer.steps_per_epoch, "seeds": trainer.seeds_germinated,
            "rows": 32 * result.global_step}


def best_of(variant_runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per variant, the fastest of its interleaved repeats (steps and runs separately):
    other work on shared cores only ever slows a repeat down."""
    out = {}
    for v, runs in variant_runs.items():
        best = dict(min(runs, key=lambda r: r["wall_s"]))
        best["step_ms"] = min(r["step_ms"] for r in runs)
        out[v] = best
    return out


def interleaved(epochs: int, repeats: int, ddp: Any) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:
            runs[v].append(run_variant(v, epochs, ddp))
    return best_of(runs)


def germination_broadcast(ddp: Any, rounds: int) -> list[float]:
    """Seconds per decision broadcast + kernel load on every rank + weight broadcast."""
    import torch
    import torch.distributed as dist

    from esper.grow import BuiltinKernels
    from esper.tolaria.trainer import build_trainer
    from generated.esper.common.v1 import decision_pb2

    trainer = build_trainer(_config(2), run_id="bench-bcast")
    site = next(iter(trainer.model.site_signatures().values()))
    source = BuiltinKernels()
    kernel_id = source.candidates(site)[0].kernel_id
    wanted = [decision_pb2.Decision(kind=decision_pb2.DECISION_KIND_GERMINATE, slot_id="s", kernel_id=kernel_id)]

    class Script:
        uses_probes = False

        def decide(self, snapshot: Any, candidates: Any) -> list[Any]:
            return wanted

    controller, kernels = ddp.controller(Script()), ddp.kernels(source)
    out = []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        (d,) = controller.decide(None, {})
        module = kernels.load(d.kernel_id, site)
        dist.barrier()
        out.append(time.perf_counter() - t0)
        assert isinstance(module, torch.nn.Module)
    return out


def local_load(rounds: int) -> list[float]:
    from esper.grow import BuiltinKernels
    from esper.tolaria.trainer import build_trainer

    trainer = build_trainer(_config(2), run_id="bench-load")
    site = next(iter(trainer.model.site_signatures().values()))
    source = BuiltinKernels()
    kernel_id = source.candidates(site)[0].kernel_id
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        source.load(kernel_id, site)
        out.append(time.perf_counter() - t0)
    return out


def rank_main(store: str, rank: int, out: Path, epochs: int, broadcasts: int, repeats: int) -> None:
    import torch.distributed as dist

    from esper.grow.distributed import DistributedGrowth

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ddp = DistributedGrowth()
    res: dict[str, Any] = dict(interleaved(epochs, repeats, ddp))
    res["broadcast"] = germination_broadcast(ddp, broadcasts)
    out.write_text(json.dumps(res))
    dist.destroy_process_group()


def two_ranks(epochs: int, broadcasts: int, repeats: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--store", f"{tmp}/store",
                                   "--out", f"{tmp}/r{r}.json", "--epochs", str(epochs),
                                   "--broadcasts", str(broadcasts), "--repeats", str(repeats)], env=env)
                 for r in range(WORLD)]
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"rank exited with {p.returncode}")
        return [json.loads(Path(f"{tmp}/r{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--broadcasts", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the fastest kept")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args.store, args.rank, args.out, args.epochs, args.broadcasts, args.repeats)
        return

    from esper.grow.distributed import DistributedGrowth

    single = DistributedGrowth()  # no process group: the plain one-process path
    one = interleaved(args.epochs, args.repeats, single)
    loads = local_load(args.broadcasts)
    two = two_ranks(args.epochs, args.broadcasts, args.repeats)[0]  # rank 0's view (the ranks step together)
    base = one["static"]
    base_sps = base["rows"] / base["wall_s"]
    print(f"job mnist1d/cnn, batch 32 per rank, {args.epochs} epochs, 1 torch thread per rank, "
          f"{os.cpu_count()} CPUs (shared with other work); fastest of {args.repeats} interleaved "
          "repeats per variant\n")
    print("| ranks | variant | seeds | steps/rank | step ms (steady) | × baseline | run ms/step | "
          "× baseline | samples/s (all ranks) | × baseline |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for world, res in ((1, one), (WORLD, two)):
        for v in VARIANTS:
            r = res[v]
            per_step = 1e3 * r["wall_s"] / r["steps"]
            sps = r["rows"] * world / r["wall_s"]
            print(f"| {world} | {v} | {r['seeds']} | {r['steps']} | {r['step_ms']:.3f} | "
                  f"{r['step_ms'] / base['step_ms']:.3f} | {per_step:.3f} | "
                  f"{per_step / (1e3 * base['wall_s'] / base['steps']):.3f} | {sps:.0f} | {sps / base_sps:.3f} |")

    def run_ms(r: dict[str, float]) -> float:
        return r["wall_s"] / r["steps"]

    g2 = run_ms(two["growth, waiting"]) / run_ms(two["static"]) - 1
    g1 = run_ms(one["growth, waiting"]) / run_ms(one["static"]) - 1
    s2 = two["growth, waiting"]["step_ms"] / two["static"]["step_ms"] - 1
    s1 = one["growth, waiting"]["step_ms"] / one["static"]["step_ms"] - 1
    bcast = statistics.median(two["broadcast"]) * 1e3
    load = statistics.median(loads) * 1e3
    print()
    print(f"growth (controller asked every boundary, boundaries included) adds {100 * g2:+.1f}% to a "
          f"2-rank step ({100 * g1:+.1f}% to a 1-rank step); target <= 2%: {'met' if g2 <= 0.02 else 'MISSED'}")
    print(f"  the training step alone (no boundaries; the same one all-reduce): {100 * s2:+.1f}% at 2 ranks, "
          f"{100 * s1:+.1f}% at 1 rank")
    print(f"germination broadcast, 2 ranks: median {bcast:.2f} ms, max {1e3 * max(two['broadcast']):.2f} ms "
          f"over {len(two['broadcast'])} rounds (the same kernel load in one process: {load:.2f} ms); "
          f"target <= 50 ms: {'met' if bcast <= 50 else 'MISSED'}")
    print(f"2 ranks vs 1, static: {base_sps / (two['static']['rows'] * WORLD / two['static']['wall_s']):.2f}x "
          "slower in samples/s (two processes on cores shared with other work; gloo over loopback)")

if __name__ == "__main__":
    main()
