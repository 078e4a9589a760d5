"""Tasks Tolaria trains on: data generated or shipped by packages, never downloaded.

    task = get_task("mnist1d")
    data = task.load(seed)                 # fixed train/val/test splits for that seed
    model = task.host("cnn").build(1.0)    # a deliberately small host
"""

from __future__ import annotations

from esper.tolaria.config import RunConfigError
from esper.tolaria.tasks import digits, mnist1d, spirals
from esper.tolaria.tasks.base import Task, TaskData, module_names, resolve_sites
from esper.tolaria.tasks.hosts import HostSpec

TASKS: dict[str, Task] = {t.name: t for t in (mnist1d.TASK, digits.TASK, spirals.TASK)}


def get_task(name: str) -> Task:
    """The registered task called `name`; `RunConfigError` (field "task") lists the others."""
    try:
        return TASKS[name]
    except KeyError:
        raise RunConfigError(
            f"unknown task {name!r}; available: {', '.join(TASKS)}", field="task"
        ) from None


__all__ = ["TASKS", "HostSpec", "Task", "TaskData", "get_task", "module_names", "resolve_sites"]
