"""The job registry: who may register, what it describes, how it coerces and refuses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from esper.errors import ConfigError, FailedPreconditionError
from esper.jobs import Job, JobBuildError, JobConfigError
from esper.jobs.registry import BUILTIN_JOBS, MAX_PARAMS, MAX_VALUE_CHARS, JobRegistry

SAMPLE = "tests.unit.jobs.sample_jobs"
ROOT = Path(__file__).resolve().parents[3]


def _reg(**jobs: str) -> JobRegistry:
    return JobRegistry.discover({k.replace("_", "-"): f"{SAMPLE}:{v}" for k, v in jobs.items()},
                                entry_points=False)


def test_builtin_jobs_are_the_entry_points_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["esper.jobs"]
    assert declared == BUILTIN_JOBS
    reg = JobRegistry.discover()
    assert {"mnist1d", "digits", "spirals"} <= set(reg.names())
    info = reg.describe("mnist1d")
    assert info.source == "builtin" and info.description.startswith("MNIST-1D")
    host = next(p for p in info.params if p.name == "host")
    assert host.choices == ("mlp", "cnn") and host.default == "cnn" and host.doc.startswith("the host")
    assert {p.name: p.run_field for p in info.params if p.run_field} == {"seed": "seed",
                                                                         "batch_size": "batch_size"}


def test_describe_reads_types_defaults_choices_and_docs() -> None:
    info = _reg(tiny="tiny").describe("tiny")
    params = {p.name: p for p in info.params}
    assert info.description == "A 4-feature two-class toy with a two-branch model."
    assert (params["hidden"].type, params["hidden"].default) == ("int", "6")
    assert params["rows"].doc == "examples in the training split (validation gets a quarter of that)."
    assert params["mode"].choices == ("sum", "xor")
    assert params["noise"].optional and params["noise"].default == "" and params["noise"].type == "float"
    assert (params["verbose"].type, params["verbose"].default) == ("bool", "false")


def test_coerce_turns_strings_into_the_declared_types() -> None:
    reg = _reg(tiny="tiny")
    got = reg.coerce("tiny", {"hidden": "12", "mode": "xor", "noise": "0.5", "verbose": "Yes"},
                     run={"seed": 3, "batch_size": 16})
    assert got == {"hidden": 12, "mode": "xor", "noise": 0.5, "verbose": True, "seed": 3,
                   "batch_size": 16}
    assert reg.coerce("tiny", {"noise": "none"})["noise"] is None


@pytest.mark.parametrize(("params", "field", "words"), [
    ({"hiden": "3"}, "job_params.hiden", "its parameters: hidden, rows, mode, noise, verbose"),
    ({"hidden": "3.5"}, "job_params.hidden", "is not an integer"),
    ({"noise": "inf"}, "job_params.noise", "is not a finite number"),
    ({"verbose": "maybe"}, "job_params.verbose", "is not true or false"),
    ({"mode": "and"}, "job_params.mode", "is not one of: sum, xor"),
    ({"seed": "4"}, "job_params.seed", "set by the run's config.seed"),
    ({"mode": "x" * (MAX_VALUE_CHARS + 1)}, "job_params.mode", f"at most {MAX_VALUE_CHARS}"),
    ({f"p{i}": "1" for i in range(MAX_PARAMS + 1)}, "job_params", f"at most {MAX_PARAMS}"),
])
def test_bad_params_name_their_field(params: dict, field: str, words: str) -> None:
    with pytest.raises(JobConfigError, match=words) as e:
        _reg(tiny="tiny").coerce("tiny", params)
    assert e.value.field == field


def test_required_params_and_unknown_jobs() -> None:
    reg = _reg(tiny="tiny", needs="required")
    with pytest.raises(JobConfigError, match="needs parameter 'size'") as e:
        reg.coerce("needs", {})
    assert e.value.field == "job_params.size"
    assert reg.coerce("needs", {"size": "2"}) == {"size": 2}
    with pytest.raises(JobConfigError, match="job 'nope' is not registered; registered jobs: "
                                             "digits, mnist1d, needs, spirals, tiny") as e:
        reg.target("nope")
    assert e.value.field == "job"


def test_a_name_registered_twice_with_another_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="'mnist1d' is registered twice: esper.tasks.mnist1d:job"):
        JobRegistry.discover({"mnist1d": f"{SAMPLE}:tiny"}, entry_points=False)
    # the same pair again is fine (e.g. the builtin and its own entry point)
    JobRegistry.discover({"mnist1d": BUILTIN_JOBS["mnist1d"]})


@pytest.mark.parametrize("target", ["tests/unit/jobs/sample_jobs.py", "os.system", "a:b c",
                                    "mod:func; rm -rf /"])
def test_targets_must_be_module_colon_function(target: str) -> None:
    with pytest.raises(ConfigError, match="must be 'package.module:function'"):
        JobRegistry.discover({"x": target}, entry_points=False)


@pytest.mark.parametrize(("fn", "words"), [
    ("bad_signature", "must be named"), ("unannotated", "no type annotation"),
    ("bad_type", "job parameters must be str, int, float, bool"),
])
def test_signatures_a_job_cannot_have_are_config_errors(fn: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        _reg(j=fn).describe("j")


def test_unimportable_target_is_failed_precondition_naming_the_registration() -> None:
    reg = JobRegistry.discover({"gone": "no_such_pkg.jobs:job"}, entry_points=False)
    with pytest.raises(FailedPreconditionError, match=r"job 'gone' \(no_such_pkg.jobs:job, "
                                                      r"platform config\) cannot be imported"):
        reg.describe("gone")


def test_build_returns_the_job_named_and_reports_what_the_job_raised() -> None:
    reg = _reg(tiny="tiny", broken="broken", wrong="not_a_job")
    job = reg.build("tiny", {"hidden": "3"}, run={"seed": 1, "batch_size": 8})
    assert isinstance(job, Job) and job.name == "tiny" and len(job.train_loader) == 12
    with pytest.raises(JobBuildError, match="job 'broken' raised while building: FileNotFoundError: "
                                            "/data/train.csv"):
        reg.build("broken", {})
    with pytest.raises(JobBuildError, match="returned a dict, not an esper.jobs.Job"):
        reg.build("wrong", {})


def test_a_job_checks_what_it_holds() -> None:
    job = _reg(tiny="tiny").build("tiny", {})
    with pytest.raises(JobBuildError, match="val_loader is a list, not a DataLoader; sites=.* must be"):
        Job(model=job.model, train_loader=job.train_loader, val_loader=[], loss_fn=job.loss_fn,
            metric_fn=None, example_input=job.example_input, sites=[])
