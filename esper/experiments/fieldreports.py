"""Field reports from runs trained in this process (the learned policy's training data).

`collect_inprocess` runs a task's growth-benchmark setup (`esper.experiments.growth`) under
Tamiyo's behaviour policy (the heuristic + ε-exploration,
`esper.tamiyo.fieldreports.ExploringPolicy`) with Tolaria's trainer and turns each run's
events into a `RunReport` (`esper.tamiyo.fieldreports.reports_from_events`), the same way
reports are read from a live platform's JetStream. `esper tamiyo train --collect-runs` and
`esper bench controllers` pass it to `esper.tamiyo.gnn.fit.train_policy(collect=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from esper.errors import ConfigError
from esper.tamiyo.fieldreports import ExploringPolicy, RunReport, reports_from_events
from generated.esper.oona.v1 import events_pb2


def collect_inprocess(
    *,
    task: str,
    seeds: Sequence[int],
    epsilon: float,
    epochs: int | None = None,
    with_baseline: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[RunReport]:
    """Run `task` once per seed under the heuristic + ε-exploration, in this process.

    Setup (host, lr, catalog, heuristic settings) is the growth benchmark's for the task
    (`esper.experiments.growth.TASK_DEFAULTS`); `with_baseline` also trains the static
    host for each seed, for the reward's accuracy term.

    Raises:
        ConfigError: a task without a benchmark setup.
    """
    import torch

    from esper.experiments.growth import TASK_DEFAULTS, GrowthBenchConfig
    from esper.grow import BuiltinKernels, PolicyController
    from esper.kasmina import KasminaConfig
    from esper.tamiyo.heuristic import HeuristicConfig, HeuristicPolicy
    from esper.tolaria.trainer import build_trainer

    if task not in TASK_DEFAULTS:
        raise ConfigError(f"task={task!r} has no benchmark setup; tasks: {', '.join(sorted(TASK_DEFAULTS))}")
    torch.set_num_threads(1)
    data = {**TASK_DEFAULTS[task], "task": task, "seeds": 1, "jobs": 1}
    if epochs is not None:
        data["epochs"] = epochs
    cfg = GrowthBenchConfig.from_dict(data)
    reports = []
    for seed in seeds:
        kernels = BuiltinKernels(cfg.blueprints, init_seed=seed)
        policy = ExploringPolicy(HeuristicPolicy(HeuristicConfig.from_dict(cfg.heuristic)), epsilon=epsilon, seed=seed)
        events: list[events_pb2.EventEnvelope] = []
        run_id = f"collect-{task}-{seed}"
        build_trainer(cfg.run_config(seed=seed, controller="heuristic"), run_id=run_id, kernels=kernels,
                      controller=PolicyController(policy), event_sink=events.append,
                      kasmina=KasminaConfig.from_dict(cfg.kasmina)).run()
        baseline = None
        if with_baseline:
            base = build_trainer(cfg.run_config(seed=seed, controller="none"), run_id=f"{run_id}-static",
                                 kernels=kernels).run()
            baseline = {run_id: base.val_accuracy}
        (report,) = reports_from_events(events, kernels.candidates, baselines=baseline)
        reports.append(report)
        if progress is not None:
            explored = sum(b.explored for b in report.boundaries)
            progress(f"  {run_id}: val {100 * report.final_val_accuracy:.1f}% "
                     f"(static {100 * baseline[run_id]:.1f}%)" if baseline else f"  {run_id}: val "
                     f"{100 * report.final_val_accuracy:.1f}%")
            progress(f"    {len(report.boundaries)} boundaries, {explored} explored, seeds "
                     f"{[(o.slot_id, o.fate, round(o.contribution, 4)) for o in report.seeds]}")
    return reports
