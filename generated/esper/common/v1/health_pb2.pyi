import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SlotHealth(_message.Message):
    __slots__ = ("slot_id", "stage", "alpha", "site", "blueprint_id", "kernel_id", "host_grad_norm", "seed_grad_norm", "activation_mean", "activation_std", "contribution", "contribution_measured", "steps_in_stage", "epochs_in_stage", "seed_parameters", "host_parameters", "embargo_epochs_left", "finite", "depth")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    SEED_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_STD_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_MEASURED_FIELD_NUMBER: _ClassVar[int]
    STEPS_IN_STAGE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_IN_STAGE_FIELD_NUMBER: _ClassVar[int]
    SEED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    HOST_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    EMBARGO_EPOCHS_LEFT_FIELD_NUMBER: _ClassVar[int]
    FINITE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    stage: _seed_pb2.SeedStage
    alpha: float
    site: _seed_pb2.SiteSignature
    blueprint_id: str
    kernel_id: str
    host_grad_norm: float
    seed_grad_norm: float
    activation_mean: float
    activation_std: float
    contribution: float
    contribution_measured: bool
    steps_in_stage: int
    epochs_in_stage: int
    seed_parameters: int
    host_parameters: int
    embargo_epochs_left: int
    finite: bool
    depth: int
    def __init__(self, slot_id: _Optional[str] = ..., stage: _Optional[_Union[_seed_pb2.SeedStage, str]] = ..., alpha: _Optional[float] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., blueprint_id: _Optional[str] = ..., kernel_id: _Optional[str] = ..., host_grad_norm: _Optional[float] = ..., seed_grad_norm: _Optional[float] = ..., activation_mean: _Optional[float] = ..., activation_std: _Optional[float] = ..., contribution: _Optional[float] = ..., contribution_measured: _Optional[bool] = ..., steps_in_stage: _Optional[int] = ..., epochs_in_stage: _Optional[int] = ..., seed_parameters: _Optional[int] = ..., host_parameters: _Optional[int] = ..., embargo_epochs_left: _Optional[int] = ..., finite: _Optional[bool] = ..., depth: _Optional[int] = ...) -> None: ...

class SlotRecord(_message.Message):
    __slots__ = ("slot_id", "epoch", "stage", "contribution_measured", "contribution")
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_MEASURED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    slot_id: str
    epoch: int
    stage: _seed_pb2.SeedStage
    contribution_measured: bool
    contribution: float
    def __init__(self, slot_id: _Optional[str] = ..., epoch: _Optional[int] = ..., stage: _Optional[_Union[_seed_pb2.SeedStage, str]] = ..., contribution_measured: _Optional[bool] = ..., contribution: _Optional[float] = ...) -> None: ...

class KernelProbe(_message.Message):
    __slots__ = ("kernel_id", "gain", "steps", "flops", "gain_stderr", "slot_id")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    GAIN_STDERR_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    gain: float
    steps: int
    flops: float
    gain_stderr: float
    slot_id: str
    def __init__(self, kernel_id: _Optional[str] = ..., gain: _Optional[float] = ..., steps: _Optional[int] = ..., flops: _Optional[float] = ..., gain_stderr: _Optional[float] = ..., slot_id: _Optional[str] = ...) -> None: ...

class GraphNode(_message.Message):
    __slots__ = ("name", "kind", "parameters", "slot_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    parameters: int
    slot_id: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., parameters: _Optional[int] = ..., slot_id: _Optional[str] = ...) -> None: ...

class GraphEdge(_message.Message):
    __slots__ = ("src", "dst")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    src: int
    dst: int
    def __init__(self, src: _Optional[int] = ..., dst: _Optional[int] = ...) -> None: ...

class ModelGraph(_message.Message):
    __slots__ = ("nodes", "edges")
    NODES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[GraphNode]
    edges: _containers.RepeatedCompositeFieldContainer[GraphEdge]
    def __init__(self, nodes: _Optional[_Iterable[_Union[GraphNode, _Mapping]]] = ..., edges: _Optional[_Iterable[_Union[GraphEdge, _Mapping]]] = ...) -> None: ...

class HealthSnapshot(_message.Message):
    __slots__ = ("run_id", "epoch", "total_epochs", "global_step", "slots", "train_loss_history", "val_loss_history", "val_accuracy_history", "host_parameters", "total_parameters", "seeds_left", "parameters_left", "graph", "taken_at", "task", "slot_history", "probes", "slot_records")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_HISTORY_FIELD_NUMBER: _ClassVar[int]
    HOST_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_LEFT_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SLOT_HISTORY_FIELD_NUMBER: _ClassVar[int]
    PROBES_FIELD_NUMBER: _ClassVar[int]
    SLOT_RECORDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    epoch: int
    total_epochs: int
    global_step: int
    slots: _containers.RepeatedCompositeFieldContainer[SlotHealth]
    train_loss_history: _containers.RepeatedScalarFieldContainer[float]
    val_loss_history: _containers.RepeatedScalarFieldContainer[float]
    val_accuracy_history: _containers.RepeatedScalarFieldContainer[float]
    host_parameters: int
    total_parameters: int
    seeds_left: int
    parameters_left: int
    graph: ModelGraph
    taken_at: _timestamp_pb2.Timestamp
    task: str
    slot_history: bool
    probes: _containers.RepeatedCompositeFieldContainer[KernelProbe]
    slot_records: _containers.RepeatedCompositeFieldContainer[SlotRecord]
    def __init__(self, run_id: _Optional[str] = ..., epoch: _Optional[int] = ..., total_epochs: _Optional[int] = ..., global_step: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[SlotHealth, _Mapping]]] = ..., train_loss_history: _Optional[_Iterable[float]] = ..., val_loss_history: _Optional[_Iterable[float]] = ..., val_accuracy_history: _Optional[_Iterable[float]] = ..., host_parameters: _Optional[int] = ..., total_parameters: _Optional[int] = ..., seeds_left: _Optional[int] = ..., parameters_left: _Optional[int] = ..., graph: _Optional[_Union[ModelGraph, _Mapping]] = ..., taken_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task: _Optional[str] = ..., slot_history: _Optional[bool] = ..., probes: _Optional[_Iterable[_Union[KernelProbe, _Mapping]]] = ..., slot_records: _Optional[_Iterable[_Union[SlotRecord, _Mapping]]] = ...) -> None: ...
