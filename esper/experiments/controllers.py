"""Controllers on held-out tasks and seeds: learned (gnn) vs heuristic vs random vs fixed schedule.

The learned policy is trained (or given with --policy) on some tasks and run seeds and
evaluated on others: by default trained on MNIST-1D seeds 0–4 and spirals seeds 0–4,
evaluated on digits seeds 100–104 and MNIST-1D seeds 100–104. An evaluation (task, seed)
that the policy's training collected is refused. Every controller gets the task's growth
benchmark setup (`esper.experiments.growth.TASK_DEFAULTS`: host, optimizer, cosine to 0,
catalog, seed budget, heuristic/fixed/random settings); heuristic, random and fixed runs
are `growth.run_arm` itself, the gnn run is the same trainer with the learned policy
(its fallback is the task's heuristic). Reported per task, mean ± std over seeds: test
accuracy, final parameters, training FLOPs, seeds kept, and for gnn the share of its slot
decisions that fell back to the heuristic (uncertainty above the threshold).

    esper bench controllers [--quick] [--policy policies/gnn.json] [--out bench-out/controllers]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.errors import ConfigError

CONTROLLERS = ("gnn", "heuristic", "random", "fixed")


@dataclass(kw_only=True)
class ControllerRun:
    controller: str
    task: str
    seed: int
    test_accuracy: float
    parameters: int
    train_flops: float
    wall_seconds: float
    seeds_kept: int
    fallbacks: int = 0
    """gnn only: slot decisions that fell back to the heuristic."""
    slot_decisions: int = 0
    """gnn only: slot decisions made (fallbacks included)."""


def _growth_config(task: str, epochs: int | None):
    from esper.experiments.growth import TASK_DEFAULTS, GrowthBenchConfig

    if task not in TASK_DEFAULTS:
        raise ConfigError(f"task {task!r} has no benchmark setup; tasks: {', '.join(sorted(TASK_DEFAULTS))}")
    data = {**TASK_DEFAULTS[task], "task": task, "seeds": 1, "jobs": 1}
    if epochs is not None:
        data["epochs"] = epochs
    return GrowthBenchConfig.from_dict(data)


def run_controller(task: str, controller: str, seed: int, *, epochs: int | None, policy_file: str,
                   uncertainty_threshold: float, trusted_public_keys: Sequence[bytes] = ()) -> ControllerRun:
    """Train `task` for `seed` under one controller (a process-pool job).

    `trusted_public_keys` (raw Ed25519 public keys) are the keys the policy file must be signed by.
    """
    import torch

    from esper.experiments import growth

    torch.set_num_threads(1)
    cfg = _growth_config(task, epochs)
    if controller != "gnn":
        r = growth.run_arm(cfg, controller, seed)
        return ControllerRun(controller=controller, task=task, seed=seed, test_accuracy=r.test_accuracy,
                             parameters=r.parameters, train_flops=r.train_flops, wall_seconds=r.wall_seconds,
                             seeds_kept=len(r.fossilized))
    from esper.blueprints.artifact import TrustedKeys
    from esper.grow import BuiltinKernels, PolicyController
    from esper.kasmina import KasminaConfig
    from esper.tamiyo.gnn import GnnPolicy, load_policy
    from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
    from esper.tolaria.trainer import build_trainer

    ensemble, meta = load_policy(Path(policy_file), TrustedKeys(trusted_public_keys))
    policy = GnnPolicy(ensemble, uncertainty_threshold=uncertainty_threshold,
                       fallback=HeuristicPolicy(HeuristicConfig.from_dict(cfg.heuristic)), version=str(meta["version"]))
    kernels = BuiltinKernels(cfg.blueprints, init_seed=seed)
    controller_ = _Counted(PolicyController(policy))
    trainer = build_trainer(cfg.run_config(seed=seed, controller="gnn"), run_id=f"bench-gnn-{task}-{seed}",
                            kernels=kernels, controller=controller_, kasmina=KasminaConfig.from_dict(cfg.kasmina))
    t0 = time.perf_counter()
    result = trainer.run()
    return ControllerRun(controller="gnn", task=task, seed=seed, test_accuracy=result.test_accuracy,
                         parameters=result.parameters, train_flops=result.train_flops,
                         wall_seconds=time.perf_counter() - t0, seeds_kept=len(result.fossilized),
                         fallbacks=controller_.fallbacks, slot_decisions=controller_.slot_decisions)


class _Counted:
    """A controller that counts the gnn's slot decisions and its fallbacks to the heuristic."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.component = inner.component
        self.fallbacks = 0
        self.slot_decisions = 0

    def decide(self, snapshot: Any, candidates: Any) -> list[Any]:
        decisions = self.inner.decide(snapshot, candidates)
        self.slot_decisions += sum(1 for d in decisions if d.slot_id)
        self.fallbacks += sum(1 for d in decisions if d.fallback)
        return decisions

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: Sequence[ControllerRun]) -> dict[str, dict[str, dict[str, Any]]]:
    """task → controller → {accuracy, parameters, flops: (mean, std), kept, fallback share}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in dict.fromkeys(r.task for r in runs):
        out[task] = {}
        for c in CONTROLLERS:
            rs = [r for r in runs if r.task == task and r.controller == c]
            if not rs:
                continue
            slot = sum(r.slot_decisions for r in rs)
            base = {r.seed: r.test_accuracy for r in runs if r.task == task and r.controller == "heuristic"}
            paired = [100 * (r.test_accuracy - base[r.seed]) for r in rs if r.seed in base]
            out[task][c] = {
                "paired": _mean_std(paired) if paired else None,
                "accuracy": _mean_std([100 * r.test_accuracy for r in rs]),
                "parameters": _mean_std([r.parameters for r in rs]),
                "flops": _mean_std([r.train_flops for r in rs]),
                "kept": statistics.fmean(r.seeds_kept for r in rs),
                "fallback": (sum(r.fallbacks for r in rs) / slot) if slot else None,
                "n": len(rs),
            }
    return out


def beats_heuristic(paired: tuple[float, float] | None, n: int) -> bool:
    """Whether a paired accuracy difference against the heuristic (mean, std over n seeds)
    is positive at 95% confidence (one-sample t-test on the per-seed differences)."""
    if paired is None or n < 2:
        return False
    from scipy.stats import t

    mean, std = paired
    if std == 0.0:
        return mean > 0.0
    return mean / (std / n**0.5) > float(t.ppf(0.975, n - 1))


def recommend(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[str, list[str]]:
    """The default controller, and why in words.

    The heuristic is the incumbent: another controller wins a held-out task only when its
    per-seed accuracy difference against the heuristic is positive at 95% confidence
    (a paired t-test), and becomes the default only when it wins on most tasks. Picking
    the best mean instead would crown whichever arm the seed noise favoured.
    """
    wins: dict[str, int] = {}
    lines = []
    for task, per in summary.items():
        better = [c for c in per if c != "heuristic" and beats_heuristic(per[c]["paired"], per[c]["n"])]
        best = max(better, key=lambda c: per[c]["paired"][0]) if better else "heuristic"
        wins[best] = wins.get(best, 0) + 1
        diffs = ", ".join(f"{c} {per[c]['paired'][0]:+.2f} ± {per[c]['paired'][1]:.2f}"
                          for c in per if c != "heuristic" and per[c]["paired"] is not None)
        verdict = (f"{best} beats the heuristic at 95% confidence" if better
                   else "no controller beats the heuristic at 95% confidence")
        lines.append(f"{task}: {verdict} (paired differences in points: {diffs})")
    top = max(wins.values())
    leaders = [c for c, n in wins.items() if n == top]
    choice = "heuristic" if "heuristic" in leaders or len(leaders) > 1 else leaders[0]
    return choice, lines


def render_markdown(runs: Sequence[ControllerRun], meta: Mapping[str, Any]) -> str:
    summary = summarise(runs)
    lines = [
        "# Controllers on held-out tasks and seeds",
        "",
        f"Command: `{meta['command']}`",
        "",
        (f"Learned policy: `{meta['policy']}` version {meta['version']} (trained on {meta['trained_on']}); "
         f"uncertainty threshold {meta['threshold']}. Evaluated on {meta['evaluated_on']}. Every controller "
         "gets the task's growth-benchmark setup; mean ± std over seeds."),
        "",
    ]
    for task, per in summary.items():
        base = per.get("heuristic", next(iter(per.values())))["flops"][0]
        lines += [
            f"## {task} ({meta['epochs'].get(task)} epochs, seeds {meta['seeds'][task]})",
            "",
            ("| controller | test accuracy (%) | − heuristic, same seed (points) | parameters | training FLOPs "
             "| FLOPs × heuristic | seeds kept | gnn fallbacks |"),
            "|---|---|---|---|---|---|---|---|",
        ]
        for c, s in per.items():
            fb = "-" if s["fallback"] is None else f"{100 * s['fallback']:.0f}% of slot decisions"
            pd = "-" if s["paired"] is None or c == "heuristic" else f"{s['paired'][0]:+.2f} ± {s['paired'][1]:.2f}"
            lines.append(
                f"| {c} | {s['accuracy'][0]:.2f} ± {s['accuracy'][1]:.2f} | {pd} | {s['parameters'][0]:.0f} ± "
                f"{s['parameters'][1]:.0f} | {s['flops'][0]:.3g} ± {s['flops'][1]:.2g} | {s['flops'][0] / base:.2f} "
                f"| {s['kept']:.1f} | {fb} |"
            )
        lines.append("")
    choice, why = recommend(summary)
    lines += ["## Verdict", ""] + [f"- {w}" for w in why] + [
        "", (f"Default controller by this table: **{choice}** (a controller replaces the heuristic "
             "only where it beats it at 95% confidence on most held-out tasks)."), ""]
    return "\n".join(lines)


def plot(runs: Sequence[ControllerRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(runs)
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, (task, per) in zip(axes[0], summary.items(), strict=True):
        names = list(per)
        ax.bar(names, [per[c]["accuracy"][0] for c in names], yerr=[per[c]["accuracy"][1] for c in names],
               capsize=4, color=["C3" if c == "gnn" else "C0" for c in names])
        lo = min(per[c]["accuracy"][0] - per[c]["accuracy"][1] for c in names)
        ax.set_ylim(max(0.0, lo - 5), None)
        ax.set_title(f"{task} (held-out seeds)")
        ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval_spec(text: str) -> list[tuple[str, tuple[int, ...]]]:
    from esper.experiments.tamiyo_train import parse_seeds

    out = []
    for part in text.split(";"):
        task, sep, seeds = part.partition(":")
        if not sep:
            raise ConfigError(f"--eval part {part!r} must be TASK:SEEDS, e.g. digits:100-104")
        out.append((task.strip(), parse_seeds(seeds)))
    return out


def _trained_runs(meta: Mapping[str, Any]) -> set[tuple[str, int]]:
    """(task, seed) pairs a policy file's training collected (run ids collect-<task>-<seed>)."""
    out = set()
    for r in meta.get("training", {}).get("runs", []):
        prefix, _, rest = r["run_id"].partition("-")
        task, _, seed = rest.rpartition("-")
        if prefix == "collect" and seed.isdigit():
            out.add((task, int(seed)))
    return out


def _refuse_leaks(evals: Sequence[tuple[str, Sequence[int]]], trained: set[tuple[str, int]]) -> None:
    leaked = sorted({(t, s) for t, seeds in evals for s in seeds} & trained)
    if leaked:
        raise ConfigError(f"evaluation runs {leaked} were in the policy's training data; evaluate on held-out seeds")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="esper bench controllers", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=Path, help="a trained policy JSON (default: train one on --train-*)")
    p.add_argument("--trusted-keys", default="",
                   help="directory of public keys a --policy file must be signed by "
                        "(default: ESPER_TRUSTED_KEYS_DIR, else .esper/trusted_keys)")
    p.add_argument("--train-tasks", default="mnist1d,spirals")
    p.add_argument("--train-seeds", default="0-4")
    p.add_argument("--eval", default="digits:100-104;mnist1d:100-104", help="TASK:SEEDS;TASK:SEEDS")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: each task's benchmark setting)")
    p.add_argument("--threshold", type=float, default=0.2, help="gnn uncertainty threshold")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true",
                   help="tiny version (spirals training, 2 seeds, 6 epochs, small ensemble) for tests")
    p.add_argument("--out", type=Path, default=Path("bench-out/controllers"))
    args = p.parse_args(argv)
    if args.quick:
        args.train_tasks, args.train_seeds = "spirals", "0-1"
        args.eval = "spirals:100-101;digits:100-101" if args.eval == p.get_default("eval") else args.eval
        args.epochs = args.epochs or 6
    evals = _eval_spec(args.eval)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.policy is None:
        from esper.experiments.fieldreports import collect_inprocess
        from esper.experiments.tamiyo_train import parse_seeds
        from esper.tamiyo.gnn.fit import TrainSpec, train_policy

        seeds = parse_seeds(args.train_seeds)
        _refuse_leaks(evals, {(t, s) for t in args.train_tasks.split(",") for s in seeds})
        spec = TrainSpec.from_dict({
            "tasks": tuple(args.train_tasks.split(",")), "seeds": seeds, "collect_runs": len(seeds),
            "epochs": args.epochs,
            **({"synthetic": 120, "imitation_steps": 30, "net": {"members": 2, "hidden": 16},
                "awr": {"steps": 20}} if args.quick else {}),
        })
        from esper.blueprints.artifact import SigningKey, TrustedKeys

        # The policy this run trains is trusted because this process trained it: a key of
        # its own signs it, and only that key is trusted to load it back.
        key = SigningKey.generate()
        trusted = TrustedKeys([key])
        trained = train_policy(spec, args.out / "policy", signing_key=key,
                               version=f"bench-{time.strftime('%Y%m%dT%H%M%S')}",
                               collector=collect_inprocess)
        args.policy = trained.current
    else:
        from esper.tamiyo.gnn import trusted_keys_for

        trusted = trusted_keys_for(args.trusted_keys or None, data_dir=Path(".esper"))
    from esper.tamiyo.gnn import load_policy

    _, pmeta = load_policy(args.policy, trusted)
    _refuse_leaks(evals, _trained_runs(pmeta))
    jobs = [(task, c, s) for task, seeds in evals for s in seeds for c in CONTROLLERS]
    print(f"controller benchmark: {len(jobs)} runs ({len(CONTROLLERS)} controllers × {sum(len(s) for _, s in evals)} "
          f"held-out task-seeds), {args.jobs} job(s)", flush=True)
    kw = {"epochs": args.epochs, "policy_file": str(args.policy), "uncertainty_threshold": args.threshold,
          "trusted_public_keys": [trusted.get(k).public_bytes_raw() for k in trusted.key_ids]}
    runs: list[ControllerRun] = []

    def done(r: ControllerRun) -> None:
        runs.append(r)
        fb = f"  fallbacks {r.fallbacks}/{r.slot_decisions}" if r.controller == "gnn" else ""
        print(f"  {r.task:<8} {r.controller:<9} seed {r.seed}: test {100 * r.test_accuracy:5.1f}%  params "
              f"{r.parameters:>6}  FLOPs {r.train_flops:.3g}  kept {r.seeds_kept}{fb}", flush=True)

    if args.jobs == 1:
        for j in jobs:
            done(run_controller(*j, **kw))
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for fut in [pool.submit(run_controller, *j, **kw) for j in jobs]:
                done(fut.result())
    order = {j: i for i, j in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r.task, r.controller, r.seed)])
    meta = {
        "command": "esper bench controllers " + " ".join(argv),
        "policy": str(args.policy), "version": pmeta["version"], "threshold": args.threshold,
        "trained_on": ", ".join(f"{t} seed {s}" for t, s in sorted(_trained_runs(pmeta))) or "synthetic boundaries only",
        "evaluated_on": "; ".join(f"{t} seeds {list(s)}" for t, s in evals),
        "epochs": {t: _growth_config(t, args.epochs).epochs for t, _ in evals},
        "seeds": {t: list(s) for t, s in evals},
    }
    table = render_markdown(runs, meta)
    (args.out / "controllers.md").write_text(table)
    (args.out / "controllers.json").write_text(json.dumps(
        {"meta": meta, "runs": [dataclasses.asdict(r) for r in runs]}, indent=1))
    plot(runs, args.out / "controllers.png")
    print()
    print(table)
    print(f"total {time.perf_counter() - t0:.0f}s; wrote {args.out}/controllers.md, controllers.png, controllers.json")
    return 0 if all(math.isfinite(r.test_accuracy) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
