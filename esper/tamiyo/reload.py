"""Hot reload of a file-backed policy: a new policy file is picked up without a restart.

A background task checks the policy's JSON and weights every `reload_check_s`. When either
changed, the new files are loaded and verified in a worker thread (hash, names, shapes)
and only then swapped in between two Decides; a file that fails verification never
serves, the previous policy keeps serving and the failure is logged and shown by
GetPolicyInfo (`settings["reload_error"]`). A half-written pair (new weights, old JSON)
fails its hash check and is retried at the next change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from esper.errors import EsperError
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.policy import Policy

log = logging.getLogger(__name__)


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((0, -1))
    return tuple(out)


class PolicyReloader:
    """Watches `paths` and swaps `controller.policy` for `load()` when they change."""

    def __init__(
        self, controller: TamiyoController, paths: list[Path], load: Callable[[], Policy], *, every_s: float
    ) -> None:
        self.controller = controller
        self.paths = paths
        self.load = load
        self.every_s = every_s
        self._seen = _stamp(paths)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0

    async def check(self) -> bool:
        """Reload if the files changed since the last check; True when a new policy now serves."""
        stamp = _stamp(self.paths)
        if stamp == self._seen:
            return False
        self._seen = stamp
        old = self.controller.policy
        try:
            new = await asyncio.to_thread(self.load)
        except EsperError as e:
            self.controller.reload_error = f"{type(e).__name__}: {e}"
            log.error("tamiyo: policy reload failed, still serving %s v%s: %s", old.name, old.version, e)
            return False
        self.controller.swap_policy(new)
        self.reloads += 1
        log.info("tamiyo: reloaded policy %s v%s (was v%s)", new.name, new.version, old.version)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.check()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tamiyo-policy-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def watched_files(policy_file: str) -> list[Path]:
    json_path = Path(policy_file)
    return [json_path, json_path.with_suffix(".safetensors")]
