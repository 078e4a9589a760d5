"""Tezzeret's core: compile jobs (idempotent on blueprint id and site) whose kernels are
published to Urza, and the state a Tezzeret starts from (signing key, job store, catalog).

`TezzeretService` (`esper.tezzeret.service`) is a thin gRPC adapter over `TezzeretCore`;
tests drive the core directly with an in-memory Urza.

Kernels for any site, on demand: `ensure_kernels(site)` starts the compile job of every
catalog blueprint that supports the site (idempotent through the job store, so a run that
asks again, or a second run with the same site, finds the jobs already done), and with
`wait` answers when they finished or the caller's deadline is near.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from esper.blueprints import blueprint_id, site_key, site_signature, supports, validate_ir
from esper.blueprints.artifact import SigningKey, TrustedKeys
from esper.blueprints.ir import check_site, layout_name
from esper.errors import EsperError, FailedPreconditionError, InvalidArgumentError
from esper.fsutil import atomic_write
from esper.tezzeret.compiler import compile_kernel
from esper.tezzeret.config import TezzeretConfig
from esper.tezzeret.jobs import JobStore
from esper.urza.client import UrzaLibrary
from generated.esper.common.v1 import blueprint_pb2, seed_pb2
from generated.esper.tezzeret.v1 import tezzeret_service_pb2 as pb

log = logging.getLogger(__name__)


class TezzeretCore:
    """Compile jobs, idempotent on (blueprint id, site), published to Urza."""

    def __init__(self, store: JobStore, key: SigningKey, urza: Callable[[], UrzaLibrary],
                 config: TezzeretConfig, catalog: list[blueprint_pb2.Blueprint] | None = None,
                 catalog_sites: list[seed_pb2.SiteSignature] | None = None):
        self.store = store
        self.key = key
        self._urza_factory = urza
        self._urza: UrzaLibrary | None = None
        self.config = config
        self.catalog = list(catalog or [])
        """What `ensure_kernels` compiles: the built-in blueprints the config selects."""
        self.catalog_sites = list(catalog_sites or [])
        """Sites `start` compiles the catalog for, in the background."""
        self._background: list[asyncio.Task[Any]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Jobs are CPU-bound torch work on the service's threads: a run asking for a whole
        # catalog must not take every core from training.
        self._jobs_running = asyncio.Semaphore(config.max_parallel_compiles)
        # Tezzeret's own threads for its blocking work (Urza calls, compiles). On the loop's
        # default executor, jobs blocked on calls to an Urza in the same process (`esper up`)
        # would hold every thread that Urza's own handlers need to answer them: deadlock
        # until the calls' deadlines.
        self._executor = ThreadPoolExecutor(max_workers=config.max_parallel_compiles + 2,
                                            thread_name_prefix="tezzeret")

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs))

    @classmethod
    def open(cls, config: TezzeretConfig, *, state_dir: Path, data_dir: Path,
             urza: Callable[[], UrzaLibrary]) -> TezzeretCore:
        """The core of a Tezzeret whose state lives in `state_dir` (`<data_dir>/tezzeret`):
        its signing key (published where Urza and the loaders trust keys), its job store,
        and the catalog (blueprints and sites) the config selects."""
        from esper.blueprints import builtin_blueprints

        key = signing_key_for(state_dir, config)
        publish_public_key(trusted_keys_dir(config, data_dir), key)
        store = JobStore(state_dir / "jobs.sqlite")
        sites = [site_signature(s["layout"], s["channels"], tuple(s.get("spatial", ())))
                 for s in config.catalog_sites]
        catalog = [bp for bp in builtin_blueprints()
                   if not config.catalog_blueprints or bp.name in config.catalog_blueprints]
        return cls(store, key, urza, config, catalog, sites)

    async def start(self) -> None:
        """Resume jobs a crash cut short, compile the catalog in the background (so the
        service answers at once: germination defers until its kernel exists), warm up."""
        for job_id in self.store.unfinished():
            job = self.store.get(job_id)
            try:
                bp = await self.resolve(job.blueprint_id)
            except EsperError as e:
                self.store.fail(job_id, f"resuming: {type(e).__name__}: {e}")
                continue
            self._start(job_id, bp, job.site, store_blueprint=False)  # resolved from Urza
        if self.catalog_sites:
            task = asyncio.get_running_loop().create_task(
                self.ensure_catalog(self.catalog_sites, self.catalog))
            task.add_done_callback(_report_catalog)
            self._background.append(task)
        await self.warm_up()

    async def stop(self) -> None:
        """Cancel the catalog compile, let running jobs finish, release threads and store."""
        for t in self._background:
            t.cancel()
        await self.drain()
        self.close()
        self.store.close()

    @property
    def urza(self) -> UrzaLibrary:
        if self._urza is None:
            self._urza = self._urza_factory()
        return self._urza

    async def resolve(self, bp_or_id: blueprint_pb2.Blueprint | str) -> blueprint_pb2.Blueprint:
        """The blueprint to compile. An inline one gets its content id but is NOT stored yet:
        it reaches Urza only after it passed every check (see `_run`)."""
        if isinstance(bp_or_id, str):
            return await self._blocking(self.urza.get_blueprint, bp_or_id,
                                           self.config.urza_timeout_s)
        bp = blueprint_pb2.Blueprint()
        bp.CopyFrom(bp_or_id)
        bp.blueprint_id = blueprint_id(bp)
        return bp

    async def _store_blueprint(self, bp: blueprint_pb2.Blueprint) -> None:
        stored_id, _ = await self._blocking(self.urza.put_blueprint, bp,
                                               self.config.urza_timeout_s)
        if stored_id != bp.blueprint_id:
            raise FailedPreconditionError(f"Urza stored blueprint as {stored_id}, Tezzeret "
                                          f"computed {bp.blueprint_id}: id schemes disagree")

    async def compile(self, bp_or_id: blueprint_pb2.Blueprint | str,
                      site: seed_pb2.SiteSignature, *, wait: bool,
                      timeout_s: float | None = None) -> pb.CompileJob:
        check_site(site)
        inline = not isinstance(bp_or_id, str)
        bp = await self.resolve(bp_or_id)
        if site.layout not in bp.layouts:
            raise FailedPreconditionError(
                f"blueprint {bp.blueprint_id} supports layouts "
                f"{[layout_name(x) for x in bp.layouts]}, not {layout_name(site.layout)}")
        validate_ir(bp.ir, site)
        job, _ = self.store.get_or_create(bp.blueprint_id, site)
        if job.state == pb.COMPILE_JOB_STATE_FAILED:
            # Validation failures repeat, but a failed upload (Urza down) deserves a retry.
            self.store.set_state(job.job_id, pb.COMPILE_JOB_STATE_QUEUED)
            job.state = pb.COMPILE_JOB_STATE_QUEUED
        if job.state != pb.COMPILE_JOB_STATE_SUCCEEDED:
            task = self._start(job.job_id, bp, site, store_blueprint=inline)
            if wait:
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return self.store.get(job.job_id)

    def _start(self, job_id: str, bp: blueprint_pb2.Blueprint, site: seed_pb2.SiteSignature,
               *, store_blueprint: bool) -> asyncio.Task[None]:
        task = self._tasks.get(job_id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._run(job_id, bp, site, store_blueprint=store_blueprint))
            self._tasks[job_id] = task
        return task

    async def _run(self, job_id: str, bp: blueprint_pb2.Blueprint,
                   site: seed_pb2.SiteSignature, *, store_blueprint: bool) -> None:
        async with self._jobs_running:
            await self._run_job(job_id, bp, site, store_blueprint=store_blueprint)

    async def _run_job(self, job_id: str, bp: blueprint_pb2.Blueprint,
                       site: seed_pb2.SiteSignature, *, store_blueprint: bool) -> None:
        self.store.set_state(job_id, pb.COMPILE_JOB_STATE_RUNNING)
        t = self.config.urza_timeout_s
        try:
            # A kernel Urza already holds for this pair wins (idempotent across lost job state).
            records, _ = await self._blocking(self.urza.query_kernels, t,
                                                 blueprint_id=bp.blueprint_id, site=site)
            mine = [r for r in records if r.manifest.site == site]
            if mine:
                self.store.succeed(job_id, mine[0].kernel_id, mine[0].manifest)
                return
            ck = await self._blocking(
                compile_kernel, bp, site, self.key,
                benchmark_iters=self.config.benchmark_iters,
                benchmark_batch_size=self.config.benchmark_batch_size)
            # compile_kernel validated the blueprint for this site: only now may an inline
            # blueprint enter the library (a rejected proposal never reaches Urza).
            if store_blueprint:
                await self._store_blueprint(bp)
            stored, _ = await self._blocking(self.urza.put_kernel, ck.artifact_bytes, t)
            if stored != ck.kernel_id:
                raise FailedPreconditionError(f"Urza stored kernel as {stored}, expected "
                                              f"{ck.kernel_id}")
            self.store.succeed(job_id, ck.kernel_id, ck.manifest)
            log.info("tezzeret: %s at %s → %s", bp.blueprint_id, site_key(site), ck.kernel_id)
        except EsperError as e:
            log.warning("tezzeret: job %s failed: %s", job_id, e)
            self.store.fail(job_id, f"{type(e).__name__}: {e}")

    async def ensure_catalog(self, sites: list[seed_pb2.SiteSignature],
                             blueprints: list[blueprint_pb2.Blueprint]) -> list[pb.CompileJob]:
        """Compile every blueprint for every site it supports (done jobs are skipped)."""
        jobs = []
        for site in sites:
            for bp in blueprints:
                if supports(bp, site):
                    jobs.append(await self.compile(bp, site, wait=True))
        return jobs

    async def ensure_kernels(self, site: seed_pb2.SiteSignature, names: list[str] | tuple[str, ...] = (),
                             *, wait: bool, timeout_s: float | None = None
                             ) -> tuple[list[pb.CompileJob], list[str]]:
        """Start (or find) a job per catalog blueprint supporting `site`; (jobs, unsupported).

        With `wait`, returns when all jobs finished or `timeout_s` (the caller's time left)
        is nearly spent, whichever comes first: a late answer would reach no one.

        Raises:
            InvalidArgumentError: `names` has a blueprint that is not in the catalog.
        """
        check_site(site)
        by_name = {bp.name: bp for bp in self.catalog}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InvalidArgumentError(
                f"blueprint(s) {unknown} are not in Tezzeret's catalog; catalog: "
                f"{', '.join(by_name) or '(empty)'}", field="blueprint_names")
        chosen = [by_name[n] for n in names] if names else self.catalog
        supported = [bp for bp in chosen if supports(bp, site)]
        unsupported = [bp.name for bp in chosen if bp not in supported]
        start = time.monotonic()
        jobs = [await self.compile(bp, site, wait=False) for bp in supported]
        if wait:
            pending = [t for j in jobs if (t := self._tasks.get(j.job_id)) is not None
                       and not t.done()]
            if pending:
                budget = None
                if timeout_s is not None:
                    # Answer before the caller gives up: keep a tenth (at most 0.5 s) spare.
                    budget = max(0.0, timeout_s - min(0.5, 0.1 * timeout_s)
                                 - (time.monotonic() - start))
                await asyncio.wait(pending, timeout=budget)
            jobs = [self.store.get(j.job_id) for j in jobs]
        return jobs, unsupported

    async def drain(self) -> None:
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def warm_up(self) -> None:
        """Import what a process's first compile imports lazily: FlopCounterMode pulls in
        torch._dynamo (4-6 s measured; later compiles take ~0.05 s each), which an
        on-demand compile would otherwise add to a run's wait. Awaited before the service
        reports SERVING, so a shutdown never has to wait for a half-done import."""
        await self._blocking(importlib.import_module, "torch._dynamo")


def signing_key_for(state_dir: Path, config: TezzeretConfig) -> SigningKey:
    """The configured key file, else ESPER_SIGNING_KEY(_FILE), else one created on first
    start in `state_dir`."""
    if config.signing_key_file:
        return SigningKey.from_file(config.signing_key_file)
    if os.environ.get("ESPER_SIGNING_KEY") or os.environ.get("ESPER_SIGNING_KEY_FILE"):
        return SigningKey.from_env()
    return SigningKey.load_or_create(state_dir / "signing_key.pem")


def trusted_keys_dir(config: TezzeretConfig, data_dir: Path) -> Path:
    """Where Tezzeret publishes its public key: the setting, else ESPER_TRUSTED_KEYS_DIR,
    else `<data_dir>/trusted_keys`."""
    return Path(config.trusted_keys_dir or os.environ.get("ESPER_TRUSTED_KEYS_DIR")
                or data_dir / "trusted_keys")


def publish_public_key(directory: Path, key: SigningKey) -> Path | None:
    """Write the public key into `directory`, where Urza and the loaders trust keys.

    Returns the file, or None when nothing was written: the key is already trusted there
    (deploy/k8s mounts a ConfigMap made from the key pair), or the directory is read-only
    (a Secret/ConfigMap mount): then the operator puts the key there, and a log line says so.
    """
    if directory.is_dir() and key.key_id in TrustedKeys.from_dir(directory):
        log.info("tezzeret: signing key %s is already trusted in %s; not publishing it",
                 key.key_id, directory)
        return None
    path = directory / f"tezzeret-{key.key_id}.pub"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            atomic_write(path, key.public_pem())
    except OSError as e:
        if not isinstance(e, PermissionError) and e.errno != errno.EROFS:
            raise
        log.warning("tezzeret: cannot publish signing key %s into %s (%s); Urza and the "
                    "workers will reject its kernels until that key is trusted there (see "
                    "deploy/k8s/README.md: the esper-trusted-keys ConfigMap)",
                    key.key_id, directory, e.strerror)
        return None
    return path


def _report_catalog(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        log.warning("tezzeret: catalog compilation cancelled")
    elif task.exception() is not None:
        log.error("tezzeret: catalog compilation failed: %s", task.exception())
    else:
        jobs = task.result()
        failed = [j.job_id for j in jobs if j.state != pb.COMPILE_JOB_STATE_SUCCEEDED]
        log.info("tezzeret: catalog ready, %d kernels, %d not succeeded %s", len(jobs),
                 len(failed), failed)


__all__ = ["TezzeretCore", "publish_public_key", "signing_key_for", "trusted_keys_dir"]
