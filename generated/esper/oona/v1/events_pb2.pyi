import datetime

from generated.esper.common.v1 import decision_pb2 as _decision_pb2
from generated.esper.common.v1 import health_pb2 as _health_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
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

class LifecycleEvent(_message.Message):
    __slots__ = ("slot_id", "from_stage", "to_stage", "blueprint_id", "kernel_id", "reason", "alpha")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STAGE_FIELD_NUMBER: _ClassVar[int]
    TO_STAGE_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    from_stage: _seed_pb2.SeedStage
    to_stage: _seed_pb2.SeedStage
    blueprint_id: str
    kernel_id: str
    reason: str
    alpha: float
    def __init__(self, slot_id: _Optional[str] = ..., from_stage: _Optional[_Union[_seed_pb2.SeedStage, str]] = ..., to_stage: _Optional[_Union[_seed_pb2.SeedStage, str]] = ..., blueprint_id: _Optional[str] = ..., kernel_id: _Optional[str] = ..., reason: _Optional[str] = ..., alpha: _Optional[float] = ...) -> None: ...

class GateEvent(_message.Message):
    __slots__ = ("slot_id", "gate", "passed", "reason")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    gate: str
    passed: bool
    reason: str
    def __init__(self, slot_id: _Optional[str] = ..., gate: _Optional[str] = ..., passed: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class DecisionEvent(_message.Message):
    __slots__ = ("decisions", "rejected", "latency_ms")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[_decision_pb2.Decision]
    rejected: _containers.ScalarMap[int, str]
    latency_ms: float
    def __init__(self, decisions: _Optional[_Iterable[_Union[_decision_pb2.Decision, _Mapping]]] = ..., rejected: _Optional[_Mapping[int, str]] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class EpochMetrics(_message.Message):
    __slots__ = ("epoch", "total_epochs", "train_loss", "val_loss", "val_accuracy", "parameters", "learning_rate", "epoch_seconds", "train_flops", "alphas", "stages", "control_ms", "decision_flops")
    class AlphasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _seed_pb2.SeedStage
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_seed_pb2.SeedStage, str]] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FLOPS_FIELD_NUMBER: _ClassVar[int]
    ALPHAS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FLOPS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    total_epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    parameters: int
    learning_rate: float
    epoch_seconds: float
    train_flops: float
    alphas: _containers.ScalarMap[str, float]
    stages: _containers.ScalarMap[str, _seed_pb2.SeedStage]
    control_ms: float
    decision_flops: float
    def __init__(self, epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_accuracy: _Optional[float] = ..., parameters: _Optional[int] = ..., learning_rate: _Optional[float] = ..., epoch_seconds: _Optional[float] = ..., train_flops: _Optional[float] = ..., alphas: _Optional[_Mapping[str, float]] = ..., stages: _Optional[_Mapping[str, _seed_pb2.SeedStage]] = ..., control_ms: _Optional[float] = ..., decision_flops: _Optional[float] = ...) -> None: ...

class DegradationEvent(_message.Message):
    __slots__ = ("component", "kind", "detail", "dropped")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    component: str
    kind: str
    detail: str
    dropped: int
    def __init__(self, component: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ..., dropped: _Optional[int] = ...) -> None: ...

class KernelPublished(_message.Message):
    __slots__ = ("kernel_id", "blueprint_id", "site", "parameters")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    blueprint_id: str
    site: _seed_pb2.SiteSignature
    parameters: int
    def __init__(self, kernel_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., parameters: _Optional[int] = ...) -> None: ...

class RunStateChanged(_message.Message):
    __slots__ = ("state", "detail", "run_state")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    detail: str
    run_state: RunState
    def __init__(self, state: _Optional[str] = ..., detail: _Optional[str] = ..., run_state: _Optional[_Union[RunState, str]] = ...) -> None: ...

class EventDelivery(_message.Message):
    __slots__ = ("published", "lost", "undelivered", "dropped", "rejected", "degradations")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    UNDELIVERED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    published: int
    lost: int
    undelivered: int
    dropped: int
    rejected: int
    degradations: int
    def __init__(self, published: _Optional[int] = ..., lost: _Optional[int] = ..., undelivered: _Optional[int] = ..., dropped: _Optional[int] = ..., rejected: _Optional[int] = ..., degradations: _Optional[int] = ...) -> None: ...

class EventEnvelope(_message.Message):
    __slots__ = ("event_id", "run_id", "step", "epoch", "emitted_at", "source", "sequence", "lifecycle", "gate", "decision", "epoch_metrics", "degradation", "kernel_published", "run_state", "health", "delivery")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_METRICS_FIELD_NUMBER: _ClassVar[int]
    DEGRADATION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    run_id: str
    step: int
    epoch: int
    emitted_at: _timestamp_pb2.Timestamp
    source: str
    sequence: int
    lifecycle: LifecycleEvent
    gate: GateEvent
    decision: DecisionEvent
    epoch_metrics: EpochMetrics
    degradation: DegradationEvent
    kernel_published: KernelPublished
    run_state: RunStateChanged
    health: _health_pb2.HealthSnapshot
    delivery: EventDelivery
    def __init__(self, event_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step: _Optional[int] = ..., epoch: _Optional[int] = ..., emitted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., sequence: _Optional[int] = ..., lifecycle: _Optional[_Union[LifecycleEvent, _Mapping]] = ..., gate: _Optional[_Union[GateEvent, _Mapping]] = ..., decision: _Optional[_Union[DecisionEvent, _Mapping]] = ..., epoch_metrics: _Optional[_Union[EpochMetrics, _Mapping]] = ..., degradation: _Optional[_Union[DegradationEvent, _Mapping]] = ..., kernel_published: _Optional[_Union[KernelPublished, _Mapping]] = ..., run_state: _Optional[_Union[RunStateChanged, _Mapping]] = ..., health: _Optional[_Union[_health_pb2.HealthSnapshot, _Mapping]] = ..., delivery: _Optional[_Union[EventDelivery, _Mapping]] = ...) -> None: ...
