"""Cold-start kernel choice (issue 12 point 3): does the heuristic, offered the full catalog
with no outcome history, recover the best single-blueprint result?

Without field reports the heuristic can only rank kernels by cost, so with the full catalog
it always took the cheapest (`norm_scale`: a per-channel scale behind a LayerNorm) and the
gain vanished. `esper.grow` now probes: at a boundary where the controller wants to
germinate, each offered kernel is trained alone for a few steps on training rows and its
held-out gain measured (`esper.grow.probe`); the heuristic chooses by that gain, and the
probes' FLOPs are counted as decision FLOPs.

Per task (the growth benchmark's setup: the task's CNN host with output slots at `act1`
and `act2`, AdamW lr 0.03, batch 64, 30 epochs, cosine to 0, at most 2 seeds; heuristic
settings from `esper.tolaria.bench_growth.TASK_DEFAULTS`), mean ± std over the seeds:

* `static-initial` — no growth (the baseline measured in the same run);
* `single:<blueprint>` — the heuristic offered only that blueprint (no probes: the choice
  of kernel is made for it), one arm per blueprint that fits the sites;
* `catalog` — the full catalog, no probes (the old cold start: the cheapest kernel);
* `catalog+probe` — the full catalog with probes.

    python -m esper.experiments.cold_start --task mnist1d --out benchmarks/results
    python -m esper.experiments.cold_start --task digits --tuning
    python -m esper.experiments.cold_start --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.config import reject_unknown_keys
from esper.errors import ConfigError

REPORTED_SEEDS = (0, 1, 2, 3, 4)
TUNING_SEEDS = (100, 101, 102)
SITES = ("act1", "act2")
HEURISTIC = {"warmup_epochs": 3, "plateau_window": 2, "plateau_threshold": 0.08,
             "fossilize_epochs": 1}
"""The growth benchmark's heuristic settings (esper.tolaria.bench_growth, chosen there on
MNIST-1D seeds 0-1), kept as they were so the single-blueprint arms are that benchmark's."""
KASMINA = {"incubation": 25, "blend_duration": 50}


@dataclass(kw_only=True, frozen=True)
class ColdStartConfig:
    """One task's comparison; probe settings chosen on `TUNING_SEEDS` (see the result file)."""

    task: str = "mnist1d"
    seeds: tuple[int, ...] = REPORTED_SEEDS
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.03
    max_seeds: int = 2
    heuristic: Mapping[str, Any] = field(default_factory=lambda: dict(HEURISTIC))
    kasmina: Mapping[str, Any] = field(default_factory=lambda: dict(KASMINA))
    probe_steps: int = 10
    probe_lr: float = 0.005
    probe_rows: int = 128
    """Training rows (a fixed random subset per seed) the probes fit on."""
    held_out_rows: int = 256
    """Validation rows contribution and probe gains are measured on (as Tolaria's trainer)."""
    singles: tuple[str, ...] = ()
    """Blueprints with a single-blueprint arm (empty: every one that fits the sites)."""
    only: tuple[str, ...] = ()
    """Run only these arms (empty: all; for tuning one arm's settings)."""
    jobs: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "singles", tuple(self.singles))
        object.__setattr__(self, "only", tuple(self.only))
        if self.task not in ("mnist1d", "digits"):
            raise ConfigError(f"ColdStartConfig.task={self.task!r}; tasks: mnist1d, digits")
        for name in ("epochs", "batch_size", "jobs", "probe_rows", "held_out_rows", "probe_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ColdStartConfig.{name}={v!r} must be an integer >= 1")
        from esper.kasmina import KasminaConfig
        from esper.tamiyo.heuristic import HeuristicConfig

        HeuristicConfig.from_dict(self.heuristic)
        KasminaConfig.from_dict(self.kasmina)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColdStartConfig:
        reject_unknown_keys(cls, data, "ColdStartConfig key(s)")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def fitting_blueprints(task: str) -> list[str]:
    """Names of the built-in blueprints that fit the task's CNN sites, catalog order."""
    import torch

    from esper.blueprints import builtin_blueprints, fits
    from esper.kasmina import KasminaConfig, wrap
    from esper.tasks import get_task

    t = get_task(task)
    data = t.load(0)
    torch.manual_seed(0)
    mm = wrap(t.host("cnn").build(1.0), sites=list(SITES), example_input=data.x_train[:4],
              config=KasminaConfig())
    fitting = fits(builtin_blueprints(), mm.site_signatures())
    names = {bp.name for bps in fitting.values() for bp in bps}
    return [bp.name for bp in builtin_blueprints() if bp.name in names]


def arms(cfg: ColdStartConfig) -> list[str]:
    singles = cfg.singles or tuple(fitting_blueprints(cfg.task))
    names = ["static-initial", *(f"single:{b}" for b in singles), "catalog", "catalog+probe"]
    return [a for a in names if not cfg.only or a in cfg.only]


def run_arm(cfg: ColdStartConfig, arm: str, seed: int) -> dict[str, Any]:
    import torch

    from esper.experiments.loop import RunSpec, train
    from esper.grow import BuiltinKernels, GrowthConfig, KasminaConfig, heuristic_controller

    torch.set_num_threads(1)
    spec = RunSpec(task=cfg.task, host="cnn", seed=seed, epochs=cfg.epochs,
                   batch_size=cfg.batch_size, lr=cfg.lr)
    if arm == "static-initial":
        r = train(spec, arm)
        return {**r.to_dict(), "grown_names": []}
    if arm.startswith("single:"):
        kernels, probes = BuiltinKernels([arm.removeprefix("single:")], init_seed=seed), 0
    elif arm in ("catalog", "catalog+probe"):
        kernels = BuiltinKernels(fitting_blueprints(cfg.task), init_seed=seed)
        probes = cfg.probe_steps if arm == "catalog+probe" else 0
    else:
        raise ConfigError(f"unknown arm {arm!r}; arms: {', '.join(arms(cfg))}")
    growth = GrowthConfig(max_seeds=cfg.max_seeds, total_epochs=cfg.epochs, task=cfg.task,
                          probe_steps=probes, probe_lr=cfg.probe_lr)
    r = train(spec, arm, sites=SITES, controller=heuristic_controller(cfg.heuristic),
              kernels=kernels, growth=growth, kasmina=KasminaConfig.from_dict(cfg.kasmina),
              held_out_rows=cfg.held_out_rows, probe_rows=cfg.probe_rows if probes else None)
    out = r.to_dict()
    out["grown_names"] = [(sid, kernels.blueprint(kid).name) for sid, _, kid in r.grown]
    out["germinated_names"] = [kernels.blueprint(d["kernel_id"]).name for d in r.decisions
                               if d["kind"] == "DECISION_KIND_GERMINATE" and not d["rejected"]]
    return out


def run(cfg: ColdStartConfig, progress=print) -> dict[str, list[dict[str, Any]]]:
    names = arms(cfg)
    jobs = [(a, s) for s in cfg.seeds for a in names]
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in names}
    if cfg.jobs == 1:
        outs = (run_arm(cfg, a, s) for a, s in jobs)
    else:
        pool = ProcessPoolExecutor(max_workers=cfg.jobs)
        outs = (f.result() for f in [pool.submit(run_arm, cfg, a, s) for a, s in jobs])
    try:
        for (arm, _), r in zip(jobs, outs, strict=True):
            results[arm].append(r)
            progress(f"  {arm:<28} seed {r['seed']:>3}: test {100 * r['test_accuracy']:.1f}%  "
                     f"{r['parameters']} params  decision {r['decision_flops']:.3g}  "
                     f"germinated {r.get('germinated_names', [])}")
    finally:
        if cfg.jobs != 1:
            pool.shutdown()
    return results


def paired(results: Mapping[str, Sequence[Mapping[str, Any]]], a: str, b: str) -> tuple[float, float]:
    """Mean and 95% half-width (t) of the per-seed accuracy difference a − b, in points."""
    from esper.experiments.loop import mean_std

    by_seed = {r["seed"]: r["test_accuracy"] for r in results[b]}
    diffs = [100 * (r["test_accuracy"] - by_seed[r["seed"]]) for r in results[a] if r["seed"] in by_seed]
    m, s = mean_std(diffs)
    t = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    half = t.get(len(diffs) - 1, 1.96) * s / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return m, half


def table(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    from esper.experiments.loop import mean_std

    def ms(vals, fmt, scale=1.0):
        m, s = mean_std([v * scale for v in vals])
        return f"{m:{fmt}} ± {s:{fmt}}"

    rows = ["| arm | test acc % | params | train FLOPs | decision FLOPs | kernels germinated |",
            "|---|---|---|---|---|---|"]
    for arm, rs in results.items():
        chosen = Counter(n for r in rs for n in r.get("germinated_names", []))
        rows.append(f"| {arm} | {ms([r['test_accuracy'] for r in rs], '.1f', 100)} "
                    f"| {ms([r['parameters'] for r in rs], '.0f')} "
                    f"| {ms([r['train_flops'] for r in rs], '.3g')} "
                    f"| {ms([r['decision_flops'] for r in rs], '.3g')} "
                    f"| {', '.join(f'{n} ×{c}' for n, c in chosen.most_common()) or '-'} |")
    return "\n".join(rows)


def summary(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    from esper.experiments.loop import mean_std

    singles = {a: mean_std([r["test_accuracy"] for r in rs])[0]
               for a, rs in results.items() if a.startswith("single:")}
    if not singles:
        return []
    best = max(singles, key=singles.get)
    out = [f"best single blueprint: {best} ({100 * singles[best]:.1f}%)"]
    for arm in ("catalog", "catalog+probe", "static-initial"):
        if arm in results:
            m, h = paired(results, arm, best)
            out.append(f"{arm} − {best}: {m:+.2f} ± {h:.2f} points (paired, 95% CI)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esper.experiments.cold_start",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default=None, choices=("mnist1d", "digits"))
    p.add_argument("--config", help="JSON file of ColdStartConfig keys")
    p.add_argument("--seeds", help="comma-separated run seeds (default: the reported 0-4)")
    p.add_argument("--tuning", action="store_true", help="run on the tuning seeds 100-102")
    p.add_argument("--quick", action="store_true", help="2 seeds, 4 epochs, 2 single arms")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--out", help="directory for cold-start-<task>.json")
    args = p.parse_args(argv)
    data: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.task:
        data["task"] = args.task
    if args.tuning:
        data["seeds"] = list(TUNING_SEEDS)
    if args.seeds:
        data["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        data.setdefault("seeds", [0, 1])
        data["epochs"] = 4
        data["heuristic"] = {**HEURISTIC, "warmup_epochs": 1, "plateau_window": 1,
                             "plateau_threshold": 1.0}
        data.setdefault("singles", ["norm_scale", "bottleneck_mlp"])
    if args.jobs:
        data["jobs"] = args.jobs
    data.setdefault("jobs", min(2, os.cpu_count() or 1))
    cfg = ColdStartConfig.from_dict(data)
    print(f"cold start: {cfg.task} CNN, sites {', '.join(SITES)}, {cfg.epochs} epochs, seeds "
          f"{list(cfg.seeds)}" + (" (TUNING seeds)" if set(cfg.seeds) & set(TUNING_SEEDS) else ""),
          flush=True)
    results = run(cfg, progress=lambda s: print(s, flush=True))
    print(table(results))
    for line in summary(results):
        print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"cold-start-{cfg.task}.json"
        path.write_text(json.dumps({"config": cfg.to_dict(), "tuning_seeds": list(TUNING_SEEDS),
                                    "reported_seeds": list(REPORTED_SEEDS), "results": results},
                                   indent=1, sort_keys=True))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
