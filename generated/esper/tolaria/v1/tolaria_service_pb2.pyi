import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.oona.v1 import events_pb2 as _events_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_STOPPED: RunState

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "learning_rate", "weight_decay", "momentum", "schedule", "warmup_epochs", "clip_grad_norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    weight_decay: float
    momentum: float
    schedule: str
    warmup_epochs: int
    clip_grad_norm: float
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., schedule: _Optional[str] = ..., warmup_epochs: _Optional[int] = ..., clip_grad_norm: _Optional[float] = ...) -> None: ...

class GrowthBudget(_message.Message):
    __slots__ = ("max_seeds", "max_added_parameters")
    MAX_SEEDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADDED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    max_seeds: int
    max_added_parameters: int
    def __init__(self, max_seeds: _Optional[int] = ..., max_added_parameters: _Optional[int] = ...) -> None: ...

class RunResources(_message.Message):
    __slots__ = ("gpus", "cpu_millis", "memory_mib")
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_MILLIS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    gpus: int
    cpu_millis: int
    memory_mib: int
    def __init__(self, gpus: _Optional[int] = ..., cpu_millis: _Optional[int] = ..., memory_mib: _Optional[int] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("task", "host", "sites", "controller", "budget", "epochs", "seed", "optimizer", "batch_size", "checkpoint_every", "decide_timeout", "width", "labels", "job", "job_params", "resources", "world_size")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class JobParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_PARAMS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    task: str
    host: str
    sites: _containers.RepeatedScalarFieldContainer[str]
    controller: str
    budget: GrowthBudget
    epochs: int
    seed: int
    optimizer: OptimizerConfig
    batch_size: int
    checkpoint_every: int
    decide_timeout: _duration_pb2.Duration
    width: float
    labels: _containers.ScalarMap[str, str]
    job: str
    job_params: _containers.ScalarMap[str, str]
    resources: RunResources
    world_size: int
    def __init__(self, task: _Optional[str] = ..., host: _Optional[str] = ..., sites: _Optional[_Iterable[str]] = ..., controller: _Optional[str] = ..., budget: _Optional[_Union[GrowthBudget, _Mapping]] = ..., epochs: _Optional[int] = ..., seed: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., batch_size: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., decide_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., width: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., job: _Optional[str] = ..., job_params: _Optional[_Mapping[str, str]] = ..., resources: _Optional[_Union[RunResources, _Mapping]] = ..., world_size: _Optional[int] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "config", "state", "epoch", "global_step", "val_accuracy", "val_loss", "parameters", "created_at", "updated_at", "detail", "degraded", "last_sequence", "stop_requested", "stop_reason", "event_delivery", "degradations", "restarts", "worker")
    class DegradationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STOP_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    EVENT_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: RunConfig
    state: RunState
    epoch: int
    global_step: int
    val_accuracy: float
    val_loss: float
    parameters: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    detail: str
    degraded: _containers.RepeatedScalarFieldContainer[str]
    last_sequence: int
    stop_requested: bool
    stop_reason: str
    event_delivery: _events_pb2.EventDelivery
    degradations: _containers.ScalarMap[str, int]
    restarts: int
    worker: str
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., epoch: _Optional[int] = ..., global_step: _Optional[int] = ..., val_accuracy: _Optional[float] = ..., val_loss: _Optional[float] = ..., parameters: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail: _Optional[str] = ..., degraded: _Optional[_Iterable[str]] = ..., last_sequence: _Optional[int] = ..., stop_requested: _Optional[bool] = ..., stop_reason: _Optional[str] = ..., event_delivery: _Optional[_Union[_events_pb2.EventDelivery, _Mapping]] = ..., degradations: _Optional[_Mapping[str, int]] = ..., restarts: _Optional[int] = ..., worker: _Optional[str] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("request_id", "config")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    config: RunConfig
    def __init__(self, request_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: RunState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "from_sequence")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_sequence: int
    def __init__(self, run_id: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _events_pb2.EventEnvelope
    def __init__(self, event: _Optional[_Union[_events_pb2.EventEnvelope, _Mapping]] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("request_id", "run_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    run_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StopRunResponse(_message.Message):
    __slots__ = ("run", "requested_at", "expected_state")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STATE_FIELD_NUMBER: _ClassVar[int]
    run: Run
    requested_at: _timestamp_pb2.Timestamp
    expected_state: RunState
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expected_state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "description", "source", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    source: str
    parameters: _containers.RepeatedCompositeFieldContainer[JobParameter]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., source: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[JobParameter, _Mapping]]] = ...) -> None: ...

class JobParameter(_message.Message):
    __slots__ = ("name", "type", "default_value", "required", "description", "choices", "accepts_none", "run_config_field")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_NONE_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_FIELD_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_value: str
    required: bool
    description: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    accepts_none: bool
    run_config_field: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_value: _Optional[str] = ..., required: _Optional[bool] = ..., description: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., accepts_none: _Optional[bool] = ..., run_config_field: _Optional[str] = ...) -> None: ...
