"""Jobs: what the platform trains, as operator-registered Python entry points.

A job is a function `def my_job(*, lr: float = 0.01, ...) -> Job` returning the model,
the data loaders, the loss and the metric for the given parameters. Operators register
jobs by name (`esper.jobs.registry`): in the platform config (`tolaria.jobs`), or as the
`esper.jobs` entry-point group of an installed package. A client of the platform names a
registered job and passes string parameters; it never names an import path.

Library layer: imports torch, never gRPC, the bus or a service package.
"""

from esper.jobs.errors import JobBuildError, JobConfigError
from esper.jobs.spec import Job

__all__ = ["Job", "JobBuildError", "JobConfigError"]
