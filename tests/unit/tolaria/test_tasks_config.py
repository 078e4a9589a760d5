"""Tasks load offline with the expected shapes; configs reject what they do not know."""

from __future__ import annotations

import socket

import pytest
import torch

from esper.errors import ConfigError
from esper.jobs.errors import JobConfigError
from esper.tasks import TASKS, get_task, mnist1d, resolve_sites
from esper.tolaria.config import RunConfig, RunConfigError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a task tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    ("name", "shape", "sizes"),
    [
        ("mnist1d", (1, 40), (3600, 400, 1000)),
        ("digits", (1, 8, 8), (1258, 270, 269)),
        ("spirals", (2,), (2100, 450, 450)),
    ],
)
def test_task_loads_offline_with_fixed_splits(no_network: None, name: str, shape: tuple[int, ...],
                                              sizes: tuple[int, int, int]) -> None:
    if name == "mnist1d":
        mnist1d.generated.cache_clear()  # generate under the network block, not from cache
    task = get_task(name)
    d = task.load(3)
    assert d.input_shape == shape
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == sizes
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert int(d.y_train.max()) == d.num_classes - 1
    again = task.load(3)
    assert torch.equal(again.x_val, d.x_val) and torch.equal(again.y_train, d.y_train)
    other = task.load(4)
    assert not torch.equal(other.y_train, d.y_train)
    for host in task.hosts.values():
        model = host.build(1.0)
        assert model(d.x_train[:5]).shape == (5, d.num_classes)
        assert resolve_sites(model, host.default_sites) == list(host.default_sites)


def test_width_scales_the_host() -> None:
    host = get_task("mnist1d").host("mlp")
    narrow = sum(p.numel() for p in host.build(1.0).parameters())
    wide = sum(p.numel() for p in host.build(2.0).parameters())
    assert wide > 2 * narrow


def test_unknown_task_host_and_site_list_what_exists() -> None:
    # The tasks live in the library layer now (esper.tasks): their errors are the jobs
    # layer's JobConfigError, of which RunConfigError is the run-config kind.
    with pytest.raises(JobConfigError, match="available: mnist1d, digits, spirals") as e:
        get_task("cifar")
    assert e.value.field == "task"
    with pytest.raises(JobConfigError, match="available: mlp") as e:
        get_task("spirals").host("cnn")
    assert e.value.field == "host"
    model = get_task("mnist1d").host("cnn").build(1.0)
    with pytest.raises(JobConfigError, match="available: conv1, act1, pool1, conv2") as e:
        resolve_sites(model, ["act1", "body.9"])
    assert e.value.field == "sites[1]"
    assert set(TASKS) == {"mnist1d", "digits", "spirals"}


def test_unknown_config_keys_are_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="'learning_rte'") as e:
        RunConfig.from_dict({"task": "digits", "learning_rte": 0.1})
    assert e.value.field == "learning_rte"
    with pytest.raises(ConfigError, match="'lr'") as e:
        RunConfig.from_dict({"optimizer": {"lr": 0.1}})
    assert e.value.field == "optimizer.lr"
    with pytest.raises(ConfigError, match="'seeds'") as e:
        RunConfig.from_dict({"budget": {"seeds": 2}})
    assert e.value.field == "budget.seeds"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"budget": {"max_seeds": -1}}, "budget.max_seeds"),
        ({"budget": {"max_added_parameters": -5}}, "budget.max_added_parameters"),
        ({"epochs": 0}, "epochs"),
        ({"optimizer": {"name": "lamb"}}, "optimizer.name"),
        ({"optimizer": {"learning_rate": 0.0}}, "optimizer.learning_rate"),
        ({"controller": "oracle"}, "controller"),
        ({"width": -1.0}, "width"),
        ({"epochs": 3, "optimizer": {"warmup_epochs": 3}}, "optimizer.warmup_epochs"),
    ],
)
def test_bad_values_name_their_field(data: dict, field: str) -> None:
    with pytest.raises(RunConfigError) as e:
        RunConfig.from_dict(data)
    assert e.value.field == field
    assert field in str(e.value)


def test_proto_round_trip_and_defaults_for_zero_values() -> None:
    cfg = RunConfig.from_dict({
        "task": "digits", "host": "cnn", "sites": ["act2"], "controller": "random",
        "budget": {"max_seeds": 3, "max_added_parameters": 1000}, "epochs": 7, "seed": 9,
        "optimizer": {"name": "sgd", "learning_rate": 0.05, "schedule": "constant"},
        "batch_size": 32, "checkpoint_every": 2, "decide_timeout_s": 0.25, "width": 1.5,
        "labels": {"who": "test"},
    })
    assert RunConfig.from_proto(cfg.to_proto()) == cfg
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    msg = cfg.to_proto()
    msg.ClearField("optimizer")
    msg.ClearField("decide_timeout")
    msg.width = 0
    back = RunConfig.from_proto(msg)
    assert back.optimizer == RunConfig().optimizer
    assert back.width == 1.0 and back.decide_timeout_s == RunConfig().decide_timeout_s


def test_direct_construction_raises_value_error_and_replace_a_run_config_error() -> None:
    with pytest.raises(ValueError, match="^epochs: 0 must be >= 1"):
        RunConfig(epochs=0)
    with pytest.raises(RunConfigError) as e:
        RunConfig().replace(optimizer=RunConfig().optimizer, epochs=2,
                            budget={"max_seeds": 2000})
    assert e.value.field == "budget.max_seeds"
    assert RunConfig().replace(epochs=3, sites=["a"]).sites == ("a",)


def test_the_wire_form_follows_the_field_names() -> None:
    """from_proto/to_proto are derived: every dataclass field has a message field of its
    name (decide_timeout_s ↔ decide_timeout), so a field added to both needs no code."""
    from esper.tolaria.config import WIRE_NAMES
    from generated.esper.tolaria.v1 import tolaria_service_pb2 as pb

    wire = set(pb.RunConfig.DESCRIPTOR.fields_by_name)
    assert {WIRE_NAMES.get(f, f) for f in RunConfig.__dataclass_fields__} <= wire
    cfg = RunConfig.from_dict({"job": "digits", "job_params": {"host": "cnn"}, "seed": 3,
                               "resources": {"gpus": 1}, "decide_timeout_s": 0.125})
    msg = cfg.to_proto()
    assert (msg.job, dict(msg.job_params), msg.seed, msg.resources.gpus) == ("digits", {"host": "cnn"}, 3, 1)
    assert msg.decide_timeout.ToNanoseconds() == 125_000_000
    assert not msg.task and not msg.host and msg.width == 0  # legacy fields stay unset with a job
    assert RunConfig.from_proto(msg) == cfg
    msg.task = "digits"
    with pytest.raises(RunConfigError) as e:
        RunConfig.from_proto(msg)
    assert e.value.field == "task"
