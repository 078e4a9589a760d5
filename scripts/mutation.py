"""Mutation check of the safety-critical code whose bugs are silent (run by scripts/mutation.sh).

Each group mutates a few modules with mutmut (3.x) and runs only the tests that cover
them, in a scratch copy of the working tree (the worktree itself is never mutated), then
prints per module: mutants, killed, timed out, survived, without tests, not checked, and
the survival rate = survived / (killed + timed out + survived). A timeout counts as
detected (the mutant made the tests hang). Survivors are written with their diffs to
`<work dir>/<group>/survivors.txt` for review: a survivor is either a behaviour gap (write
the test that kills it) or an equivalent mutant (list it in docs/MUTATION.md).

    python scripts/mutation.py                     # every group
    python scripts/mutation.py governor auth       # some groups
    --jobs N (default 2)  --timeout-s S per group (default 1800; what is left is "not checked")
    --work-dir D (default: a new temp dir, kept for `mutmut show` / `mutmut apply`)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Group:
    modules: tuple[str, ...]
    """Files mutated."""
    tests: tuple[str, ...]
    """Test files / node ids that cover them (and only those run)."""
    functions: tuple[str, ...] = ()
    """fnmatch patterns of mutant names to run (empty: every mutant of `modules`)."""
    deselect: tuple[str, ...] = ()
    """Tests the environment cannot run (pytest -k expression parts to exclude)."""
    extra: dict[str, object] = field(default_factory=dict)


_SLOT = "esper.kasmina.slot.xǁSeedSlotǁ"
_PUB = "esper.oona.publisher.xǁPublisherǁ"
_BUS = "tests/integration/oona/test_bus.py::"

GROUPS: dict[str, Group] = {
    # Kasmina's slot forward/backward: the stage-dependent forward, its statistics hooks,
    # germination (gate, function preservation), prune; the blend backends on CPU.
    "kasmina": Group(
        modules=("esper/kasmina/slot.py", "esper/kasmina/backends/torch_backend.py",
                 "esper/kasmina/backends/__init__.py"),
        tests=("tests/unit/kasmina/test_kasmina_lifecycle.py", "tests/unit/kasmina/test_incubator_isolation.py",
               "tests/unit/kasmina/test_kasmina_blend.py", "tests/unit/kasmina/test_prune_events.py",
               "tests/unit/kasmina/test_blend_selection.py",
               # the forward hook also gathers the slot's health statistics
               "tests/unit/kasmina/test_kasmina_health.py", "tests/unit/kasmina/test_host_grad_signal.py"),
        functions=tuple(f"{_SLOT}{f}__mutmut_*" for f in (
            "forward", "_hook", "_record_output_gradient", "_record_activation", "record_gradients",
            "update_hook", "germinate", "_germination_gate", "start_training", "prune", "alpha"))
        + ("esper.kasmina.backends.torch_backend.*", "esper.kasmina.backends.x_select_blend__mutmut_*",
           "esper.kasmina.backends.x_blend__mutmut_*"),
        # Without CUDA the CuPy tests skip; the NVRTC compile test fails where the venv has no nvrtc.
        deselect=("nvrtc",),
    ),
    # Artifact verification: signature, hashes, header bound, tensor checks; the loader's caches.
    "artifact": Group(
        modules=("esper/blueprints/artifact.py", "esper/kasmina/loader.py"),
        tests=("tests/unit/blueprints/test_artifact.py", "tests/unit/loader/test_loader.py",
               "tests/unit/loader/test_malicious_corpus.py", "tests/unit/loader/test_artifact_edges.py"),
    ),
    # The governor: explosion detection, last-known-good, rollback limits.
    "governor": Group(
        modules=("esper/tolaria/governor.py",),
        tests=("tests/unit/tolaria/test_resume_governor.py::test_governor_detects_explosions_and_limits_rollbacks",
               "tests/unit/tolaria/test_resume_governor.py::test_governor_rolls_back_on_nan_prunes_seeds_and_resets_optimizer",
               "tests/unit/tolaria/test_rollback_restores.py", "tests/unit/tolaria/test_governor_boundaries.py"),
    ),
    # Auth scopes: key parsing, scope matching, where the key is read from.
    "auth": Group(
        modules=("esper/runtime/auth.py",),
        tests=("tests/unit/runtime/test_auth_config.py", "tests/unit/runtime/test_auth_edges.py",
               "tests/unit/runtime/test_host.py::test_auth_on_a_read_method",
               "tests/unit/runtime/test_host.py::test_write_methods_need_the_write_scope_streams_included",
               "tests/unit/runtime/test_host.py::test_health_is_serving_and_open"),
    ),
    # The publisher: Nats-Msg-Id dedup, drop counting, outage/recovery accounting (real nats-server).
    "publisher": Group(
        modules=("esper/oona/publisher.py",),
        tests=("tests/unit/oona/test_publisher_thread_death.py", "tests/unit/oona/test_client_config.py",
               f"{_BUS}test_round_trip", f"{_BUS}test_same_event_published_twice_is_stored_once",
               f"{_BUS}test_publish_never_blocks_while_nats_is_down", f"{_BUS}test_publishing_resumes_after_restart",
               f"{_BUS}test_publisher_started_before_the_server",
               f"{_BUS}test_rejected_envelope_is_counted_and_does_not_block_the_queue",
               f"{_BUS}test_publish_from_many_threads", "tests/integration/oona/test_publisher_accounting.py"),
        functions=tuple(f"{_PUB}{f}__mutmut_*" for f in (
            "publish", "stats", "close", "_thread_main", "_mark_down", "_mark_up", "_run", "_take_batch",
            "_requeue", "_report_overflow", "_finish", "_publish_batch", "flush")),
    ),
}

_STATUS = re.compile(r"^\s*(\S+): (killed|survived|timeout|no tests|not checked|skipped|suspicious|segfault|"
                     r"check was interrupted by user|caught by type check)\s*$")


def _copy_tree(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree (no .venv, no caches)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f.decode()
        if src.is_file():
            out = dst / f.decode()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)


def _toml_list(items) -> str:
    return "[" + ", ".join('"' + str(i).replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "]"


def _configure(work: Path, group: Group) -> None:
    py = work / "pyproject.toml"
    text = py.read_text()
    # mutmut puts its mutated copy first on sys.path; pytest's pythonpath would put the
    # original tree back in front of it.
    text = text.replace('pythonpath = ["."]\n', "")
    args = ["-p", "no:cacheprovider", "-q", "-x"]
    if group.deselect:
        args += ["-k", " and ".join(f"not {d}" for d in group.deselect)]
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["esper"]\n'
        f"only_mutate = {_toml_list(group.modules)}\n"
        'also_copy = ["generated", "kernels", "proto", "scripts", "benchmarks", "buf.yaml"]\n'
        f"pytest_add_cli_args_test_selection = {_toml_list(group.tests)}\n"
        f"pytest_add_cli_args = {_toml_list(args)}\n"
        # torch's thread pools and gRPC are not fork-safe: a mutant forked from a process
        # that ran them can hang and be counted as a timeout. A fork server forks the
        # mutants from a process that has only imported and collected.
        'process_isolation = "forkserver"\n'
    )
    py.write_text(text)


def _module_of(mutant: str) -> str:
    """`esper.a.b.xǁClassǁmethod__mutmut_3` / `esper.a.b.x_function__mutmut_3` -> its file."""
    path = mutant.split(".x", 1)[0].replace(".", "/")
    return f"{path}.py" if (ROOT / f"{path}.py").is_file() else f"{path}/__init__.py"


def run_group(name: str, group: Group, base: Path, jobs: int, timeout_s: float,
              only: tuple[str, ...] = ()) -> dict[str, Counter]:
    work = base / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    _copy_tree(work)
    _configure(work, group)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.monotonic()
    patterns = only or group.functions
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *patterns]
    with open(work / "mutmut-run.log", "wb") as log:
        # Its own process group: on timeout the fork server and the workers go with it.
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"stopped at the {timeout_s:.0f}s budget"
    elapsed = time.monotonic() - t0
    res = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True, check=False)
    counts: dict[str, Counter] = {}
    survivors: list[str] = []
    selected = [re.compile(_glob(p)) for p in patterns]
    for line in res.stdout.splitlines():
        m = _STATUS.match(line)
        if not m:
            continue
        mutant, status = m.groups()
        if selected and not any(p.fullmatch(mutant) for p in selected):
            continue  # outside the functions this group checks
        counts.setdefault(_module_of(mutant), Counter())[status] += 1
        if status == "survived":
            survivors.append(mutant)
    with open(work / "survivors.txt", "w") as out:
        for s in survivors:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", s], cwd=work, env=env,
                                  capture_output=True, text=True, check=False).stdout
            out.write(f"## {s}\n{diff}\n")
    print(f"[{name}] mutmut exit {rc} after {elapsed:.0f}s; survivors: {work / 'survivors.txt'}", flush=True)
    return counts


def _glob(pattern: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all of {list(GROUPS)})")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("ESPER_MUTATION_JOBS", "2")))
    ap.add_argument("--timeout-s", type=float, default=float(os.environ.get("ESPER_MUTATION_GROUP_TIMEOUT_S", "1800")))
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--only", action="append", default=[],
                    help="fnmatch pattern of mutant names to run instead of the group's (repeatable), "
                         "e.g. 'esper.kasmina.slot.xǁSeedSlotǁrecord_gradients__mutmut_*'")
    ns = ap.parse_args(argv)
    unknown = [g for g in ns.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown groups {unknown}; known: {list(GROUPS)}")
    if not 1 <= ns.jobs <= 8:
        ap.error(f"--jobs={ns.jobs}: must be in [1, 8]")
    base = ns.work_dir or Path(tempfile.mkdtemp(prefix="esper-mutation-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"mutation check in {base} ({ns.jobs} job(s), {ns.timeout_s:.0f}s per group)", flush=True)
    rows: list[tuple[str, str, Counter]] = []
    for name in ns.groups or list(GROUPS):
        for module, c in sorted(run_group(name, GROUPS[name], base, ns.jobs, ns.timeout_s,
                                          tuple(ns.only)).items()):
            rows.append((name, module, c))
    print()
    print("| group | module | mutants | killed | timeout | survived | no tests | not checked | survival |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = Counter()
    for name, module, c in rows:
        total.update(c)
        print(_row(name, module, c))
    print(_row("all", "", total))
    return 0


def _row(name: str, module: str, c: Counter) -> str:
    judged = c["killed"] + c["timeout"] + c["survived"]
    rate = f"{100 * c['survived'] / judged:.1f}%" if judged else "-"
    return (f"| {name} | {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | "
            f"{c['no tests']} | {c['not checked']} | {rate} |")


if __name__ == "__main__":
    sys.exit(main())
