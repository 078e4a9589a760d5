"""Errors of the jobs layer; each carries the dotted run-config field it is about."""

from __future__ import annotations

from esper.errors import ConfigError, EsperError


class JobConfigError(ConfigError):
    """A job name, job parameter or site is invalid; `field` is its path in a run config
    ("job", "job_params.width", "sites[1]"), so a service can answer INVALID_ARGUMENT
    naming `config.<field>`."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class JobBuildError(EsperError):
    """A registered job's function raised, or returned something that is not a `Job`.

    The run cannot start; retrying the same job with the same parameters fails the same way.
    """

    reason = "JOB_BUILD_FAILED"
