import datetime

from generated.buf.validate import validate_pb2 as _validate_pb2
from generated.esper.common.v1 import blueprint_pb2 as _blueprint_pb2
from generated.esper.common.v1 import kernel_pb2 as _kernel_pb2
from generated.esper.common.v1 import seed_pb2 as _seed_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SeedFate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEED_FATE_UNSPECIFIED: _ClassVar[SeedFate]
    SEED_FATE_FOSSILIZED: _ClassVar[SeedFate]
    SEED_FATE_PRUNED: _ClassVar[SeedFate]
    SEED_FATE_ROLLED_BACK: _ClassVar[SeedFate]
    SEED_FATE_RUN_ENDED: _ClassVar[SeedFate]
SEED_FATE_UNSPECIFIED: SeedFate
SEED_FATE_FOSSILIZED: SeedFate
SEED_FATE_PRUNED: SeedFate
SEED_FATE_ROLLED_BACK: SeedFate
SEED_FATE_RUN_ENDED: SeedFate

class PutBlueprintRequest(_message.Message):
    __slots__ = ("request_id", "blueprint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    blueprint: _blueprint_pb2.Blueprint
    def __init__(self, request_id: _Optional[str] = ..., blueprint: _Optional[_Union[_blueprint_pb2.Blueprint, _Mapping]] = ...) -> None: ...

class PutBlueprintResponse(_message.Message):
    __slots__ = ("blueprint_id", "created")
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: str
    created: bool
    def __init__(self, blueprint_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class GetBlueprintRequest(_message.Message):
    __slots__ = ("blueprint_id",)
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: str
    def __init__(self, blueprint_id: _Optional[str] = ...) -> None: ...

class GetBlueprintResponse(_message.Message):
    __slots__ = ("blueprint", "retired", "retired_at", "retired_reason")
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_FIELD_NUMBER: _ClassVar[int]
    RETIRED_REASON_FIELD_NUMBER: _ClassVar[int]
    blueprint: _blueprint_pb2.Blueprint
    retired: bool
    retired_at: _timestamp_pb2.Timestamp
    retired_reason: str
    def __init__(self, blueprint: _Optional[_Union[_blueprint_pb2.Blueprint, _Mapping]] = ..., retired: _Optional[bool] = ..., retired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retired_reason: _Optional[str] = ...) -> None: ...

class ListBlueprintsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "family", "tags", "layout", "include_retired")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RETIRED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    family: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    layout: _seed_pb2.ActivationLayout
    include_retired: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., family: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., layout: _Optional[_Union[_seed_pb2.ActivationLayout, str]] = ..., include_retired: _Optional[bool] = ...) -> None: ...

class ListBlueprintsResponse(_message.Message):
    __slots__ = ("blueprints", "next_page_token", "retired_blueprint_ids")
    BLUEPRINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RETIRED_BLUEPRINT_IDS_FIELD_NUMBER: _ClassVar[int]
    blueprints: _containers.RepeatedCompositeFieldContainer[_blueprint_pb2.Blueprint]
    next_page_token: str
    retired_blueprint_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, blueprints: _Optional[_Iterable[_Union[_blueprint_pb2.Blueprint, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., retired_blueprint_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RetireBlueprintRequest(_message.Message):
    __slots__ = ("request_id", "blueprint_id", "reason", "restore")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    blueprint_id: str
    reason: str
    restore: bool
    def __init__(self, request_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ..., reason: _Optional[str] = ..., restore: _Optional[bool] = ...) -> None: ...

class RetireBlueprintResponse(_message.Message):
    __slots__ = ("changed", "retired")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    retired: bool
    def __init__(self, changed: _Optional[bool] = ..., retired: _Optional[bool] = ...) -> None: ...

class DeleteBlueprintRequest(_message.Message):
    __slots__ = ("request_id", "blueprint_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    blueprint_id: str
    def __init__(self, request_id: _Optional[str] = ..., blueprint_id: _Optional[str] = ...) -> None: ...

class DeleteBlueprintResponse(_message.Message):
    __slots__ = ("deleted", "kernels_deleted", "field_reports_deleted")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    KERNELS_DELETED_FIELD_NUMBER: _ClassVar[int]
    FIELD_REPORTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    kernels_deleted: int
    field_reports_deleted: int
    def __init__(self, deleted: _Optional[bool] = ..., kernels_deleted: _Optional[int] = ..., field_reports_deleted: _Optional[int] = ...) -> None: ...

class KernelUploadHeader(_message.Message):
    __slots__ = ("request_id", "total_size", "artifact_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    total_size: int
    artifact_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., total_size: _Optional[int] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class PutKernelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: KernelUploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[KernelUploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutKernelResponse(_message.Message):
    __slots__ = ("kernel_id", "created")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    created: bool
    def __init__(self, kernel_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class GetKernelRequest(_message.Message):
    __slots__ = ("kernel_id", "offset", "chunk_size")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    offset: int
    chunk_size: int
    def __init__(self, kernel_id: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetKernelResponse(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: _kernel_pb2.KernelRecord
    chunk: KernelChunk
    def __init__(self, info: _Optional[_Union[_kernel_pb2.KernelRecord, _Mapping]] = ..., chunk: _Optional[_Union[KernelChunk, _Mapping]] = ...) -> None: ...

class KernelChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class QueryKernelsRequest(_message.Message):
    __slots__ = ("blueprint_id", "site", "tags", "page_size", "page_token", "max_parameters", "include_retired")
    BLUEPRINT_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RETIRED_FIELD_NUMBER: _ClassVar[int]
    blueprint_id: str
    site: _seed_pb2.SiteSignature
    tags: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    max_parameters: int
    include_retired: bool
    def __init__(self, blueprint_id: _Optional[str] = ..., site: _Optional[_Union[_seed_pb2.SiteSignature, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., max_parameters: _Optional[int] = ..., include_retired: _Optional[bool] = ...) -> None: ...

class QueryKernelsResponse(_message.Message):
    __slots__ = ("kernels", "next_page_token")
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kernels: _containers.RepeatedCompositeFieldContainer[_kernel_pb2.KernelRecord]
    next_page_token: str
    def __init__(self, kernels: _Optional[_Iterable[_Union[_kernel_pb2.KernelRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteKernelRequest(_message.Message):
    __slots__ = ("request_id", "kernel_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kernel_id: str
    def __init__(self, request_id: _Optional[str] = ..., kernel_id: _Optional[str] = ...) -> None: ...

class DeleteKernelResponse(_message.Message):
    __slots__ = ("deleted", "field_reports_deleted")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    FIELD_REPORTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    field_reports_deleted: int
    def __init__(self, deleted: _Optional[bool] = ..., field_reports_deleted: _Optional[int] = ...) -> None: ...

class FieldReport(_message.Message):
    __slots__ = ("kernel_id", "run_id", "slot_id", "task", "contribution", "accuracy_delta", "fate", "germinated_epoch", "ended_epoch", "parameters", "recorded_at", "rejected_by_gate", "rolled_back")
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_DELTA_FIELD_NUMBER: _ClassVar[int]
    FATE_FIELD_NUMBER: _ClassVar[int]
    GERMINATED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ENDED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_GATE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    kernel_id: str
    run_id: str
    slot_id: str
    task: str
    contribution: float
    accuracy_delta: float
    fate: SeedFate
    germinated_epoch: int
    ended_epoch: int
    parameters: int
    recorded_at: _timestamp_pb2.Timestamp
    rejected_by_gate: bool
    rolled_back: bool
    def __init__(self, kernel_id: _Optional[str] = ..., run_id: _Optional[str] = ..., slot_id: _Optional[str] = ..., task: _Optional[str] = ..., contribution: _Optional[float] = ..., accuracy_delta: _Optional[float] = ..., fate: _Optional[_Union[SeedFate, str]] = ..., germinated_epoch: _Optional[int] = ..., ended_epoch: _Optional[int] = ..., parameters: _Optional[int] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rejected_by_gate: _Optional[bool] = ..., rolled_back: _Optional[bool] = ...) -> None: ...

class RecordOutcomeRequest(_message.Message):
    __slots__ = ("request_id", "report")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    report: FieldReport
    def __init__(self, request_id: _Optional[str] = ..., report: _Optional[_Union[FieldReport, _Mapping]] = ...) -> None: ...

class RecordOutcomeResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class DeleteFieldReportsRequest(_message.Message):
    __slots__ = ("request_id", "kernel_id", "run_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kernel_id: str
    run_id: str
    def __init__(self, request_id: _Optional[str] = ..., kernel_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class DeleteFieldReportsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...
