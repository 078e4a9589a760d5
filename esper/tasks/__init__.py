"""Esper's built-in tasks: data generated or shipped by packages, never downloaded.

Each is a registered job (`esper.jobs.registry.BUILTIN_JOBS`, and the `esper.jobs` entry
points in pyproject.toml) of the same kind an operator registers for their own model:

    from esper.tasks import mnist1d
    job = mnist1d.job(host="cnn", seed=0)  # an esper.jobs.Job

and a `Task` (splits, hosts) for the code that needs the parts:

    task = get_task("mnist1d")
    data = task.load(seed)                 # fixed train/val/test splits for that seed
    model = task.host("cnn").build(1.0)    # a deliberately small host
"""

from __future__ import annotations

from esper.jobs.errors import JobConfigError
from esper.jobs.sites import module_names, resolve_sites
from esper.tasks import digits, mnist1d, spirals
from esper.tasks.base import Task, TaskData
from esper.tasks.hosts import HostSpec

TASKS: dict[str, Task] = {t.name: t for t in (mnist1d.TASK, digits.TASK, spirals.TASK)}


def get_task(name: str) -> Task:
    """The built-in task called `name`; `JobConfigError` (field "task") lists the others."""
    try:
        return TASKS[name]
    except KeyError:
        raise JobConfigError(
            f"unknown task {name!r}; available: {', '.join(TASKS)}", field="task"
        ) from None


def warm() -> None:
    """Generate or load every built-in data set once (each is cached in memory after), so a
    process forked afterwards starts its run without that cost (MNIST-1D takes seconds)."""
    mnist1d.generated()
    digits.images()


__all__ = ["TASKS", "HostSpec", "Task", "TaskData", "get_task", "module_names", "resolve_sites", "warm"]
