"""The job registry: names an operator registered → job functions, described and called safely.

Jobs come from three places, all of them chosen by whoever runs the platform, never by a
client (naming an import path in a request would be code execution by request):

* Esper's built-in jobs (`BUILTIN_JOBS`: MNIST-1D, digits, spirals), which the `esper`
  distribution also declares in its `esper.jobs` entry points;
* the `esper.jobs` entry-point group of every installed package
  (`[project.entry-points."esper.jobs"] my-job = "my_pkg.jobs:my_job"`);
* the platform config: `tolaria: {jobs: {my-job: "my_pkg.jobs:my_job"}}` (or
  `ESPER_TOLARIA_JOBS='{my-job: "my_pkg.jobs:my_job"}'`).

A name registered twice with different targets is a `ConfigError`: no source silently wins.

A job function takes keyword parameters with annotations and defaults:

    def my_job(*, hidden: int = 32, lr_scale: float = 1.0, arch: Literal["mlp", "cnn"] = "mlp",
               seed: int = 0, batch_size: int = 64) -> Job:
        \"\"\"One line that `esper jobs list` shows.

        Args:
            hidden: width of the hidden layers.
        \"\"\"

Parameter types may be `str`, `int`, `float`, `bool`, a `Literal[...]` of strings or
ints (its values are the choices), or any of these `| None`. `coerce` turns a run's string
parameters into those types and refuses unknown names, missing required ones, bad values
and oversized input with `JobConfigError(field="job_params.<name>")`. Two parameter names
are *run parameters*: `seed` and `batch_size`, when a job declares them, come from the
run config (`RunConfig.seed`, `RunConfig.batch_size`), not from `job_params`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from esper.errors import ConfigError, FailedPreconditionError
from esper.jobs.errors import JobBuildError, JobConfigError

ENTRY_POINT_GROUP = "esper.jobs"
BUILTIN_JOBS: dict[str, str] = {
    "mnist1d": "esper.tasks.mnist1d:job",
    "digits": "esper.tasks.digits:job",
    "spirals": "esper.tasks.spirals:job",
}
"""Esper's own jobs. pyproject.toml declares the same ones as `esper.jobs` entry points (a
test keeps the two equal); listing them here too means a source checkout whose installed
metadata predates them still has them."""
RUN_PARAMETERS = ("seed", "batch_size")
"""Job parameters that the run config sets (`RunConfig.seed`, `RunConfig.batch_size`)."""
MAX_PARAMS = 32
MAX_NAME_CHARS = 64
MAX_VALUE_CHARS = 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_SCALARS: dict[type, str] = {str: "str", int: "int", float: "float", bool: "bool"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True, kw_only=True)
class JobParam:
    """One parameter of a job function, as `ListJobs` shows it."""

    name: str
    type: str
    """"str", "int", "float" or "bool"."""
    default: str | None
    """The default as a client would send it ("" for a `None` default); None: required."""
    doc: str = ""
    """From the function docstring's `Args:` section."""
    choices: tuple[str, ...] = ()
    """Allowed values (a `Literal` annotation); empty: any value of the type."""
    optional: bool = False
    """The annotation allows None (sent as "" or "none")."""
    run_field: str = ""
    """Set from this run-config field ("seed", "batch_size"), not from `job_params`."""


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """A registered job: where it comes from, what it is, what it takes."""

    name: str
    target: str
    """"package.module:function"."""
    source: str
    """"builtin", "entry point of <distribution>" or "platform config"."""
    description: str
    params: tuple[JobParam, ...]


@dataclass(frozen=True)
class _Spec:
    """A parameter as the registry coerces it."""

    param: JobParam
    kind: type
    has_default: bool


def _check_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: job name {name!r} must be 1-64 characters of letters, digits, "
                          "'_', '.' or '-', starting with a letter or digit")


def _check_target(name: str, target: Any, where: str) -> str:
    if not isinstance(target, str) or not _TARGET.match(target):
        raise ConfigError(f"{where}: job {name!r} target {target!r} must be "
                          "'package.module:function'")
    return target


class JobRegistry:
    """Registered jobs by name. Describing or building a job imports its module."""

    def __init__(self) -> None:
        self._targets: dict[str, str] = {}
        self._sources: dict[str, str] = {}
        self._infos: dict[str, tuple[JobInfo, dict[str, _Spec]]] = {}

    # ---- registration ---------------------------------------------------------------
    @classmethod
    def discover(cls, configured: Mapping[str, str] | None = None, *,
                 entry_points: bool = True) -> JobRegistry:
        """Built-in jobs, then installed entry points (`entry_points`), then `configured`
        (the platform config's `tolaria.jobs`)."""
        reg = cls()
        for name, target in BUILTIN_JOBS.items():
            reg.register(name, target, source="builtin")
        if entry_points:
            for name, value, dist in installed_entry_points():
                reg.register(name, value, source=f"entry point of {dist}")
        if configured is not None:
            if not isinstance(configured, Mapping):
                raise ConfigError(f"tolaria.jobs must map job names to 'package.module:function', "
                                  f"got {type(configured).__name__}")
            for name, target in configured.items():
                reg.register(name, target, source="platform config")
        return reg

    def register(self, name: str, target: str, *, source: str) -> None:
        """Add `name` → `target`; the same pair again is a no-op, another target an error."""
        where = f"job registered by {source}"
        _check_name(name, where)
        _check_target(name, target, where)
        known = self._targets.get(name)
        if known is not None and known != target:
            raise ConfigError(
                f"job name {name!r} is registered twice: {known} ({self._sources[name]}) and "
                f"{target} ({source}); give one of them another name")
        self._targets[name] = target
        self._sources.setdefault(name, source)

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def target(self, name: str) -> str:
        """The registered target of `name`.

        Raises:
            JobConfigError: `name` is not registered (field "job"; lists the registered jobs).
        """
        try:
            return self._targets[name]
        except KeyError:
            raise JobConfigError(
                f"job {name!r} is not registered; registered jobs: {', '.join(self.names())} "
                "(operators register jobs in the platform config's tolaria.jobs or with an "
                f"{ENTRY_POINT_GROUP!r} entry point)", field="job") from None

    # ---- describing -----------------------------------------------------------------
    def function(self, name: str) -> Callable[..., Any]:
        """Import and return the job function (FailedPreconditionError if it cannot be)."""
        target = self.target(name)
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:
            raise FailedPreconditionError(
                f"job {name!r} ({target}, {self._sources[name]}) cannot be imported: "
                f"{type(e).__name__}: {e}; fix the registration or install its package") from e
        if not callable(obj):
            raise FailedPreconditionError(f"job {name!r} ({target}) is a {type(obj).__name__}, "
                                          "not a function")
        return obj

    def describe(self, name: str) -> JobInfo:
        return self._described(name)[0]

    def infos(self) -> list[JobInfo]:
        return [self.describe(n) for n in self.names()]

    def _described(self, name: str) -> tuple[JobInfo, dict[str, _Spec]]:
        if name not in self._infos:
            fn = self.function(name)
            specs = _parameters(name, fn)
            doc = inspect.getdoc(fn) or ""
            info = JobInfo(name=name, target=self._targets[name], source=self._sources[name],
                           description=doc.split("\n\n")[0].replace("\n", " ").strip(),
                           params=tuple(s.param for s in specs.values()))
            self._infos[name] = (info, specs)
        return self._infos[name]

    # ---- using ----------------------------------------------------------------------
    def coerce(self, name: str, params: Mapping[str, str], *,
               run: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for the job function: `params` coerced, run parameters added.

        Raises:
            JobConfigError: unknown job (field "job"), too many or oversized parameters, an
                unknown, missing or run-set name, or a value that is not of the parameter's
                type or choices (field "job_params.<name>").
        """
        _, specs = self._described(name)
        if len(params) > MAX_PARAMS:
            raise JobConfigError(f"{len(params)} job parameters given; at most {MAX_PARAMS} "
                                 "are allowed", field="job_params")
        kwargs: dict[str, Any] = {}
        allowed = ", ".join(n for n, s in specs.items() if not s.param.run_field) or "none"
        for key, raw in params.items():
            field = f"job_params.{key}"
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_NAME_CHARS:
                raise JobConfigError(f"job parameter name {key!r} must be 1-{MAX_NAME_CHARS} "
                                     "characters", field="job_params")
            if not isinstance(raw, str) or len(raw) > MAX_VALUE_CHARS:
                raise JobConfigError(f"{field}: the value must be a string of at most "
                                     f"{MAX_VALUE_CHARS} characters", field=field)
            spec = specs.get(key)
            if spec is None:
                raise JobConfigError(f"job {name!r} has no parameter {key!r}; its parameters: "
                                     f"{allowed}", field=field)
            if spec.param.run_field:
                raise JobConfigError(
                    f"{field}: {key!r} is set by the run's config.{spec.param.run_field}, not by "
                    "job_params", field=field)
            kwargs[key] = _coerce(spec, raw, field)
        for key, spec in specs.items():
            if spec.param.run_field:
                if run is not None and spec.param.run_field in run:
                    kwargs[key] = run[spec.param.run_field]
            elif key not in kwargs and not spec.has_default:
                raise JobConfigError(f"job {name!r} needs parameter {key!r} "
                                     f"({spec.param.type}); none was given",
                                     field=f"job_params.{key}")
        return kwargs

    def build(self, name: str, params: Mapping[str, str], *,
              run: Mapping[str, Any] | None = None) -> Any:
        """Call the job function with coerced parameters and check that it returned a `Job`.

        Raises:
            JobConfigError: as `coerce`.
            JobBuildError: the function raised (the message has its error) or returned
                something that is not a `Job`.
        """
        from esper.jobs.spec import Job

        kwargs = self.coerce(name, params, run=run)
        fn = self.function(name)
        try:
            job = fn(**kwargs)
        except JobBuildError:
            raise
        except Exception as e:
            raise JobBuildError(f"job {name!r} raised while building: {type(e).__name__}: {e}") from e
        if not isinstance(job, Job):
            raise JobBuildError(f"job {name!r} ({self._targets[name]}) returned a "
                                f"{type(job).__name__}, not an esper.jobs.Job")
        job.name = name
        return job


def _parameters(name: str, fn: Callable[..., Any]) -> dict[str, _Spec]:
    """The function's parameters as specs; ConfigError for a signature jobs cannot have."""
    where = f"job {name!r}"
    try:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ConfigError(f"{where}: cannot read its signature: {type(e).__name__}: {e}") from e
    docs = _arg_docs(inspect.getdoc(fn) or "")
    out: dict[str, _Spec] = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ConfigError(f"{where}: parameter {p.name!r} is {p.kind.description}; job "
                              "parameters must be named (keyword) parameters")
        if p.name not in hints:
            raise ConfigError(f"{where}: parameter {p.name!r} has no type annotation")
        kind, choices, optional = _annotation(where, p.name, hints[p.name])
        has_default = p.default is not inspect.Parameter.empty
        default = None
        if has_default:
            default = "" if p.default is None else _render(p.default)
        out[p.name] = _Spec(
            JobParam(name=p.name, type=_SCALARS[kind], default=default, doc=docs.get(p.name, ""),
                     choices=choices, optional=optional,
                     run_field=p.name if p.name in RUN_PARAMETERS else ""),
            kind, has_default)
    return out


def _annotation(where: str, pname: str, hint: Any) -> tuple[type, tuple[str, ...], bool]:
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            hint, optional = rest[0], True
    if typing.get_origin(hint) is typing.Literal:
        values = typing.get_args(hint)
        kinds = {type(v) for v in values}
        if len(kinds) == 1 and kinds <= {str, int}:
            return kinds.pop(), tuple(str(v) for v in values), optional
    elif hint in _SCALARS:
        return hint, (), optional
    raise ConfigError(f"{where}: parameter {pname!r} is annotated {hint!r}; job parameters must "
                      "be str, int, float, bool, a Literal of str or int values, or one of these "
                      "| None")


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _coerce(spec: _Spec, raw: str, field: str) -> Any:
    p = spec.param
    text = raw.strip()
    if p.optional and text.lower() in ("", "none"):
        return None
    try:
        if spec.kind is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError("not a boolean")
            value: Any = text.lower() in _TRUE
        elif spec.kind is int:
            value = int(text, 10)
        elif spec.kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError("not finite")
        else:
            value = raw
    except ValueError:
        want = {"bool": "true or false", "int": "an integer", "float": "a finite number",
                "str": "a string"}[p.type]
        raise JobConfigError(f"{field}: {raw!r} is not {want}", field=field) from None
    if p.choices and str(value) not in p.choices:
        raise JobConfigError(f"{field}: {raw!r} is not one of: {', '.join(p.choices)}", field=field)
    return value


def _arg_docs(doc: str) -> dict[str, str]:
    """`name: text` entries of a Google-style `Args:` section (continuation lines joined)."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:"))
    except StopIteration:
        return out
    indent: int | None = None
    current = ""
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        m = re.match(r"\s*(\w+)(?:\s*\(.*?\))?:\s*(.*)", line)
        if width == indent and m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out


@functools.cache
def installed_entry_points() -> tuple[tuple[str, str, str], ...]:
    """(name, target, distribution) of every `esper.jobs` entry point installed.

    Read once per process (scanning every installed distribution's metadata takes about
    a second): a package installed later needs a restart of the service to be seen.
    """
    from importlib.metadata import entry_points

    return tuple((ep.name, ep.value, getattr(ep.dist, "name", None) or "an installed package")
                 for ep in entry_points(group=ENTRY_POINT_GROUP))


_default: JobRegistry | None = None


def default_registry() -> JobRegistry:
    """Built-in jobs and installed entry points (no platform config): for in-process use."""
    global _default
    if _default is None:
        _default = JobRegistry.discover()
    return _default
