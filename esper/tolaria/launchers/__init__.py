"""How Tolaria starts a run's worker: each run is its own process or pod.

The supervisor (esper.tolaria.supervisor) decides *when* a worker starts, restarts or
stops; a launcher decides *where*. Every launcher gets the same `LaunchSpec` (the worker's
command-line arguments and the environment it adds: its run-scoped credential and trace
context) and returns a `Worker` handle the supervisor watches:

* `local` (esper.tolaria.launchers.local): a subprocess on Tolaria's machine, forked from a
  preloaded helper ("fork", the default) or spawned ("spawn").
* `kubernetes` (esper.tolaria.launchers.kubernetes): a `batch/v1` Job per run, in the
  namespace Tolaria runs in.

Either way the run's event log in its run directory is the truth: the worker appends to it
and the supervisor follows it. Launchers only tell whether the worker still lives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esper.tolaria.config import RunResources

SECRET_ENV = re.compile(
    r"^(ESPER_API_KEYS?(_FILE)?|ESPER_RUN_TOKEN_KEY(_FILE)?|ESPER_SIGNING_KEY(_FILE)?|ESPER_URZA_.*"
    r"|ESPER_NATS_PASSWORD|PGPASSWORD|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)$")
"""Variables of Tolaria's own environment a worker never inherits: every API key and key
list, the run-token and kernel signing keys, Urza's database and object-store settings,
passwords. (The NATS user's password *file* stays: workers publish as that user.)"""


def worker_environment(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a local worker: Tolaria's own minus every credential, plus `extra`
    (the run's credential as ESPER_API_KEY, its TRACEPARENT)."""
    env = {k: v for k, v in base.items() if not SECRET_ENV.match(k)}
    env.update(extra)
    return env


@dataclass(kw_only=True, frozen=True)
class LaunchSpec:
    """One start of one run's worker."""

    run_id: str
    run_dir: Path
    module: str
    """Run as ``python -m <module> *argv``."""
    argv: tuple[str, ...]
    """``--run-dir ... --endpoints ...`` and the operator's worker arguments."""
    env: Mapping[str, str] = field(default_factory=dict)
    """What the worker's environment gets on top of the launcher's own: ESPER_API_KEY (the
    run token; absent when auth is off) and TRACEPARENT."""
    resources: RunResources = field(default_factory=RunResources)
    attempt: int = 1
    """1 for the first start, then one more per start after a worker was lost."""
    restarts_left: int = 0
    """Worker deaths the supervisor may still answer with a restart (a Job's backoffLimit)."""
    world_size: int = 1
    """Data-parallel ranks (`RunConfig.world_size`); above 1 only launchers with
    `runs_ranks = True` accept the run."""


class Worker:
    """A started worker as the supervisor watches it (subclassed per launcher)."""

    name: str = ""
    """Where it runs, for the run record: "pid 1234" or "job esper/esper-run-...-1"."""
    pid: int | None = None
    survives_service_restart = False
    """Whether it goes on running while Tolaria restarts (and is adopted afterwards)."""
    fatal = False
    """Set with an exit that a restart cannot cure (a pod no node can schedule)."""

    async def refresh(self) -> None:
        """Bring `exit_status`/`take_restarts` up to date (a remote launcher asks its API)."""

    def exit_status(self) -> tuple[bool, str]:
        """(whether the worker is gone, how it ended, e.g. "status 1", "signal SIGKILL")."""
        raise NotImplementedError

    def take_restarts(self) -> list[str]:
        """Deaths the launcher already answered with a new process since the last call
        (a Job's pod failures), each described; the supervisor records them as restarts."""
        return []

    def take_notices(self) -> list[tuple[str, str]]:
        """(kind, detail) of things the run's record should show while it waits (a pod
        that cannot be scheduled, an image that cannot be pulled); each reported once."""
        return []

    async def terminate(self) -> None:
        """Ask the worker to checkpoint and stop at its next step boundary."""
        raise NotImplementedError

    async def kill(self) -> None:
        """Stop it now (after terminate's grace period)."""
        raise NotImplementedError

    async def reap(self, grace_s: float) -> None:
        """After the run ended: wait (up to `grace_s`) for the worker to be gone."""
        raise NotImplementedError
